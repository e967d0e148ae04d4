// The editor's one in-memory graph model. The UI format exists only at load/save (workflow.ts), the API
// prompt only at queue time (toPrompt.ts).

export type NodeMode = 0 | 2 | 4;
export const MODE_NORMAL: NodeMode = 0;
export const MODE_MUTED: NodeMode = 2;
export const MODE_BYPASSED: NodeMode = 4;

export interface SlotInfo {
  name: string;
  type: string;
  /** The widget a linked input feeds (ComfyUI's converted widget). */
  widget?: string;
}

export interface GraphNode {
  id: string;
  classType: string;
  pos: [number, number];
  size?: [number, number];
  mode: NodeMode;
  title?: string;
  /** Widget values by input name. */
  values: Record<string, unknown>;
  /** control_after_generate mode by widget name. */
  controls: Record<string, string>;
  /** The saved UI node's other keys (properties, color, flags, ...), written back unchanged. */
  saved: Record<string, unknown>;
  /** For node types the server does not know: the saved slots and raw widgets_values, kept verbatim. */
  unknownSlots?: { inputs: SlotInfo[]; outputs: SlotInfo[]; widgetsValues: unknown };
  /** PrimitiveNode: the type and widget config it adopted from the widget it feeds. */
  primitive?: { type: string; widget: string; config: unknown[] | null };
}

export interface GraphLink {
  id: string;
  source: string;
  sourceSlot: number;
  target: string;
  /** Input name on the target: a socket's name, or the name of the widget it feeds. */
  targetInput: string;
  type: string;
}

export interface Group {
  title: string;
  bounding: [number, number, number, number];
  color?: string;
  fontSize?: number;
  saved: Record<string, unknown>;
}

export interface Graph {
  nodes: GraphNode[];
  links: GraphLink[];
  groups: Group[];
  lastNodeId: number;
  lastLinkId: number;
  /** The file's `extra` (camera, frontend version, ...) and other top-level keys, kept when re-saving. */
  extra: Record<string, unknown>;
  topLevel: Record<string, unknown>;
}

export function emptyGraph(): Graph {
  return { nodes: [], links: [], groups: [], lastNodeId: 0, lastLinkId: 0, extra: {}, topLevel: {} };
}

export function nextNodeId(graph: Graph): string {
  const numeric = graph.nodes.map((node) => Number(node.id)).filter(Number.isFinite);
  return String(Math.max(graph.lastNodeId, 0, ...numeric) + 1);
}

export function nextLinkId(graph: Graph): string {
  const numeric = graph.links.map((link) => Number(link.id)).filter(Number.isFinite);
  return String(Math.max(graph.lastLinkId, 0, ...numeric) + 1);
}
