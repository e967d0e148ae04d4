// Edits on the graph as pure functions: each takes a graph and returns a new one, so undo keeps snapshots.
import { typesCompatible, type Schemas, type WidgetSpec } from "../api/objectInfo";
import { primitiveWidget } from "./control";
import { MODE_NORMAL, nextLinkId, nextNodeId, type Graph, type GraphLink, type GraphNode, type Group,
  type NodeMode } from "./model";
import { outputSlots, widgetSocketType } from "./workflow";

export function newNode(graph: Graph, schemas: Schemas, classType: string, pos: [number, number]): GraphNode {
  const schema = schemas.get(classType);
  const node: GraphNode = { id: nextNodeId(graph), classType, pos, mode: MODE_NORMAL, values: {}, controls: {}, saved: {} };
  for (const widget of schema?.widgets ?? []) {
    node.values[widget.name] = widget.defaultValue;
    if (widget.control) node.controls[widget.name] = "randomize"; // ComfyUI's default for new nodes
  }
  if (classType === "PrimitiveNode") node.primitive = { type: "*", widget: "", config: null };
  return node;
}

export function addNode(graph: Graph, node: GraphNode): Graph {
  return { ...graph, nodes: [...graph.nodes, node], lastNodeId: Math.max(graph.lastNodeId, Number(node.id) || 0) };
}

/** The type an input accepts: a socket's type, or a widget's primitive type (a converted widget). */
export function inputType(graph: Graph, schemas: Schemas, nodeId: string, input: string): string | undefined {
  const node = graph.nodes.find((n) => n.id === nodeId);
  if (!node) return undefined;
  if (node.classType === "Reroute") return "*";
  if (node.unknownSlots) return node.unknownSlots.inputs.find((s) => (s.widget ?? s.name) === input)?.type;
  const schema = schemas.get(node.classType);
  const socket = schema?.sockets.find((s) => s.name === input);
  if (socket) return socket.type;
  const widget = schema?.widgets.find((w) => w.name === input);
  return widget ? widgetSocketType(widget) : undefined;
}

export function outputType(graph: Graph, schemas: Schemas, nodeId: string, slot: number): string | undefined {
  const node = graph.nodes.find((n) => n.id === nodeId);
  if (!node) return undefined;
  if (node.classType === "Reroute") {
    const upstream = graph.links.find((l) => l.target === node.id);
    return upstream ? outputType(graph, schemas, upstream.source, upstream.sourceSlot) ?? "*" : "*";
  }
  return outputSlots(node, schemas.get(node.classType))[slot]?.type;
}

export interface Connection {
  source: string;
  sourceSlot: number;
  target: string;
  targetInput: string;
}

function reaches(graph: Graph, from: string, to: string): boolean {
  const stack = [from];
  const seen = new Set<string>();
  while (stack.length) {
    const id = stack.pop()!;
    if (id === to) return true;
    if (seen.has(id)) continue;
    seen.add(id);
    for (const link of graph.links) if (link.source === id) stack.push(link.target);
  }
  return false;
}

/** Why a connection is refused, or null when it may be made. */
export function connectionProblem(graph: Graph, schemas: Schemas, c: Connection): string | null {
  if (c.source === c.target) return "a node cannot feed itself";
  const out = outputType(graph, schemas, c.source, c.sourceSlot);
  const into = inputType(graph, schemas, c.target, c.targetInput);
  if (out === undefined || into === undefined) return "no such socket";
  const target = graph.nodes.find((n) => n.id === c.target)!;
  const widget = schemas.get(target.classType)?.widgets.find((w) => w.name === c.targetInput);
  const source = graph.nodes.find((n) => n.id === c.source)!;
  if (source.primitive && source.primitive.type === "*" && !widget) return "a primitive node feeds widgets only";
  if (widget && out === "*" && !source.primitive && source.classType !== "Reroute") return `${c.targetInput} takes ${into}, not *`;
  if (!typesCompatible(out, into)) return `${out} does not fit ${into}`;
  if (reaches(graph, c.target, c.source)) return "the link would make a cycle";
  return null;
}

