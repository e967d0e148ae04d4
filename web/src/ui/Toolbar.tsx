// The bar across the top: workflow tabs, file actions, undo/redo, queue with batch count, run status.
import { useRef, useState } from "react";
import { interrupt } from "../api/client";
import { activeTab, useEditor } from "../store/editor";
import { queueActive } from "../store/queue";
import { useRun } from "../store/run";
import { saveApiFile, saveWorkflowFile } from "./files";

export interface ToolbarProps {
  onOpenFiles(files: File[]): void;
  onNewTab(): void;
  onRefresh(): void;
  onToggleQueue(): void;
}

export function Toolbar({ onOpenFiles, onNewTab, onRefresh, onToggleQueue }: ToolbarProps) {
  const tabs = useEditor((s) => s.tabs);
  const active = useEditor((s) => s.activeTab);
  const canUndo = useEditor((s) => activeTab(s).past.length > 0 || s.pendingBase !== null);
  const canRedo = useEditor((s) => activeTab(s).future.length > 0);
  const { switchTab, closeTab, renameTab, undo, redo } = useEditor.getState();
  const status = useRun((s) => s.status);
  const remaining = useRun((s) => s.queueRemaining);
  const connected = useRun((s) => s.connected);
  const message = useRun((s) => s.message);
  const [batch, setBatch] = useState(1);
  const [renaming, setRenaming] = useState<string | null>(null);
  const picker = useRef<HTMLInputElement>(null);
  const save = (api: boolean) => {
    const state = useEditor.getState();
    const tab = activeTab(state);
    (api ? saveApiFile : saveWorkflowFile)(tab.name, tab.graph, state.schemas);
  };
  return (
    <header className="toolbar">
      <nav className="tabs" role="tablist">
        {tabs.map((tab) => (
          <span key={tab.id} role="tab" aria-selected={tab.id === active} className={`tab${tab.id === active ? " active" : ""}`}
            data-testid="tab" onClick={() => switchTab(tab.id)} onDoubleClick={() => setRenaming(tab.id)}>
            {renaming === tab.id ? (
              <input autoFocus defaultValue={tab.name} onBlur={(e) => { renameTab(tab.id, e.target.value || tab.name); setRenaming(null); }}
                onKeyDown={(e) => e.key === "Enter" && (e.target as HTMLInputElement).blur()} />
            ) : tab.name}
            <button type="button" className="close" title="close this workflow" onClick={(e) => { e.stopPropagation(); closeTab(tab.id); }}>×</button>
          </span>
        ))}
        <button type="button" data-testid="new-tab" title="new workflow" onClick={onNewTab}>+</button>
      </nav>
      <div className="actions">
        <button type="button" onClick={() => picker.current?.click()} title="open a workflow (Ctrl+O)">Open</button>
        <input ref={picker} data-testid="open-file" type="file" accept=".json,.png,application/json,image/png" hidden
          onChange={(e) => { onOpenFiles([...(e.target.files ?? [])]); e.target.value = ""; }} />
        <button type="button" onClick={() => save(false)} title="save the workflow as JSON (Ctrl+S)">Save</button>
        <button type="button" onClick={() => save(true)} title="export the API-format prompt">Export API</button>
        <button type="button" data-testid="undo" disabled={!canUndo} onClick={undo} title="undo (Ctrl+Z)">↶</button>
        <button type="button" data-testid="redo" disabled={!canRedo} onClick={redo} title="redo (Ctrl+Shift+Z)">↷</button>
        <button type="button" onClick={onRefresh} title="reload node types and model lists">Refresh</button>
        <button type="button" onClick={onToggleQueue} data-testid="toggle-queue" title="queue and history">Queue ({remaining})</button>
      </div>
      <div className="run">
        <label title="how many times to queue">×<input data-testid="batch" type="number" min={1} max={100} value={batch}
          onChange={(e) => setBatch(Math.max(1, Math.min(100, Number(e.target.value) || 1)))} /></label>
        <button type="button" className="primary" data-testid="queue" onClick={() => queueActive(batch)} title="queue (Ctrl+Enter)">Queue</button>
        <button type="button" data-testid="interrupt" onClick={() => interrupt()} title="stop the running prompt">Stop</button>
        <span className={`status ${status}`} data-testid="status">{status}</span>
        <span className={`connection${connected ? " up" : ""}`} title={connected ? "connected" : "reconnecting…"} />
      </div>
      {message && <div className="message" data-testid="message">{message}</div>}
    </header>
  );
}
