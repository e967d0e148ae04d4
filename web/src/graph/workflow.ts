// The UI workflow format (web-editor.md section 3): schema 0.4 and schema 1 load into one Graph; saving
// writes 0.4 and keeps every key we do not interpret.
import { CONTROL_MODES, type ClassSchema, type Schemas, type WidgetSpec } from "../api/objectInfo";
import { MODE_BYPASSED, MODE_MUTED, MODE_NORMAL, type Graph, type GraphLink, type GraphNode, type NodeMode,
  type SlotInfo } from "./model";

type Json = Record<string, unknown>;

const NODE_KEYS = new Set(["id", "type", "pos", "size", "mode", "title", "order", "inputs", "outputs", "widgets_values"]);
const TOP_KEYS = new Set(["last_node_id", "last_link_id", "nodes", "links", "groups", "extra", "version", "state"]);

export class WorkflowError extends Error {}

export function isUiWorkflow(value: unknown): value is Json {
  return typeof value === "object" && value !== null && Array.isArray((value as Json).nodes);
}

function pair(value: unknown, fallback: [number, number]): [number, number] {
  if (Array.isArray(value)) return [Number(value[0]) || 0, Number(value[1]) || 0];
  if (value && typeof value === "object") {
    const v = value as Record<string, unknown>;
    return [Number(v["0"]) || 0, Number(v["1"]) || 0];
  }
  return fallback;
}

function modeOf(value: unknown): NodeMode {
  return value === MODE_MUTED ? MODE_MUTED : value === MODE_BYPASSED ? MODE_BYPASSED : MODE_NORMAL;
}

function controlOf(value: unknown): string {
  // Old files stored a boolean here before the four named modes existed.
  if (typeof value === "boolean") return value ? "randomize" : "fixed";
  return typeof value === "string" && (CONTROL_MODES as readonly string[]).includes(value) ? value : "fixed";
}

function isControlValue(value: unknown): boolean {
  return typeof value === "boolean" || (CONTROL_MODES as readonly unknown[]).includes(value);
}

/** Widget values and control modes from `widgets_values` (array in schema order, or keyed by name). */
export function readWidgetValues(schema: ClassSchema, saved: unknown): Pick<GraphNode, "values" | "controls"> {
  const values: Record<string, unknown> = {};
  const controls: Record<string, string> = {};
  if (saved && typeof saved === "object" && !Array.isArray(saved)) {
    const byName = saved as Json;
    for (const widget of schema.widgets) {
      values[widget.name] = widget.name in byName ? byName[widget.name] : widget.defaultValue;
      if (widget.control) controls[widget.name] = controlOf(byName[`${widget.name}_control`] ?? "fixed");
    }
    return { values, controls };
  }
  const list = Array.isArray(saved) ? saved : [];
  let index = 0;
  for (const widget of schema.widgets) {
    values[widget.name] = index < list.length ? list[index] : widget.defaultValue;
    index += 1;
    // The extra entries are skipped only when they look like one, so files from before a widget had its
    // control (or upload) entry still line up.
    if (widget.control) {
      controls[widget.name] = index < list.length && isControlValue(list[index]) ? controlOf(list[index++]) : "randomize";
      if (widget.kind === "COMBO" && typeof list[index] === "string" && isControlValue(list[index - 1])) index += 1; // filter
    }
    if (widget.upload && list[index] === "image") index += 1;
  }
  return { values, controls };
}

export function writeWidgetValues(schema: ClassSchema, node: GraphNode): unknown[] {
  const list: unknown[] = [];
  for (const widget of schema.widgets) {
    list.push(node.values[widget.name] ?? widget.defaultValue);
    if (widget.control) {
      list.push(node.controls[widget.name] ?? "fixed");
      if (widget.kind === "COMBO") list.push("");
    }
    if (widget.upload) list.push("image");
  }
  return list;
}

interface RawLink {
  id: number | string;
  origin_id: number | string;
  origin_slot: number;
  target_id: number | string;
  target_slot: number;
  type: string;
}

function rawLinks(file: Json): RawLink[] {
  const links = (file.links as unknown[]) ?? [];
  return links.flatMap((link): RawLink[] => {
    if (Array.isArray(link)) {
      const [id, origin_id, origin_slot, target_id, target_slot, type] = link;
      return [{ id, origin_id, origin_slot: Number(origin_slot), target_id, target_slot: Number(target_slot),
        type: String(type ?? "*") }];
    }
    if (link && typeof link === "object") {
      const l = link as Json;
      return [{ id: l.id as number, origin_id: l.origin_id as number, origin_slot: Number(l.origin_slot),
        target_id: l.target_id as number, target_slot: Number(l.target_slot), type: String(l.type ?? "*") }];
    }
    return [];
  });
}