/** Add a link, replacing the one already on that input (one link per input). */
export function connect(graph: Graph, schemas: Schemas, c: Connection): Graph {
  if (connectionProblem(graph, schemas, c)) return graph;
  const type = outputType(graph, schemas, c.source, c.sourceSlot) ?? "*";
  const link: GraphLink = { id: nextLinkId(graph), ...c, type: type === "*" ? inputType(graph, schemas, c.target, c.targetInput) ?? "*" : type };
  let nodes = graph.nodes;
  const source = graph.nodes.find((n) => n.id === c.source)!;
  if (source.primitive && source.primitive.type === "*") {
    const target = graph.nodes.find((n) => n.id === c.target)!;
    const widget = schemas.get(target.classType)?.widgets.find((w) => w.name === c.targetInput)!;
    nodes = nodes.map((n) => n.id !== source.id ? n : {
      ...n, primitive: { type: widgetSocketType(widget), widget: widget.name, config: null },
      values: { value: target.values[widget.name] ?? widget.defaultValue },
      controls: widget.kind === "INT" || widget.kind === "FLOAT" || widget.control ? { value: target.controls[widget.name] ?? "fixed" } : {},
    });
  }
  const links = graph.links.filter((l) => !(l.target === c.target && l.targetInput === c.targetInput));
  return { ...graph, nodes, links: [...links, link], lastLinkId: Math.max(graph.lastLinkId, Number(link.id)) };
}

export function removeLinks(graph: Graph, ids: Set<string>): Graph {
  const links = graph.links.filter((l) => !ids.has(l.id));
  if (links.length === graph.links.length) return graph;
  return resetLonelyPrimitives({ ...graph, links });
}

export function removeNodes(graph: Graph, ids: Set<string>): Graph {
  const nodes = graph.nodes.filter((n) => !ids.has(n.id));
  if (nodes.length === graph.nodes.length) return graph;
  const links = graph.links.filter((l) => !ids.has(l.source) && !ids.has(l.target));
  return resetLonelyPrimitives({ ...graph, nodes, links });
}

/** A primitive node that feeds nothing any more is free to take another widget's shape. */
function resetLonelyPrimitives(graph: Graph): Graph {
  const lonely = (n: GraphNode) => n.primitive && n.primitive.type !== "*" && !graph.links.some((l) => l.source === n.id);
  if (!graph.nodes.some(lonely)) return graph;
  return { ...graph, nodes: graph.nodes.map((n) => (lonely(n) ? { ...n, primitive: { type: "*", widget: "", config: null }, values: {}, controls: {} } : n)) };
}

export function updateNode(graph: Graph, id: string, change: (node: GraphNode) => GraphNode): Graph {
  return { ...graph, nodes: graph.nodes.map((n) => (n.id === id ? change(n) : n)) };
}

export function setWidgetValue(graph: Graph, id: string, name: string, value: unknown): Graph {
  if (Object.is(graph.nodes.find((n) => n.id === id)?.values[name], value)) return graph;
  return updateNode(graph, id, (n) => ({ ...n, values: { ...n.values, [name]: value } }));
}

export function setControl(graph: Graph, id: string, name: string, mode: string): Graph {
  if (graph.nodes.find((n) => n.id === id)?.controls[name] === mode) return graph;
  return updateNode(graph, id, (n) => ({ ...n, controls: { ...n.controls, [name]: mode } }));
}

/** Mute or bypass the nodes; applying the mode they all already have puts them back to normal. */
export function toggleMode(graph: Graph, ids: Set<string>, mode: NodeMode): Graph {
  const chosen = graph.nodes.filter((n) => ids.has(n.id));
  const next = chosen.length > 0 && chosen.every((n) => n.mode === mode) ? MODE_NORMAL : mode;
  return { ...graph, nodes: graph.nodes.map((n) => (ids.has(n.id) ? { ...n, mode: next } : n)) };
}

export function isCollapsed(node: GraphNode): boolean {
  return Boolean((node.saved.flags as { collapsed?: boolean } | undefined)?.collapsed);
}

/** Collapse the nodes to their title bar (the UI format's flags.collapsed), or expand them if all are. */
export function toggleCollapse(graph: Graph, ids: Set<string>): Graph {
  const chosen = graph.nodes.filter((n) => ids.has(n.id));
  if (chosen.length === 0) return graph;
  const collapsed = !chosen.every(isCollapsed);
  return { ...graph, nodes: graph.nodes.map((n) => (ids.has(n.id)
    ? { ...n, saved: { ...n.saved, flags: { ...(n.saved.flags as object | undefined), collapsed } } } : n)) };
}

