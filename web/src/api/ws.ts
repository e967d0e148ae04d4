// The websocket `/ws?clientId=ID`: one id per tab, JSON events and binary previews, reconnecting with
// backoff under the same id (web-editor.md section 2.3).
import { parsePreview } from "../graph/png";
import { apiUrl } from "./client";

export interface ServerMessage {
  type: string;
  data: Record<string, unknown>;
}

export function newClientId(): string {
  // randomUUID exists only in secure contexts; a LAN address over http is not one.
  if (typeof crypto !== "undefined" && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return Array.from({ length: 4 }, () => Math.random().toString(16).slice(2, 10)).join("-");
}

export interface SocketHandlers {
  onMessage(message: ServerMessage): void;
  onPreview(blob: Blob): void;
  onConnection(open: boolean): void;
}

/** Connect and keep connected until the returned function is called. */
export function connectSocket(clientId: string, handlers: SocketHandlers): () => void {
  let socket: WebSocket | null = null;
  let closed = false;
  let delay = 500;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const open = () => {
    const url = new URL(apiUrl(`/ws?clientId=${encodeURIComponent(clientId)}`), location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      delay = 500;
      handlers.onConnection(true);
    };
    socket.onmessage = (event) => {
      if (event.data instanceof ArrayBuffer) {
        const preview = parsePreview(event.data);
        if (preview) handlers.onPreview(new Blob([preview.bytes], { type: preview.mime }));
        return;
      }
      try {
        handlers.onMessage(JSON.parse(String(event.data)) as ServerMessage);
      } catch {
        // a frame we cannot read is skipped, as ComfyUI's client does
      }
    };
    socket.onclose = () => {
      handlers.onConnection(false);
      if (closed) return;
      timer = setTimeout(open, delay);
      delay = Math.min(delay * 2, 10_000);
    };
  };
  open();
  return () => {
    closed = true;
    clearTimeout(timer);
    socket?.close();
  };
}
