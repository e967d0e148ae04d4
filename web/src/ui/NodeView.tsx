// A node on the canvas: title, input sockets on the left, widgets (each with its own target handle, so a
// link can feed it), outputs on the right, run state (highlight, progress, preview, images, errors).
import { Handle, Position, type NodeProps } from "@xyflow/react";
import { memo, useCallback, useState } from "react";
import { viewUrl } from "../api/client";
import { type SocketSpec, type WidgetSpec } from "../api/objectInfo";
import { isCollapsed, setControl, setWidgetValue, toggleCollapse, updateNode, widgetFor } from "../graph/edit";
import { MODE_BYPASSED, MODE_MUTED } from "../graph/model";
import { outputSlots, widgetSocketType } from "../graph/workflow";
import { activeTab, useEditor, type EditKind } from "../store/editor";
import { useRun } from "../store/run";
import { typeColor } from "./colors";
import { ControlSelect, WidgetEditor } from "./Widgets";

export interface NodeData extends Record<string, unknown> {
  nodeId: string;
}

function InputHandle({ name, type }: { name: string; type: string }) {
  return <Handle type="target" position={Position.Left} id={`in:${name}`} className="socket" style={{ background: typeColor(type) }} />;
}

function NodeViewInner({ data, selected }: NodeProps & { data: NodeData }) {
  const nodeId = data.nodeId;
  const node = useEditor((s) => activeTab(s).graph.nodes.find((n) => n.id === nodeId));
  // Only what this node shows, so an edit elsewhere re-renders no other node (a primitive borrows its
  // widget from the node it feeds, and so follows the whole graph).
  const linkedKey = useEditor((s) => activeTab(s).graph.links.filter((l) => l.target === nodeId).map((l) => `${l.targetInput}\u0000${l.type}`).join("\u0001"));
  const graph = useEditor((s) => (node?.primitive || node?.classType === "Reroute" ? activeTab(s).graph : null));
  const schemas = useEditor((s) => s.schemas);
  const edit = useEditor((s) => s.edit);
  const settle = useEditor((s) => s.settle);
  const executing = useRun((s) => s.executing === nodeId);
  const progress = useRun((s) => s.progress[nodeId]);
  const cached = useRun((s) => s.cached.includes(nodeId));
  const images = useRun((s) => s.images[nodeId]);
  const preview = useRun((s) => (s.preview?.nodeId === nodeId ? s.preview.url : null));
  const problems = useRun((s) => s.problems[nodeId]);
  const [renaming, setRenaming] = useState(false);
  const change = useCallback((name: string, value: unknown, kind: EditKind) => edit((g) => setWidgetValue(g, nodeId, name, value), kind), [edit, nodeId]);
  if (!node) return null;
  const schema = schemas.get(node.classType);
  const incoming = linkedKey ? linkedKey.split("\u0001").map((entry) => entry.split("\u0000")) : [];
  const linkedInputs = new Set(incoming.map(([input]) => input));
  const problemFor = (input: string) => problems?.filter((p) => p.input === input).map((p) => p.message).join("; ");
  const generalProblems = problems?.filter((p) => !p.input || !schema?.inputOrder.includes(p.input)) ?? [];
  const classes = ["sd-node", selected && "selected", executing && "running", cached && "cached", problems?.length && "error",
    node.mode === MODE_MUTED && "muted", node.mode === MODE_BYPASSED && "bypassed", !schema && "unknown",
    node.classType === "Reroute" && "reroute"].filter(Boolean).join(" ");
  const color = node.saved.bgcolor as string | undefined;

  if (node.classType === "Reroute") {
    const type = incoming[0]?.[1] ?? "*";
    return (
      <div className={classes} data-testid={`node-${nodeId}`}>
        <InputHandle name="" type={type} />
        <span className="reroute-dot" style={{ background: typeColor(type) }} />
        <Handle type="source" position={Position.Right} id="out:0" className="socket" style={{ background: typeColor(type) }} />
      </div>
    );
  }

  const sockets: SocketSpec[] = node.unknownSlots
    ? node.unknownSlots.inputs.filter((s) => !s.widget).map((s) => ({ name: s.name, type: s.type, optional: false }))
    : schema?.sockets ?? [];
  const widgets: WidgetSpec[] = node.primitive
    ? [graph && widgetFor(graph, schemas, node, "value")].filter((w): w is WidgetSpec => !!w)
    : schema?.widgets ?? [];
  const outputs = outputSlots(node, schema);
  const isDisplayOnly = node.classType === "Note" || node.classType === "MarkdownNote";
  const collapsed = isCollapsed(node);
  const toggleCollapsed = () => edit((g) => toggleCollapse(g, new Set([nodeId])));
  if (collapsed) {
    // Every handle stays (links must keep their ends), gathered at the title's edges.
    return (
      <div className={`${classes} collapsed`} data-testid={`node-${nodeId}`}>
        <div className="sd-title" style={node.saved.color ? { background: node.saved.color as string } : undefined}>
          <button type="button" className="collapse nodrag" title="expand" aria-label="expand" onClick={toggleCollapsed}>▸</button>
          <span data-testid={`title-${nodeId}`}>{node.title ?? schema?.title ?? node.classType}</span>
          {(node.primitive || isDisplayOnly ? [] : [...sockets, ...widgets.map((w) => ({ name: w.name, type: widgetSocketType(w) }))])
            .map((slot) => <InputHandle key={slot.name} name={slot.name} type={slot.type} />)}
          {outputs.map((slot, index) => (
            <Handle key={index} type="source" position={Position.Right} id={`out:${index}`} className="socket" style={{ background: typeColor(slot.type) }} />
          ))}
        </div>
      </div>
    );
  }
  return (
    <div className={classes} data-testid={`node-${nodeId}`} style={color ? { background: color } : undefined}>
      <div className="sd-title" style={node.saved.color ? { background: node.saved.color as string } : undefined}
        title={schema?.description || node.classType}>
        <button type="button" className="collapse nodrag" title="collapse" aria-label="collapse" onClick={toggleCollapsed}>▾</button>
        {renaming ? (
          <input autoFocus className="nodrag title-edit" data-testid={`title-edit-${nodeId}`} defaultValue={node.title ?? schema?.title ?? node.classType}
            onBlur={(e) => { const title = e.target.value.trim(); setRenaming(false);
              edit((g) => updateNode(g, nodeId, (n) => ({ ...n, title: title && title !== schema?.title ? title : undefined }))); }}
            onKeyDown={(e) => { if (e.key === "Enter" || e.key === "Escape") (e.target as HTMLInputElement).blur(); }} />
        ) : (
          <span data-testid={`title-${nodeId}`} onDoubleClick={(e) => { e.stopPropagation(); setRenaming(true); }} title="double-click to rename">
            {node.title ?? schema?.title ?? node.classType}
          </span>
        )}
        {cached && <small className="badge">cached</small>}
        {node.mode === MODE_MUTED && <small className="badge">muted</small>}
        {node.mode === MODE_BYPASSED && <small className="badge">bypassed</small>}
      </div>
      {progress && (
        <div className="progress" data-testid={`progress-${nodeId}`} title={`${progress.value} / ${progress.max}`}>
          <div style={{ width: `${Math.round((100 * progress.value) / Math.max(1, progress.max))}%` }} />
        </div>
      )}
      {!schema && !node.primitive && <div className="unknown-note">{node.classType} is not installed on the server</div>}
      <div className="sd-body">
        <div className="sd-slots">
          <div className="sd-inputs">
            {sockets.map((socket) => (
              <div key={socket.name} className={`slot-row${problemFor(socket.name) ? " input-error" : ""}`} data-testid={`input-${nodeId}-${socket.name}`}
                title={problemFor(socket.name) || socket.tooltip || socket.type}>
                <InputHandle name={socket.name} type={socket.type} />
                <span>{socket.name}</span>
              </div>
            ))}
          </div>
          <div className="sd-outputs">
            {outputs.map((slot, index) => (
              <div key={index} className="slot-row out">
                <span>{slot.name}</span>
                <Handle type="source" position={Position.Right} id={`out:${index}`} className="socket" style={{ background: typeColor(slot.type) }} />
              </div>
            ))}
          </div>
        </div>
        {widgets.map((widget) => {
          const name = node.primitive ? "value" : widget.name;
          const problem = problemFor(widget.name);
          const linked = linkedInputs.has(widget.name);
          return (
            <div key={name} className={`widget-row${problem ? " input-error" : ""}`} data-testid={`input-${nodeId}-${widget.name}`} title={problem || (widget.options.tooltip as string | undefined)}>
              {!node.primitive && !isDisplayOnly && <InputHandle name={widget.name} type={widgetSocketType(widget)} />}
              {linked ? <span className="linked">{widget.name} ← linked</span> : (
                <WidgetEditor testId={`w-${nodeId}-${name}`} widget={widget} value={node.values[name]}
                  onChange={(value, kind) => change(name, value, kind)} onCommit={settle} />
              )}
              {widget.control && !linked && (
                <ControlSelect testId={`w-${nodeId}-${name}-control`} mode={node.controls[name] ?? "fixed"}
                  onChange={(mode) => edit((g) => setControl(g, nodeId, name, mode))} />
              )}
              {problem && <div className="problem">{problem}</div>}
            </div>
          );
        })}
        {node.primitive && widgets.length === 0 && <div className="hint">connect to a widget input</div>}
        {generalProblems.map((p, i) => <div key={i} className="problem" data-testid={`problem-${nodeId}`}>{p.message}</div>)}
        {preview && <img className="preview" data-testid="preview" src={preview} alt="live preview" />}
        {images?.map((image, i) => (
          <img key={i} className="result" data-testid={`result-${nodeId}`} src={viewUrl(image)} alt={image.filename} />
        ))}
      </div>
    </div>
  );
}

export const NodeView = memo(NodeViewInner);