export function moveNodes(graph: Graph, positions: Map<string, [number, number]>): Graph {
  const moved = graph.nodes.some((n) => positions.has(n.id) && (positions.get(n.id)![0] !== n.pos[0] || positions.get(n.id)![1] !== n.pos[1]));
  if (!moved) return graph;
  return { ...graph, nodes: graph.nodes.map((n) => (positions.has(n.id) ? { ...n, pos: positions.get(n.id)! } : n)) };
}

/** Nodes and the links among them, as copied to the clipboard. */
export interface Fragment {
  nodes: GraphNode[];
  links: GraphLink[];
}

export function copyFragment(graph: Graph, ids: Set<string>): Fragment {
  return { nodes: graph.nodes.filter((n) => ids.has(n.id)), links: graph.links.filter((l) => ids.has(l.source) && ids.has(l.target)) };
}

/** Paste a fragment with fresh ids, offset from the originals; returns the graph and the new node ids. */
export function pasteFragment(graph: Graph, fragment: Fragment, offset: [number, number]): { graph: Graph; ids: string[] } {
  let next = graph;
  const renamed = new Map<string, string>();
  for (const node of fragment.nodes) {
    const id = nextNodeId(next);
    renamed.set(node.id, id);
    next = addNode(next, structuredClone({ ...node, id, pos: [node.pos[0] + offset[0], node.pos[1] + offset[1]] as [number, number] }));
  }
  for (const link of fragment.links) {
    const id = nextLinkId(next);
    next = { ...next, links: [...next.links, { ...link, id, source: renamed.get(link.source)!, target: renamed.get(link.target)! }],
      lastLinkId: Math.max(next.lastLinkId, Number(id)) };
  }
  return { graph: next, ids: [...renamed.values()] };
}

export function groupAround(graph: Graph, ids: Set<string>, title = "Group"): Graph {
  const chosen = graph.nodes.filter((n) => ids.has(n.id));
  if (chosen.length === 0) return graph;
  const pad = 30;
  const x0 = Math.min(...chosen.map((n) => n.pos[0])) - pad;
  const y0 = Math.min(...chosen.map((n) => n.pos[1])) - pad - 30;
  const x1 = Math.max(...chosen.map((n) => n.pos[0] + (n.size?.[0] ?? 260))) + pad;
  const y1 = Math.max(...chosen.map((n) => n.pos[1] + (n.size?.[1] ?? 160))) + pad;
  const group: Group = { title, bounding: [x0, y0, x1 - x0, y1 - y0], color: "#3f789e", fontSize: 24, saved: {} };
  return { ...graph, groups: [...graph.groups, group] };
}

/** Nodes whose top-left corner lies inside a group's box (membership is geometric, as in ComfyUI). */
export function nodesInGroup(graph: Graph, group: Group): string[] {
  const [x, y, w, h] = group.bounding;
  return graph.nodes.filter((n) => n.pos[0] >= x && n.pos[1] >= y && n.pos[0] <= x + w && n.pos[1] <= y + h).map((n) => n.id);
}

/** The widget a node shows for an input name (PrimitiveNodes borrow theirs from the widget they feed). */
export function widgetFor(graph: Graph, schemas: Schemas, node: GraphNode, name: string): WidgetSpec | undefined {
  if (node.primitive) {
    const borrowed = primitiveWidget(graph, schemas, node);
    return borrowed ? { ...borrowed, name: "value", control: borrowed.kind === "INT" || borrowed.kind === "FLOAT" || borrowed.control } : undefined;
  }
  return schemas.get(node.classType)?.widgets.find((w) => w.name === name);
}

/** Node classes with an input that takes `type` (for the palette opened by dropping a link). */
export function classesAccepting(schemas: Schemas, type: string): string[] {
  return schemas.classNames().filter((name) => {
    const schema = schemas.get(name)!;
    return schema.sockets.some((s) => typesCompatible(type, s.type))
      || (type !== "*" && schema.widgets.some((w) => typesCompatible(type, widgetSocketType(w))));
  });
}

export function firstInputAccepting(schemas: Schemas, classType: string, type: string): string | undefined {
  const schema = schemas.get(classType);
  return schema?.sockets.find((s) => typesCompatible(type, s.type))?.name
    ?? schema?.widgets.find((w) => type !== "*" && typesCompatible(type, widgetSocketType(w)))?.name;
}
