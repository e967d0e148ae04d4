// Autosave every tab's workflow (the same UI JSON as "save") to localStorage, and restore it on start.
import type { Schemas } from "../api/objectInfo";
import type { Graph } from "../graph/model";
import { loadUiWorkflow, saveUiWorkflow } from "../graph/workflow";
import { useEditor } from "./editor";

export const STORAGE_KEY = "sdgraph.workflows";
const DEBOUNCE_MS = 400;

interface Saved {
  active: number;
  tabs: { name: string; workflow: unknown }[];
}

/** The saved tabs, or null when there are none or they cannot be read (the caller opens the default). */
export function restoreSaved(schemas: Schemas): { tabs: { name: string; graph: Graph }[]; active: number } | null {
  try {
    const raw = localStorage.getItem(STORAGE_KEY);
    if (!raw) return null;
    const saved = JSON.parse(raw) as Saved;
    const tabs = saved.tabs.map((t) => ({ name: String(t.name || "Workflow"), graph: loadUiWorkflow(t.workflow, schemas) }));
    return tabs.length ? { tabs, active: saved.active } : null;
  } catch (error) {
    console.warn("the autosaved workflows could not be read; opening the default", error);
    return null;
  }
}

export function startAutosave(): () => void {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const write = () => {
    const state = useEditor.getState();
    const saved: Saved = {
      active: state.tabs.findIndex((t) => t.id === state.activeTab),
      tabs: state.tabs.map((t) => ({ name: t.name, workflow: saveUiWorkflow(t.graph, state.schemas) })),
    };
    try {
      localStorage.setItem(STORAGE_KEY, JSON.stringify(saved));
    } catch (error) {
      console.warn("autosave failed", error);
    }
  };
  const unsubscribe = useEditor.subscribe((state, previous) => {
    if (!state.loaded || (state.tabs === previous.tabs && state.activeTab === previous.activeTab)) return;
    clearTimeout(timer);
    timer = setTimeout(write, DEBOUNCE_MS);
  });
  const flush = () => { clearTimeout(timer); if (useEditor.getState().loaded) write(); };
  window.addEventListener("beforeunload", flush);
  return () => { unsubscribe(); window.removeEventListener("beforeunload", flush); };
}
