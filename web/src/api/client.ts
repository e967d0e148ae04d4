// The server's HTTP routes (comfyui-interface.md section 6), relative to where the API lives.
import type { ObjectInfo } from "./objectInfo";

/** The API's base path: the page may be served at `/`, under a proxy prefix, or at `/web/dist/`. */
export function apiBase(pathname: string = location.pathname): string {
  return pathname.replace(/\/web\/dist\/.*$/, "").replace(/\/[^/]*$/, "");
}

export function apiUrl(path: string): string {
  return `${apiBase()}${path}`;
}

export interface ImageRef {
  filename: string;
  subfolder?: string;
  type?: string;
}

export function viewUrl(image: ImageRef): string {
  const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "", type: image.type ?? "output" });
  return apiUrl(`/view?${query}`);
}

export interface NodeErrorEntry {
  type?: string;
  message: string;
  details?: string;
  extra_info?: { input_name?: string };
}
export type NodeErrors = Record<string, { errors: NodeErrorEntry[]; class_type?: string }>;

export interface QueueAnswer {
  ok: boolean;
  promptId?: string;
  number?: number;
  error?: { type?: string; message?: string; details?: string };
  nodeErrors: NodeErrors;
}

async function json<T>(response: Response): Promise<T> {
  if (!response.ok) throw new Error(`${response.url}: ${response.status} ${await response.text()}`);
  return (await response.json()) as T;
}

export async function fetchObjectInfo(): Promise<ObjectInfo> {
  return json<ObjectInfo>(await fetch(apiUrl("/object_info")));
}

export async function queuePrompt(body: Record<string, unknown>): Promise<QueueAnswer> {
  const response = await fetch(apiUrl("/prompt"), { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  let answer: Record<string, unknown> = {};
  try {
    answer = await response.json();
  } catch {
    answer = { error: { message: `the server answered ${response.status} without JSON` } };
  }
  const error = answer.error as QueueAnswer["error"] | string | undefined;
  return {
    ok: response.ok,
    promptId: answer.prompt_id as string | undefined,
    number: answer.number as number | undefined,
    error: typeof error === "string" ? { message: error } : error,
    nodeErrors: (answer.node_errors as NodeErrors) ?? {},
  };
}

export type QueueItem = [number, string, Record<string, unknown>, Record<string, unknown>, string[]];

export interface QueueState {
  queue_running: QueueItem[];
  queue_pending: QueueItem[];
}

export interface HistoryEntry {
  prompt: QueueItem;
  outputs: Record<string, { images?: ImageRef[] }>;
  status?: { status_str?: string; completed?: boolean; messages?: [string, Record<string, unknown>][] };
}

export async function fetchQueue(): Promise<QueueState> {
  return json<QueueState>(await fetch(apiUrl("/queue")));
}

export async function fetchHistory(maxItems = 30): Promise<Record<string, HistoryEntry>> {
  return json<Record<string, HistoryEntry>>(await fetch(apiUrl(`/history?max_items=${maxItems}`)));
}

async function post(path: string, body?: unknown): Promise<void> {
  const response = await fetch(apiUrl(path), { method: "POST", headers: { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
}

export const deleteQueued = (promptId: string) => post("/queue", { delete: [promptId] });
export const interrupt = (promptId?: string) => post("/interrupt", promptId ? { prompt_id: promptId } : {});

export async function uploadImage(file: File): Promise<ImageRef> {
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("type", "input");
  form.append("overwrite", "false");
  const answer = await json<{ name: string; subfolder?: string; type?: string }>(
    await fetch(apiUrl("/upload/image"), { method: "POST", body: form }));
  return { filename: answer.name, subfolder: answer.subfolder, type: answer.type };
}
