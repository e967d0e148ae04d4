// The canvas: React Flow in controlled mode over the active tab's graph. Positions move live while a
// drag lasts and become one undo step when it ends; connections are checked against socket types.
import { Background, Controls, MiniMap, ReactFlow, useReactFlow, type Connection as FlowConnection, type Edge, type Node,
  type EdgeChange, type EdgeSelectionChange, type NodeChange, type NodeSelectionChange, type OnConnectEnd,
  type OnConnectStart } from "@xyflow/react";
import { useCallback, useEffect, useMemo, useRef, useState, type DragEvent, type MouseEvent } from "react";
import { addNode, classesAccepting, connect, connectionProblem, copyFragment, firstInputAccepting, groupAround, inputType,
  moveNodes, newNode, nodesInGroup, outputType, pasteFragment, removeLinks, removeNodes, toggleMode } from "../graph/edit";
import { MODE_BYPASSED, MODE_MUTED, type Graph } from "../graph/model";
import { activeTab, useEditor } from "../store/editor";
import { typeColor } from "./colors";
import { isTyping } from "./keys";
import { ContextMenu, type MenuItem } from "./ContextMenu";
import { GroupView, type GroupData } from "./GroupView";
import { NodeView, type NodeData } from "./NodeView";
import { Palette } from "./Palette";

const nodeTypes = { sd: NodeView, sdgroup: GroupView };
const GROUP_PREFIX = "group:";

interface PaletteRequest {
  screen: { x: number; y: number };
  flow: { x: number; y: number };
  only?: string[];
  /** Connect the new node to this dragged end. */
  from?: { nodeId: string; handle: string; kind: "source" | "target"; type: string; detached?: string };
}

function parseConnection(c: FlowConnection | Edge) {
  return { source: c.source, sourceSlot: Number(String(c.sourceHandle ?? "out:0").slice(4)), target: c.target,
    targetInput: String(c.targetHandle ?? "in:").slice(3) };
}

