import { defineConfig } from "vitest/config";
import react from "@vitejs/plugin-react";

// `base: "./"` keeps asset URLs relative, so the same bundle works at `/` and under `/web/dist/`.
const server = "http://127.0.0.1:8188";

// The page's source lives in src/ so that web/index.html stays the server's API console fallback.
export default defineConfig({
  root: "src",
  base: "./",
  plugins: [react()],
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
