import { defineConfig } from "vitest/config";
import react from "@vitejs/plugin-react";
import { createHash } from "node:crypto";
import { readFileSync, readdirSync } from "node:fs";
import { join, relative } from "node:path";
import type { Plugin } from "vite";

/** The files a bundle is built from: src/ without tests and their fixtures, the lockfile, this config.
 * tests/web/test_bundle.py hashes the same list, so it can tell a stale dist/ without Node. */
function bundleSources(root: string): string[] {
  const walk = (dir: string): string[] => readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return entry.name === "fixtures" || entry.name === "node_modules" ? [] : walk(path);
    return entry.name.endsWith(".test.ts") ? [] : [path];
  });
  return [...walk(join(root, "src")), join(root, "package-lock.json"), join(root, "vite.config.ts")]
    .map((path) => relative(root, path).split("\\").join("/")).sort();
}

function sourceHash(): Plugin {
  return {
    name: "sdgraph-source-hash",
    generateBundle() {
      const root = import.meta.dirname;
      const hash = createHash("sha256");
      const files = bundleSources(root);
      for (const file of files) hash.update(file).update("\0").update(readFileSync(join(root, file))).update("\0");
      this.emitFile({ type: "asset", fileName: "source-hash.json",
        source: JSON.stringify({ sha256: hash.digest("hex"), files: files.length }, null, 1) + "\n" });
    },
  };
}

// `base: "./"` keeps asset URLs relative, so the same bundle works at `/` and under `/web/dist/`.
const server = "http://127.0.0.1:8188";

// The page's source lives in src/ so that web/index.html stays the server's API console fallback.
export default defineConfig({
  root: "src",
  cacheDir: "../node_modules/.vite",
  base: "./",
  plugins: [react(), sourceHash()],
  build: { outDir: "../dist", emptyOutDir: true, sourcemap: false, chunkSizeWarningLimit: 1000 },
  server: {
    proxy: {
      // The server refuses requests whose Origin differs from its Host (as ComfyUI does), so the dev
      // proxy presents the server's own origin.
      "^/(object_info|prompt|queue|history|interrupt|view|upload|models|features|system_stats|embeddings)": {
        target: server,
        changeOrigin: true,
        configure: (proxy) => proxy.on("proxyReq", (request) => request.setHeader("origin", server)),
      },
      "/ws": { target: server.replace("http", "ws"), ws: true },
    },
  },
  test: { environment: "node", include: ["**/*.test.ts"] },
});