export function Canvas({ onOpenFiles }: { onOpenFiles(files: File[]): void }) {
  const graph = useEditor((s) => activeTab(s).graph);
  const schemas = useEditor((s) => s.schemas);
  const selectedNodes = useEditor((s) => s.selectedNodes);
  const selectedLinks = useEditor((s) => s.selectedLinks);
  const selectedGroup = useEditor((s) => s.selectedGroup);
  const { edit, settle, select } = useEditor.getState();
  const flow = useReactFlow();
  const [palette, setPalette] = useState<PaletteRequest | null>(null);
  const [menu, setMenu] = useState<{ at: { x: number; y: number }; items: MenuItem[] } | null>(null);
  const dragging = useRef<PaletteRequest["from"] | null>(null);
  // Measured sizes live beside the graph, not in it: they are the browser's, not the workflow's.
  const [measured, setMeasured] = useState<Record<string, { width: number; height: number }>>({});

  const nodes = useMemo<Node[]>(() => [
    ...graph.groups.map((group, index): Node<GroupData> => ({
      id: `${GROUP_PREFIX}${index}`, type: "sdgroup", position: { x: group.bounding[0], y: group.bounding[1] },
      width: group.bounding[2], height: group.bounding[3], zIndex: -1, data: { index }, selected: selectedGroup === index,
      dragHandle: ".sd-group-title",
    })),
    ...graph.nodes.map((n): Node<NodeData> => ({
      id: n.id, type: "sd", position: { x: n.pos[0], y: n.pos[1] }, data: { nodeId: n.id }, selected: selectedNodes.includes(n.id),
      measured: measured[n.id],
      style: n.size && n.classType !== "Reroute" ? { width: Math.max(180, n.size[0]) } : undefined,
    })),
  ], [graph.nodes, graph.groups, selectedNodes, selectedGroup, measured]);

  const edges = useMemo<Edge[]>(() => graph.links.map((link) => ({
    id: link.id, source: link.source, target: link.target, sourceHandle: `out:${link.sourceSlot}`, targetHandle: `in:${link.targetInput}`,
    selected: selectedLinks.includes(link.id), data: { type: link.type },
    style: { stroke: typeColor(link.type), strokeWidth: selectedLinks.includes(link.id) ? 4 : 2 },
  })), [graph.links, selectedLinks]);

  const onNodesChange = useCallback((changes: NodeChange[]) => {
    applySelection(changes.filter((c): c is NodeSelectionChange => c.type === "select"), select);
    const sizes = changes.flatMap((c) => (c.type === "dimensions" && c.dimensions ? [[c.id, c.dimensions] as const] : []));
    if (sizes.length) setMeasured((old) => ({ ...old, ...Object.fromEntries(sizes) }));
    let finished = false;
    edit((g) => {
      let next = g;
      const moved = new Map<string, [number, number]>();
      for (const change of changes) {
        if (change.type !== "position" || !change.position) {
          if (change.type === "position" && change.dragging === false) finished = true;
          continue;
        }
        if (change.id.startsWith(GROUP_PREFIX)) {
          const index = Number(change.id.slice(GROUP_PREFIX.length));
          const group = next.groups[index];
          const dx = change.position.x - group.bounding[0];
          const dy = change.position.y - group.bounding[1];
          for (const id of nodesInGroup(next, group)) {
            const node = next.nodes.find((n) => n.id === id)!;
            moved.set(id, [node.pos[0] + dx, node.pos[1] + dy]);
          }
          next = { ...next, groups: next.groups.map((x, i) => (i === index ? { ...x, bounding: [change.position!.x, change.position!.y, x.bounding[2], x.bounding[3]] } : x)) };
        } else {
          moved.set(change.id, [Math.round(change.position.x), Math.round(change.position.y)]);
        }
        if (change.dragging === false) finished = true;
      }
      return moved.size ? moveNodes(next, moved) : next;
    }, "live");
    if (finished) settle();
  }, [edit, settle, select]);

  const onEdgesChange = useCallback((changes: EdgeChange[]) => {
    const picked = changes.filter((c): c is EdgeSelectionChange => c.type === "select");
    if (picked.length === 0) return;
    const state = useEditor.getState();
    const links = new Set(state.selectedLinks);
    for (const change of picked) {
      if (change.selected) links.add(change.id); else links.delete(change.id);
    }
    select(state.selectedNodes, [...links], state.selectedGroup);
  }, [select]);

  const onDelete = useCallback(({ nodes: gone, edges: goneEdges }: { nodes: Node[]; edges: Edge[] }) => {
    const groups = new Set(gone.filter((n) => n.id.startsWith(GROUP_PREFIX)).map((n) => Number(n.id.slice(GROUP_PREFIX.length))));
    edit((g) => {
      const withoutLinks = removeLinks(g, new Set(goneEdges.map((e) => e.id)));
      const withoutNodes = removeNodes(withoutLinks, new Set(gone.filter((n) => !n.id.startsWith(GROUP_PREFIX)).map((n) => n.id)));
      return groups.size ? { ...withoutNodes, groups: withoutNodes.groups.filter((_, i) => !groups.has(i)) } : withoutNodes;
    });
    select([], []);
  }, [edit, select]);

  const isValidConnection = useCallback((c: FlowConnection | Edge) => {
    const state = useEditor.getState();
    return connectionProblem(activeTab(state).graph, state.schemas, parseConnection(c)) === null;
  }, []);

  const onConnect = useCallback((c: FlowConnection) => edit((g) => connect(g, useEditor.getState().schemas, parseConnection(c))), [edit]);

  const onConnectStart: OnConnectStart = useCallback((_, params) => {
    const state = useEditor.getState();
    const g = activeTab(state).graph;
    if (!params.nodeId || !params.handleId) return;
    const kind = params.handleType === "target" ? "target" : "source";
    const type = kind === "source" ? outputType(g, state.schemas, params.nodeId, Number(params.handleId.slice(4)))
      : inputType(g, state.schemas, params.nodeId, params.handleId.slice(3));
    const detached = kind === "target" ? g.links.find((l) => l.target === params.nodeId && `in:${l.targetInput}` === params.handleId) : undefined;
    dragging.current = { nodeId: params.nodeId, handle: params.handleId, kind, type: type ?? "*", detached: detached?.id };
  }, []);

  const onConnectEnd: OnConnectEnd = useCallback((event, state) => {
    const from = dragging.current;
    dragging.current = null;
    if (!from || state.isValid || state.toNode) return;
    if (from.detached) {
      // A link pulled off its input and let go on nothing is removed, as in ComfyUI.
      edit((g) => removeLinks(g, new Set([from.detached!])));
      return;
    }
    const point = "changedTouches" in event ? event.changedTouches[0] : event;
    const schemasNow = useEditor.getState().schemas;
    const widgetInput = ["INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"].includes(from.type);
    const only = from.kind === "source" ? classesAccepting(schemasNow, from.type)
      : [...(widgetInput ? ["PrimitiveNode"] : []),
        ...schemasNow.classNames().filter((c) => schemasNow.get(c)!.outputs.some((o) => o.type === from.type || from.type === "*"))];
    setPalette({ screen: { x: point.clientX, y: point.clientY }, flow: flow.screenToFlowPosition({ x: point.clientX, y: point.clientY }), only, from });
  }, [flow, edit]);

  const pickNode = useCallback((classType: string) => {
    const request = palette;
    setPalette(null);
    if (!request) return;
    edit((g) => {
      const state = useEditor.getState();
      const node = newNode(g, state.schemas, classType, [Math.round(request.flow.x), Math.round(request.flow.y)]);
      let next = addNode(g, node);
      const from = request.from;
      if (from?.kind === "source") {
        const input = firstInputAccepting(state.schemas, classType, from.type);
        if (input) next = connect(next, state.schemas, { source: from.nodeId, sourceSlot: Number(from.handle.slice(4)), target: node.id, targetInput: input });
      } else if (from?.kind === "target") {
        const slot = state.schemas.get(classType)?.outputs.findIndex((o) => o.type === from.type || from.type === "*" || o.type === "*") ?? -1;
        if (slot >= 0) next = connect(next, state.schemas, { source: node.id, sourceSlot: slot, target: from.nodeId, targetInput: from.handle.slice(3) });
      }
      select([node.id]);
      return next;
    });
  }, [palette, edit, select]);

  const onDoubleClick = useCallback((event: MouseEvent) => {
    if (!(event.target as HTMLElement).classList.contains("react-flow__pane")) return;
    setPalette({ screen: { x: event.clientX, y: event.clientY }, flow: flow.screenToFlowPosition({ x: event.clientX, y: event.clientY }) });
  }, [flow]);

  const wrapper = useRef<HTMLDivElement>(null);
  const fitRequest = useEditor((s) => s.fitRequest);
  useEffect(() => {
    if (fitRequest) requestAnimationFrame(() => flow.fitView({ padding: 0.1, maxZoom: 1 }));
  }, [fitRequest, flow]);
  useEffect(() => {
    const onKey = (event: KeyboardEvent) => {
      if (isTyping(event.target) || !(event.key === "/" || (event.key.toLowerCase() === "k" && (event.ctrlKey || event.metaKey)))) return;
      event.preventDefault();
      const box = wrapper.current!.getBoundingClientRect();
      const screen = { x: box.left + box.width / 2 - 160, y: box.top + box.height / 3 };
      setPalette({ screen, flow: flow.screenToFlowPosition({ x: box.left + box.width / 2, y: box.top + box.height / 2 }) });
    };
    document.addEventListener("keydown", onKey);
    return () => document.removeEventListener("keydown", onKey);
  }, [flow]);

  const onReconnect = useCallback((old: Edge, c: FlowConnection) => edit((g) => {
    const state = useEditor.getState();
    return connect(removeLinks(g, new Set([old.id])), state.schemas, parseConnection(c));
  }), [edit]);

  // A link dragged off its input and let go on nothing is removed, as in ComfyUI.
  const onReconnectEnd = useCallback((_: unknown, old: Edge, __: unknown, state: { isValid: boolean | null }) => {
    if (!state.isValid) edit((g) => removeLinks(g, new Set([old.id])));
  }, [edit]);

  const camera = useMemo(() => {
    const ds = activeTab(useEditor.getState()).graph.extra.ds as { scale?: number; offset?: number[] } | undefined;
    if (!ds || typeof ds.scale !== "number" || !Array.isArray(ds.offset)) return null;
    // litegraph draws at (pos + offset) * scale; React Flow at pos * zoom + (x, y)
    return { x: Number(ds.offset[0]) * ds.scale, y: Number(ds.offset[1]) * ds.scale, zoom: ds.scale };
  }, []);

  const onNodeContextMenu = useCallback((event: MouseEvent, clicked: Node) => {
    event.preventDefault();
    if (clicked.id.startsWith(GROUP_PREFIX)) {
      const index = Number(clicked.id.slice(GROUP_PREFIX.length));
      setMenu({ at: { x: event.clientX, y: event.clientY }, items: [
        { label: "Remove group (keep its nodes)", run: () => edit((g) => ({ ...g, groups: g.groups.filter((_, i) => i !== index) })) },
        { label: "Select its nodes", run: () => select(nodesInGroup(activeTab().graph, activeTab().graph.groups[index])) },
      ] });
      return;
    }
    const selected = useEditor.getState().selectedNodes;
    const ids = new Set(selected.includes(clicked.id) ? selected : [clicked.id]);
    if (!selected.includes(clicked.id)) select([clicked.id]);
    setMenu({ at: { x: event.clientX, y: event.clientY }, items: nodeMenu(ids, edit) });
  }, [edit, select]);

  const onPaneContextMenu = useCallback((event: MouseEvent | globalThis.MouseEvent) => {
    event.preventDefault();
    const at = { x: event.clientX, y: event.clientY };
    setMenu({ at, items: [
      { label: "Add node…", shortcut: "/", run: () => setPalette({ screen: at, flow: flow.screenToFlowPosition(at) }) },
      { label: "Fit view", run: () => flow.fitView({ padding: 0.1, maxZoom: 1 }) },
    ] });
  }, [flow]);

  const onDrop = useCallback((event: DragEvent) => {
    if (!event.dataTransfer?.files?.length) return;
    event.preventDefault();
    onOpenFiles([...event.dataTransfer.files]);
  }, [onOpenFiles]);

  return (
    <div className="canvas" ref={wrapper} onDoubleClick={onDoubleClick} onDragOver={(e) => e.preventDefault()} onDrop={onDrop}>
      <ReactFlow nodes={nodes} edges={edges} nodeTypes={nodeTypes} onNodesChange={onNodesChange} onEdgesChange={onEdgesChange}
        onDelete={onDelete} onConnect={onConnect} onConnectStart={onConnectStart} onConnectEnd={onConnectEnd}
        isValidConnection={isValidConnection} onReconnect={onReconnect} onReconnectEnd={onReconnectEnd}
        onMoveEnd={(_, viewport) => useEditor.getState().setCamera({ scale: viewport.zoom, offset: [viewport.x / viewport.zoom, viewport.y / viewport.zoom] })} zoomOnDoubleClick={false} deleteKeyCode={["Delete", "Backspace"]}
        multiSelectionKeyCode={["Shift", "Control", "Meta"]} selectionKeyCode="Shift" minZoom={0.1} maxZoom={4}
        onNodeContextMenu={onNodeContextMenu} onPaneContextMenu={onPaneContextMenu}
        onPaneClick={() => setPalette(null)} defaultViewport={camera ?? { x: 0, y: 0, zoom: 1 }} fitView={!camera} fitViewOptions={{ maxZoom: 1, padding: 0.1 }} colorMode="dark" proOptions={{ hideAttribution: true }}>
        <Background gap={20} color="#333" />
        <Controls showInteractive={false} />
        <MiniMap pannable zoomable style={{ width: 170, height: 120 }} nodeColor={(n) => (n.type === "sdgroup" ? "#3f789e55" : "#888")} />
      </ReactFlow>
      {menu && <ContextMenu at={menu.at} items={menu.items} onClose={() => setMenu(null)} />}
      {palette && <Palette schemas={schemas} only={palette.only} screen={palette.screen} onPick={pickNode} onClose={() => setPalette(null)} />}
    </div>
  );
}