function slots(saved: unknown, withWidget: boolean): SlotInfo[] {
  return ((saved as Json[]) ?? []).map((slot) => {
    const widget = (slot.widget as Json | undefined)?.name as string | undefined;
    return withWidget && widget ? { name: String(slot.name ?? ""), type: String(slot.type ?? "*"), widget }
      : { name: String(slot.name ?? ""), type: String(slot.type ?? "*") };
  });
}

function loadNode(raw: Json, schemas: Schemas): GraphNode {
  const classType = String(raw.type ?? "");
  const saved: Json = {};
  for (const [key, value] of Object.entries(raw)) if (!NODE_KEYS.has(key)) saved[key] = value;
  const node: GraphNode = {
    id: String(raw.id),
    classType,
    pos: pair(raw.pos, [0, 0]),
    size: raw.size === undefined ? undefined : pair(raw.size, [200, 100]),
    mode: modeOf(raw.mode),
    title: typeof raw.title === "string" ? raw.title : undefined,
    values: {},
    controls: {},
    saved,
  };
  if (classType === "PrimitiveNode") {
    const output = ((raw.outputs as Json[]) ?? [])[0];
    const widget = output?.widget as Json | undefined;
    const list = Array.isArray(raw.widgets_values) ? raw.widgets_values : [];
    node.primitive = { type: String(output?.type ?? "*"), widget: String(widget?.name ?? ""),
      config: Array.isArray(widget?.config) ? (widget.config as unknown[]) : null };
    if (list.length > 0) node.values.value = list[0];
    if (list.length > 1) node.controls.value = controlOf(list[1]);
    return node;
  }
  const schema = schemas.get(classType);
  if (!schema) {
    node.unknownSlots = { inputs: slots(raw.inputs, true), outputs: slots(raw.outputs, false),
      widgetsValues: raw.widgets_values ?? [] };
    return node;
  }
  Object.assign(node, readWidgetValues(schema, raw.widgets_values));
  return node;
}

/** Load a UI-format workflow (schema 0.4 or 1) into a Graph. */
export function loadUiWorkflow(file: unknown, schemas: Schemas): Graph {
  if (!isUiWorkflow(file)) throw new WorkflowError("not a UI workflow: it has no nodes array");
  const rawNodes = (file.nodes as Json[]).filter((n) => n && typeof n === "object");
  const nodes = rawNodes.map((raw) => loadNode(raw, schemas));
  const savedInputs = new Map(rawNodes.map((raw) => [String(raw.id), slots(raw.inputs, true)]));
  const links: GraphLink[] = [];
  for (const link of rawLinks(file)) {
    const target = String(link.target_id);
    // target_slot indexes the saved inputs[] array, which differs from the schema's order: match by name.
    const input = savedInputs.get(target)?.[link.target_slot];
    if (!input || !nodes.some((n) => n.id === String(link.origin_id))) continue;
    links.push({ id: String(link.id), source: String(link.origin_id), sourceSlot: link.origin_slot, target,
      targetInput: input.widget ?? input.name, type: link.type });
  }
  const state = (file.state as Json | undefined) ?? {};
  const groups = ((file.groups as Json[]) ?? []).map((group) => {
    const saved: Json = {};
    for (const [key, value] of Object.entries(group)) {
      if (!["title", "bounding", "color", "font_size"].includes(key)) saved[key] = value;
    }
    const b = (group.bounding as number[]) ?? [0, 0, 300, 200];
    return { title: String(group.title ?? "Group"), bounding: [b[0], b[1], b[2], b[3]] as [number, number, number, number],
      color: group.color as string | undefined, fontSize: group.font_size as number | undefined, saved };
  });
  const topLevel: Json = {};
  for (const [key, value] of Object.entries(file)) if (!TOP_KEYS.has(key)) topLevel[key] = value;
  if (Array.isArray(file.reroutes)) delete topLevel.reroutes; // native reroutes are only waypoints
  return {
    nodes,
    links,
    groups,
    lastNodeId: Number(file.last_node_id ?? state.lastNodeId ?? 0) || 0,
    lastLinkId: Number(file.last_link_id ?? state.lastLinkId ?? 0) || 0,
    extra: ((file.extra as Json) ?? {}) as Json,
    topLevel,
  };
}

