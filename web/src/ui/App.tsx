// The editor page: toolbar, canvas, queue panel; start-up (schemas, autosave, websocket) and shortcuts.
import { ReactFlowProvider } from "@xyflow/react";
import { useCallback, useEffect, useState } from "react";
import { fetchObjectInfo, type HistoryEntry } from "../api/client";
import { connectSocket, newClientId } from "../api/ws";
import { defaultGraph } from "../graph/defaultGraph";
import { copyFragment, groupAround, pasteFragment, toggleCollapse, toggleMode, type Fragment } from "../graph/edit";
import { MODE_BYPASSED, MODE_MUTED } from "../graph/model";
import { activeTab, useEditor } from "../store/editor";
import { restoreSaved, startAutosave } from "../store/autosave";
import { clientId, queueActive } from "../store/queue";
import { useRun } from "../store/run";
import { Canvas } from "./Canvas";
import { graphFromFile, graphFromJson, saveWorkflowFile } from "./files";
import { isTyping } from "./keys";
import { QueuePanel } from "./QueuePanel";
import { Toolbar } from "./Toolbar";
import "./editor.css";

let clipboard: Fragment | null = null;

function selection(): Set<string> {
  return new Set(useEditor.getState().selectedNodes);
}

function copySelection(): void {
  const ids = selection();
  if (ids.size) clipboard = structuredClone(copyFragment(activeTab().graph, ids));
}

function paste(): void {
  if (!clipboard) return;
  const fragment = clipboard;
  let pasted: string[] = [];
  useEditor.getState().edit((g) => {
    const result = pasteFragment(g, fragment, [40, 40]);
    pasted = result.ids;
    return result.graph;
  });
  useEditor.getState().select(pasted);
  clipboard = { nodes: fragment.nodes.map((n) => ({ ...n, pos: [n.pos[0] + 40, n.pos[1] + 40] })), links: fragment.links };
}

function onShortcut(event: KeyboardEvent, openPicker: () => void): void {
  const ctrl = event.ctrlKey || event.metaKey;
  const key = event.key.toLowerCase();
  const { undo, redo, edit, select } = useEditor.getState();
  if (ctrl && key === "enter") { event.preventDefault(); queueActive(1); return; }
  if (ctrl && key === "s") {
    event.preventDefault();
    const state = useEditor.getState();
    saveWorkflowFile(activeTab(state).name, activeTab(state).graph, state.schemas);
    return;
  }
  if (ctrl && key === "o") { event.preventDefault(); openPicker(); return; }
  if (isTyping(event.target)) return;
  if (ctrl && key === "z" && !event.shiftKey) { event.preventDefault(); undo(); }
  else if (ctrl && (key === "y" || (key === "z" && event.shiftKey))) { event.preventDefault(); redo(); }
  else if (ctrl && key === "c") copySelection();
  else if (ctrl && key === "v") paste();
  else if (ctrl && key === "d") { event.preventDefault(); copySelection(); paste(); }
  else if (ctrl && key === "a") { event.preventDefault(); select(activeTab().graph.nodes.map((n) => n.id)); }
  else if (ctrl && key === "m") { event.preventDefault(); edit((g) => toggleMode(g, selection(), MODE_MUTED)); }
  else if (ctrl && key === "b") { event.preventDefault(); edit((g) => toggleMode(g, selection(), MODE_BYPASSED)); }
  else if (ctrl && key === "g") { event.preventDefault(); edit((g) => groupAround(g, selection())); }
  else if (event.altKey && key === "c") { event.preventDefault(); edit((g) => toggleCollapse(g, selection())); }
}

function ErrorDialog() {
  const failure = useRun((s) => s.failure);
  const dismiss = useRun((s) => s.dismissFailure);
  if (!failure) return null;
  return (
    <div className="dialog-backdrop" onClick={dismiss}>
      <div className="dialog" role="alertdialog" data-testid="error-dialog" onClick={(e) => e.stopPropagation()}>
        <h3>{failure.nodeType} (node {failure.nodeId}) failed</h3>
        <p>{failure.message}</p>
        {failure.traceback.length > 0 && <pre>{failure.traceback.join("")}</pre>}
        <button type="button" autoFocus onClick={dismiss}>Close</button>
      </div>
    </div>
  );
}

export function App() {
  const [ready, setReady] = useState(false);
  const loadError = useEditor((s) => s.loadError);
  const [showQueue, setShowQueue] = useState(false);
  const [notice, setNotice] = useState<string | null>(null);

  const openFiles = useCallback(async (files: File[]) => {
    for (const file of files) {
      try {
        const graph = await graphFromFile(file, useEditor.getState().schemas);
        useEditor.getState().edit(() => graph);
        useEditor.getState().renameTab(useEditor.getState().activeTab, file.name.replace(/\.(json|png)$/i, ""));
        useEditor.getState().requestFit();
        setNotice(null);
      } catch (error) {
        setNotice((error as Error).message);
      }
    }
  }, []);

  const refresh = useCallback(async () => {
    try {
      useEditor.getState().setObjectInfo(await fetchObjectInfo());
    } catch (error) {
      useEditor.getState().setLoadError(`the node types could not be loaded: ${(error as Error).message}`);
    }
  }, []);

  useEffect(() => {
    let stopAutosave = () => {};
    (async () => {
      await refresh();
      const state = useEditor.getState();
      const saved = restoreSaved(state.schemas);
      if (saved) state.restoreTabs(saved.tabs, saved.active);
      else state.restoreTabs([{ name: "Workflow", graph: defaultGraph(state.schemas) }], 0);
      stopAutosave = startAutosave();
      setReady(true);
    })();
    return () => stopAutosave();
  }, [refresh]);

  useEffect(() => {
    clientId.value ||= newClientId();
    const run = useRun.getState();
    return connectSocket(clientId.value, { onMessage: run.handle, onPreview: run.showPreview, onConnection: run.setConnected });
  }, []);

  useEffect(() => {
    const openPicker = () => document.querySelector<HTMLInputElement>('[data-testid="open-file"]')?.click();
    const handler = (event: KeyboardEvent) => onShortcut(event, openPicker);
    document.addEventListener("keydown", handler);
    return () => document.removeEventListener("keydown", handler);
  }, []);

  const openPast = useCallback((entry: HistoryEntry) => {
    const schemas = useEditor.getState().schemas;
    const extra = entry.prompt[3] as { extra_pnginfo?: { workflow?: unknown } } | undefined;
    try {
      const graph = graphFromJson(extra?.extra_pnginfo?.workflow ?? entry.prompt[2], schemas);
      useEditor.getState().openTab(`#${entry.prompt[0]}`, graph);
    } catch (error) {
      setNotice((error as Error).message);
    }
  }, []);

  const newTab = useCallback(() => useEditor.getState().openTab("Workflow", defaultGraph(useEditor.getState().schemas)), []);

  return (
    <ReactFlowProvider>
      <div className="app">
        <Toolbar onOpenFiles={openFiles} onNewTab={newTab} onRefresh={refresh} onToggleQueue={() => setShowQueue((v) => !v)} />
        {(loadError || notice) && <div className="notice" data-testid="notice">{loadError ?? notice}</div>}
        <main>
          {ready ? <Canvas key={useEditor.getState().activeTab} onOpenFiles={openFiles} /> : <div className="loading">loading node types…</div>}
          {showQueue && <QueuePanel onOpenPast={openPast} />}
        </main>
        <ErrorDialog />
      </div>
    </ReactFlowProvider>
  );
}
