import { describe, expect, it } from "vitest";
import { parsePreview, readPngText } from "./png";

function chunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length);
  new DataView(out.buffer).setUint32(0, data.length);
  out.set([...type].map((c) => c.charCodeAt(0)), 4);
  out.set(data, 8); // the CRC stays zero: readers need not check it
  return out;
}

function png(...chunks: Uint8Array[]): ArrayBuffer {
  const parts = [new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]), ...chunks, chunk("IEND", new Uint8Array())];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) { out.set(part, offset); offset += part.length; }
  return out.buffer;
}

const utf8 = (s: string) => new TextEncoder().encode(s);
const latin1 = (s: string) => Uint8Array.from([...s].map((c) => c.charCodeAt(0)));

describe("readPngText", () => {
  it("reads tEXt chunks as keyword and text", () => {
    const buf = png(chunk("IHDR", new Uint8Array(13)), chunk("tEXt", utf8('workflow\0{"nodes":[]}')), chunk("tEXt", utf8("prompt\0{}")));
    expect(readPngText(buf)).toEqual({ workflow: '{"nodes":[]}', prompt: "{}" });
  });

  it("falls back to Latin-1 for tEXt that is not UTF-8", () => {
    expect(readPngText(png(chunk("tEXt", latin1("prompt\0caf\u00e9"))))).toEqual({ prompt: "caf\u00e9" });
  });

  it("reads uncompressed iTXt as UTF-8", () => {
    expect(readPngText(png(chunk("iTXt", utf8("workflow\0\0\0en\0\0\u732b"))))).toEqual({ workflow: "\u732b" });
  });

  it("is null for bytes that are not a PNG", () => {
    expect(readPngText(utf8("GIF89a....").buffer as ArrayBuffer)).toBeNull();
  });
});

describe("parsePreview", () => {
  it("reads a type-1 PNG preview frame", () => {
    const frame = new Uint8Array([0, 0, 0, 1, 0, 0, 0, 2, 9, 8, 7]);
    const preview = parsePreview(frame.buffer)!;
    expect(preview.mime).toBe("image/png");
    expect([...new Uint8Array(preview.bytes)]).toEqual([9, 8, 7]);
  });

  it("ignores frame types it does not know", () => {
    expect(parsePreview(new Uint8Array([0, 0, 0, 4, 0, 0, 0, 2, 1]).buffer)).toBeNull();
  });
});