function nodeMenu(ids: Set<string>, edit: (change: (g: Graph) => Graph) => void): MenuItem[] {
  const one = ids.size === 1 ? [...ids][0] : null;
  return [
    ...(one ? [{ label: "Rename", run: () => document.querySelector<HTMLElement>(`[data-testid="title-${one}"]`)
      ?.dispatchEvent(new MouseEvent("dblclick", { bubbles: true })) }] : []),
    { label: "Mute", shortcut: "Ctrl+M", run: () => edit((g) => toggleMode(g, ids, MODE_MUTED)) },
    { label: "Bypass", shortcut: "Ctrl+B", run: () => edit((g) => toggleMode(g, ids, MODE_BYPASSED)) },
    { label: "Duplicate", shortcut: "Ctrl+D", run: () => edit((g) => pasteFragment(g, copyFragment(g, ids), [40, 40]).graph) },
    { label: "Group", shortcut: "Ctrl+G", run: () => edit((g) => groupAround(g, ids)) },
    { label: "Delete", shortcut: "Del", run: () => edit((g) => removeNodes(g, ids)) },
  ];
}

/** Clicks and box selections arrive as changes to apply, since the selection lives in the store. */
function applySelection(changes: NodeSelectionChange[], select: (nodes: string[], links?: string[], group?: number | null) => void): void {
  if (changes.length === 0) return;
  const state = useEditor.getState();
  const nodes = new Set(state.selectedNodes);
  let group = state.selectedGroup;
  for (const change of changes) {
    if (change.id.startsWith(GROUP_PREFIX)) {
      const index = Number(change.id.slice(GROUP_PREFIX.length));
      if (change.selected) group = index; else if (group === index) group = null;
    } else if (change.selected) nodes.add(change.id);
    else nodes.delete(change.id);
  }
  select([...nodes], state.selectedLinks, group);
}
