// The editor's state: the server's node schemas, workflows in tabs (each with its own undo history),
// the selection. Every edit goes through `edit`, which decides how it joins the undo history.
import { create } from "zustand";
import { Schemas, type ObjectInfo } from "../api/objectInfo";
import { defaultGraph } from "../graph/defaultGraph";
import { emptyGraph, type Graph } from "../graph/model";

const HISTORY_LIMIT = 100;
const COALESCE_MS = 500;

export interface Tab {
  id: string;
  name: string;
  graph: Graph;
  past: Graph[];
  future: Graph[];
}

/** How an edit joins the undo history: one step now, merged with the edits around it (typing, nudging
 * a number), or live (a drag in progress, finished by `settle`). */
export type EditKind = "step" | "coalesce" | "live";

interface EditorState {
  schemas: Schemas;
  loaded: boolean;
  loadError: string | null;
  tabs: Tab[];
  activeTab: string;
  selectedNodes: string[];
  selectedLinks: string[];
  selectedGroup: number | null;
  /** The graph before the edits now being merged into one undo step. */
  pendingBase: Graph | null;
  /** Bumped when a whole workflow is opened, so the canvas fits it into view. */
  fitRequest: number;
  requestFit(): void;
  setObjectInfo(info: ObjectInfo): void;
  setLoadError(message: string | null): void;
  edit(change: (graph: Graph) => Graph, kind?: EditKind): void;
  settle(): void;
  /** Where the camera is (saved as the UI format's extra.ds); not an undo step. */
  setCamera(ds: { scale: number; offset: [number, number] }): void;
  undo(): void;
  redo(): void;
  select(nodes: string[], links?: string[], group?: number | null): void;
  openTab(name: string, graph: Graph): void;
  closeTab(id: string): void;
  switchTab(id: string): void;
  renameTab(id: string, name: string): void;
  restoreTabs(tabs: { name: string; graph: Graph }[], active: number): void;
}

let tabCounter = 0;
const newTabId = () => `tab-${++tabCounter}`;
let settleTimer: ReturnType<typeof setTimeout> | undefined;

function withActive(state: EditorState, change: (tab: Tab) => Tab): Tab[] {
  return state.tabs.map((tab) => (tab.id === state.activeTab ? change(tab) : tab));
}

function pushPast(past: Graph[], graph: Graph): Graph[] {
  return [...past, graph].slice(-HISTORY_LIMIT);
}

export const useEditor = create<EditorState>((set, get) => ({
  schemas: new Schemas({}),
  loaded: false,
  loadError: null,
  tabs: [{ id: newTabId(), name: "Workflow", graph: emptyGraph(), past: [], future: [] }],
  activeTab: "tab-1",
  selectedNodes: [],
  selectedLinks: [],
  selectedGroup: null,
  pendingBase: null,
  fitRequest: 0,
  requestFit: () => set((state) => ({ fitRequest: state.fitRequest + 1 })),

  setObjectInfo: (info) => set({ schemas: new Schemas(info), loaded: true, loadError: null }),
  setLoadError: (message) => set({ loadError: message }),

  edit: (change, kind = "step") => {
    const state = get();
    const tab = state.tabs.find((t) => t.id === state.activeTab)!;
    const next = change(tab.graph);
    if (next === tab.graph) return;
    if (kind === "step") {
      const base = state.pendingBase ?? tab.graph;
      set({ pendingBase: null, tabs: withActive(state, (t) => ({ ...t, graph: next, past: pushPast(t.past, base), future: [] })) });
      return;
    }
    set({ pendingBase: state.pendingBase ?? tab.graph, tabs: withActive(state, (t) => ({ ...t, graph: next })) });
    clearTimeout(settleTimer);
    if (kind === "coalesce") settleTimer = setTimeout(() => get().settle(), COALESCE_MS);
  },

  settle: () => {
    const state = get();
    clearTimeout(settleTimer);
    if (!state.pendingBase) return;
    const base = state.pendingBase;
    set({ pendingBase: null, tabs: withActive(state, (t) => (t.graph === base ? t : { ...t, past: pushPast(t.past, base), future: [] })) });
  },

  setCamera: (ds) => set((state) => ({ tabs: withActive(state, (t) => ({ ...t, graph: { ...t.graph, extra: { ...t.graph.extra, ds } } })) })),

  undo: () => {
    get().settle();
    const state = get();
    set({ tabs: withActive(state, (t) => t.past.length === 0 ? t
      : { ...t, graph: t.past[t.past.length - 1], past: t.past.slice(0, -1), future: [t.graph, ...t.future] }) });
  },

  redo: () => {
    get().settle();
    const state = get();
    set({ tabs: withActive(state, (t) => t.future.length === 0 ? t
      : { ...t, graph: t.future[0], past: pushPast(t.past, t.graph), future: t.future.slice(1) }) });
  },

  select: (nodes, links = [], group = null) => set({ selectedNodes: nodes, selectedLinks: links, selectedGroup: group }),

  openTab: (name, graph) => {
    get().settle();
    const tab: Tab = { id: newTabId(), name, graph, past: [], future: [] };
    set((state) => ({ tabs: [...state.tabs, tab], activeTab: tab.id, selectedNodes: [], selectedLinks: [] }));
  },

  closeTab: (id) => {
    get().settle();
    const state = get();
    const remaining = state.tabs.filter((t) => t.id !== id);
    if (remaining.length === 0) remaining.push({ id: newTabId(), name: "Workflow", graph: defaultGraph(state.schemas), past: [], future: [] });
    const activeTab = state.activeTab === id ? remaining[Math.max(0, state.tabs.findIndex((t) => t.id === id) - 1)]?.id ?? remaining[0].id
      : state.activeTab;
    set({ tabs: remaining, activeTab, selectedNodes: [], selectedLinks: [] });
  },

  switchTab: (id) => {
    get().settle();
    set({ activeTab: id, selectedNodes: [], selectedLinks: [] });
  },

  renameTab: (id, name) => set((state) => ({ tabs: state.tabs.map((t) => (t.id === id ? { ...t, name } : t)) })),

  restoreTabs: (tabs, active) => {
    const restored = tabs.map((t) => ({ id: newTabId(), name: t.name, graph: t.graph, past: [], future: [] }));
    set({ tabs: restored, activeTab: restored[Math.min(Math.max(active, 0), restored.length - 1)].id });
  },
}));

export function activeTab(state: Pick<EditorState, "tabs" | "activeTab"> = useEditor.getState()): Tab {
  return state.tabs.find((t) => t.id === state.activeTab) ?? state.tabs[0];
}

export function useGraph(): Graph {
  return useEditor((state) => activeTab(state).graph);
}
