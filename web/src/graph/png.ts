// Text chunks of a PNG (tEXt and uncompressed iTXt), read without a library (web-editor.md section 4).

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

function decodeText(bytes: Uint8Array): string {
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    return new TextDecoder("latin1").decode(bytes); // the PNG spec's charset for tEXt
  }
}

/** keyword -> text for every tEXt and uncompressed iTXt chunk; null when the bytes are not a PNG. */
export function readPngText(buffer: ArrayBuffer): Record<string, string> | null {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 8 || SIGNATURE.some((b, i) => bytes[i] !== b)) return null;
  const view = new DataView(buffer);
  const chunks: Record<string, string> = {};
  let offset = 8;
  while (offset + 8 <= bytes.length) {
    const length = view.getUint32(offset);
    const type = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
    const data = bytes.subarray(offset + 8, Math.min(offset + 8 + length, bytes.length));
    if (type === "IEND") break;
    const nul = data.indexOf(0);
    if (type === "tEXt" && nul > 0) {
      chunks[decodeText(data.subarray(0, nul))] = decodeText(data.subarray(nul + 1));
    } else if (type === "iTXt" && nul > 0 && data[nul + 1] === 0) {
      // keyword \0 flag method language \0 translated \0 text; flag 0 = uncompressed
      const languageEnd = data.indexOf(0, nul + 3);
      const translatedEnd = languageEnd < 0 ? -1 : data.indexOf(0, languageEnd + 1);
      if (translatedEnd >= 0) {
        chunks[decodeText(data.subarray(0, nul))] = new TextDecoder("utf-8").decode(data.subarray(translatedEnd + 1));
      }
    }
    offset += 12 + length;
  }
  return chunks;
}

/** A binary websocket frame's preview image (type 1: format 1 JPEG, 2 PNG), or null for other frames. */
export function parsePreview(buffer: ArrayBuffer): { mime: string; bytes: ArrayBuffer } | null {
  if (buffer.byteLength < 8) return null;
  const view = new DataView(buffer);
  if (view.getUint32(0) !== 1) return null;
  const mime = view.getUint32(4) === 2 ? "image/png" : "image/jpeg";
  return { mime, bytes: buffer.slice(8) };
}
