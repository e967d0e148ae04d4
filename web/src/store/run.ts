// What the server is doing with our prompts: per-node progress, results, previews and errors, fed by
// websocket events (web-editor.md 2.3) and by the answers to POST /prompt.
import { create } from "zustand";
import type { ImageRef, NodeErrors } from "../api/client";
import type { ServerMessage } from "../api/ws";

export type RunStatus = "idle" | "queued" | "running" | "done" | "failed" | "interrupted" | "invalid";

export interface NodeProblem {
  message: string;
  input?: string;
}

export interface ExecutionFailure {
  nodeId: string;
  nodeType: string;
  message: string;
  traceback: string[];
}

interface RunState {
  status: RunStatus;
  connected: boolean;
  queueRemaining: number;
  promptId: string | null;
  /** Prompts whose execution_start has arrived: a fast run can finish before the POST /prompt answer. */
  started: string[];
  executing: string | null;
  progress: Record<string, { value: number; max: number }>;
  cached: string[];
  executed: string[];
  images: Record<string, ImageRef[]>;
  preview: { nodeId: string; url: string } | null;
  problems: Record<string, NodeProblem[]>;
  failure: ExecutionFailure | null;
  message: string | null;
  /** Bumped whenever the queue or history may have changed. */
  queueVersion: number;
  handle(message: ServerMessage): void;
  showPreview(blob: Blob): void;
  setConnected(open: boolean): void;
  /** A prompt was accepted; `nodeErrors` names the outputs the server left out (they failed validation). */
  queued(promptId: string, nodeErrors?: NodeErrors): void;
  rejected(message: string, nodeErrors: NodeErrors, local?: Record<string, NodeProblem[]>): void;
  dismissFailure(): void;
}

export function problemsFrom(nodeErrors: NodeErrors): Record<string, NodeProblem[]> {
  const problems: Record<string, NodeProblem[]> = {};
  for (const [nodeId, entry] of Object.entries(nodeErrors)) {
    problems[nodeId] = (entry.errors ?? []).map((e) => ({
      message: [e.message, e.details].filter(Boolean).join(": "),
      input: e.extra_info?.input_name,
    }));
  }
  return problems;
}

export const useRun = create<RunState>((set, get) => ({
  status: "idle",
  connected: false,
  queueRemaining: 0,
  promptId: null,
  started: [],
  executing: null,
  progress: {},
  cached: [],
  executed: [],
  images: {},
  preview: null,
  problems: {},
  failure: null,
  message: null,
  queueVersion: 0,

  setConnected: (open) => set({ connected: open }),

  queued: (promptId, nodeErrors = {}) => set((s) => {
    // A fast prompt may have run, even failed, before this answer arrived: keep what its events said.
    const ran = s.started.includes(promptId);
    return {
      status: ran || s.status === "running" ? s.status : "queued",
      problems: ran ? { ...problemsFrom(nodeErrors), ...s.problems } : problemsFrom(nodeErrors),
      failure: ran ? s.failure : null,
      message: null, promptId: s.status === "running" ? s.promptId : promptId, queueVersion: s.queueVersion + 1,
    };
  }),

  rejected: (message, nodeErrors, local = {}) => set({ status: "invalid", message, problems: { ...problemsFrom(nodeErrors), ...local } }),

  dismissFailure: () => set({ failure: null }),

  showPreview: (blob) => {
    const nodeId = get().executing;
    if (!nodeId) return;
    const previous = get().preview;
    if (previous) URL.revokeObjectURL(previous.url);
    set({ preview: { nodeId, url: URL.createObjectURL(blob) } });
  },

  handle: ({ type, data }) => {
    const state = get();
    const promptId = (data.prompt_id as string | undefined) ?? null;
    // The server sends execution events only to the socket of the client that queued the prompt, so
    // every event here is ours (even one that arrives before the POST /prompt answer does).
    switch (type) {
      case "status": {
        const info = (data.status as { exec_info?: { queue_remaining?: number } } | undefined)?.exec_info;
        set({ queueRemaining: info?.queue_remaining ?? 0, queueVersion: state.queueVersion + 1 });
        return;
      }
      case "execution_start":
        set({ status: "running", promptId, executing: null, progress: {}, cached: [], executed: [], failure: null,
          started: promptId ? [...state.started, promptId].slice(-100) : state.started });
        return;
      case "execution_cached":
        set({ cached: ((data.nodes as unknown[]) ?? []).map(String) });
        return;
      case "executing": {
        const node = (data.display_node ?? data.node) as string | null | undefined;
        if (node === null || node === undefined) {
          set({ executing: null, status: state.status === "running" ? "done" : state.status });
          return;
        }
        set({ executing: String(node), executed: state.executing ? [...state.executed, state.executing] : state.executed });
        return;
      }
      case "progress":
        if (data.node != null) {
          set({ progress: { ...state.progress, [String(data.node)]: { value: Number(data.value), max: Number(data.max) } } });
        }
        return;
      case "executed": {
        const node = String(data.display_node ?? data.node);
        const images = ((data.output as { images?: ImageRef[] } | undefined)?.images) ?? [];
        set({ images: { ...state.images, [node]: images } });
        return;
      }
      case "execution_success":
        set({ status: "done", executing: null, queueVersion: state.queueVersion + 1 });
        return;
      case "execution_error":
        set({
          status: "failed", executing: null, queueVersion: state.queueVersion + 1,
          failure: { nodeId: String(data.node_id), nodeType: String(data.node_type ?? ""), message: String(data.exception_message ?? ""),
            traceback: (data.traceback as string[]) ?? [] },
          problems: { [String(data.node_id)]: [{ message: `${data.exception_type ?? "Error"}: ${data.exception_message ?? ""}` }] },
        });
        return;
      case "execution_interrupted":
        set({ status: "interrupted", executing: null, queueVersion: state.queueVersion + 1 });
        return;
      default:
        return;
    }
  },
}));
