// An API-format prompt opened as a graph: nodes placed in columns by their depth (web-editor.md section 4).
import type { Schemas } from "../api/objectInfo";
import { MODE_NORMAL, emptyGraph, type Graph, type GraphLink, type GraphNode } from "./model";
import { outputSlots } from "./workflow";

export function isApiPrompt(value: unknown): value is Record<string, { class_type: string; inputs?: Record<string, unknown> }> {
  if (!value || typeof value !== "object" || Array.isArray(value)) return false;
  const entries = Object.values(value as Record<string, unknown>);
  return entries.length > 0 && entries.every((n) => !!n && typeof n === "object" && typeof (n as { class_type?: unknown }).class_type === "string");
}

function isLink(value: unknown): value is [string | number, number] {
  return Array.isArray(value) && value.length === 2 && (typeof value[0] === "string" || typeof value[0] === "number")
    && Number.isInteger(value[1]);
}

export function loadApiPrompt(prompt: Record<string, { class_type: string; inputs?: Record<string, unknown>; _meta?: { title?: string } }>,
  schemas: Schemas): Graph {
  const graph = emptyGraph();
  const ids = Object.keys(prompt);
  const depth = new Map<string, number>();
  const depthOf = (id: string, trail: Set<string>): number => {
    if (depth.has(id)) return depth.get(id)!;
    if (trail.has(id) || !(id in prompt)) return 0;
    trail.add(id);
    const upstream = Object.values(prompt[id].inputs ?? {}).filter(isLink).map((l) => depthOf(String(l[0]), trail) + 1);
    const d = Math.max(0, ...upstream);
    depth.set(id, d);
    return d;
  };
  ids.forEach((id) => depthOf(id, new Set()));
  const rows = new Map<number, number>();
  let linkId = 0;
  for (const id of ids) {
    const entry = prompt[id];
    const schema = schemas.get(entry.class_type);
    const column = depth.get(id) ?? 0;
    const row = rows.get(column) ?? 0;
    rows.set(column, row + 1);
    const node: GraphNode = { id, classType: entry.class_type, pos: [column * 340, row * 260], mode: MODE_NORMAL,
      title: entry._meta?.title && entry._meta.title !== schema?.title ? entry._meta.title : undefined,
      values: {}, controls: {}, saved: {} };
    const inputs = entry.inputs ?? {};
    if (schema) {
      for (const widget of schema.widgets) {
        const value = inputs[widget.name];
        const unwrapped = value && typeof value === "object" && "__value__" in value ? (value as { __value__: unknown }).__value__ : value;
        node.values[widget.name] = value === undefined || isLink(value) ? widget.defaultValue : unwrapped;
        if (widget.control) node.controls[widget.name] = "fixed"; // an API prompt says which seed it ran with
      }
    } else {
      node.unknownSlots = { inputs: Object.entries(inputs).filter(([, v]) => isLink(v)).map(([name]) => ({ name, type: "*" })),
        outputs: [], widgetsValues: Object.fromEntries(Object.entries(inputs).filter(([, v]) => !isLink(v))) };
    }
    graph.nodes.push(node);
  }
  for (const node of graph.nodes) {
    for (const [name, value] of Object.entries(prompt[node.id].inputs ?? {})) {
      if (!isLink(value)) continue;
      const source = graph.nodes.find((n) => n.id === String(value[0]));
      if (!source) continue;
      const unknownOutputs = source.unknownSlots?.outputs;
      while (unknownOutputs && unknownOutputs.length <= value[1]) unknownOutputs.push({ name: `out ${unknownOutputs.length}`, type: "*" });
      const type = outputSlots(source, schemas.get(source.classType))[value[1]]?.type ?? "*";
      linkId += 1;
      const link: GraphLink = { id: String(linkId), source: source.id, sourceSlot: value[1], target: node.id, targetInput: name, type };
      graph.links.push(link);
    }
  }
  graph.lastLinkId = linkId;
  graph.lastNodeId = Math.max(0, ...ids.map(Number).filter(Number.isFinite));
  return graph;
}