/** The inputs[] a node saves: its sockets, then each widget fed by a link (as current frontends save). */
export function savedInputSlots(graph: Graph, node: GraphNode, schema: ClassSchema | undefined): SlotInfo[] {
  if (node.unknownSlots) return node.unknownSlots.inputs;
  if (!schema) return [];
  const sockets: SlotInfo[] = schema.sockets.map((s) => ({ name: s.name, type: s.type }));
  const linkedWidgets = schema.widgets.filter((w) => graph.links.some((l) => l.target === node.id && l.targetInput === w.name));
  return [...sockets, ...linkedWidgets.map((w) => ({ name: w.name, type: widgetSocketType(w), widget: w.name }))];
}

export function widgetSocketType(widget: WidgetSpec): string {
  return widget.kind === "COMBO" ? "COMBO" : widget.kind;
}

export function outputSlots(node: GraphNode, schema: ClassSchema | undefined): SlotInfo[] {
  if (node.unknownSlots) return node.unknownSlots.outputs;
  if (node.primitive) return [{ name: node.primitive.type === "*" ? "connect to widget input" : node.primitive.type, type: node.primitive.type }];
  return (schema?.outputs ?? []).map((o) => ({ name: o.name, type: o.type }));
}

function numericId(id: string): number | string {
  return /^\d+$/.test(id) ? Number(id) : id;
}

/** Save as a schema 0.4 UI workflow. */
export function saveUiWorkflow(graph: Graph, schemas: Schemas): Json {
  const inputIndex = new Map<string, SlotInfo[]>();
  for (const node of graph.nodes) inputIndex.set(node.id, savedInputSlots(graph, node, schemas.get(node.classType)));
  const links = graph.links.map((link) => {
    const inputs = inputIndex.get(link.target) ?? [];
    const slot = inputs.findIndex((s) => (s.widget ?? s.name) === link.targetInput);
    return [numericId(link.id), numericId(link.source), link.sourceSlot, numericId(link.target), slot, link.type];
  });
  const nodes = graph.nodes.map((node, order) => {
    const schema = schemas.get(node.classType);
    const inputs = (inputIndex.get(node.id) ?? []).map((slot) => {
      const link = graph.links.find((l) => l.target === node.id && l.targetInput === (slot.widget ?? slot.name));
      return { name: slot.name, type: slot.type, link: link ? numericId(link.id) : null,
        ...(slot.widget ? { widget: { name: slot.widget } } : {}) };
    });
    const outputs = outputSlots(node, schema).map((slot, index) => {
      const outgoing = graph.links.filter((l) => l.source === node.id && l.sourceSlot === index).map((l) => numericId(l.id));
      const widget = node.primitive && node.primitive.widget
        ? { widget: { name: node.primitive.widget, ...(node.primitive.config ? { config: node.primitive.config } : {}) } } : {};
      return { name: slot.name, type: slot.type, links: outgoing.length ? outgoing : null, slot_index: index, ...widget };
    });
    let widgetsValues: unknown;
    if (node.unknownSlots) widgetsValues = node.unknownSlots.widgetsValues;
    else if (node.primitive) widgetsValues = "value" in node.values
      ? ("value" in node.controls ? [node.values.value, node.controls.value] : [node.values.value]) : [];
    else if (schema) widgetsValues = writeWidgetValues(schema, node);
    return {
      id: numericId(node.id), type: node.classType, pos: node.pos, size: node.size ?? [240, 120],
      flags: {}, order, mode: node.mode, inputs, outputs, properties: { "Node name for S&R": node.classType },
      ...node.saved,
      ...(node.title ? { title: node.title } : {}),
      widgets_values: widgetsValues ?? [],
    };
  });
  const numericIds = graph.nodes.map((n) => Number(n.id)).filter(Number.isFinite);
  const linkIds = graph.links.map((l) => Number(l.id)).filter(Number.isFinite);
  return {
    ...graph.topLevel,
    last_node_id: Math.max(graph.lastNodeId, 0, ...numericIds),
    last_link_id: Math.max(graph.lastLinkId, 0, ...linkIds),
    nodes,
    links,
    groups: graph.groups.map((g) => ({ ...g.saved, title: g.title, bounding: g.bounding,
      ...(g.color ? { color: g.color } : {}), font_size: g.fontSize ?? 24 })),
    config: graph.topLevel.config ?? {},
    extra: graph.extra,
    version: 0.4,
  };
}
