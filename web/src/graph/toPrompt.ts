// From the editor's graph to an API prompt, with ComfyUI's frontend rules (web-editor.md 3.5): helper,
// muted and bypassed nodes never reach the server, links resolve through reroutes and bypassed nodes,
// primitive nodes' values land in the widgets they feed.
import { isHelper, typesCompatible, type ClassSchema, type Schemas } from "../api/objectInfo";
import { MODE_BYPASSED, MODE_MUTED, MODE_NORMAL, type Graph, type GraphLink, type GraphNode } from "./model";
import { outputSlots, savedInputSlots } from "./workflow";

export interface ApiNode {
  class_type: string;
  inputs: Record<string, unknown>;
  _meta: { title: string };
}
export type ApiPrompt = Record<string, ApiNode>;

export interface PromptProblem {
  nodeId: string;
  message: string;
}

export interface BuiltPrompt {
  prompt: ApiPrompt;
  problems: PromptProblem[];
}

/** What a link resolves to once helper and bypassed nodes are walked through. */
type Resolved = { link: [string, number] } | { constant: unknown } | null;

/** Choose one `{a|b|c}` alternative per group, innermost first (ComfyUI's dynamic prompts). */
export function resolveDynamicPrompt(text: string, random: () => number = Math.random): string {
  let current = text;
  for (let guard = 0; guard < 1000; guard += 1) {
    const next = current.replace(/\{([^{}]*)\}/, (_, body: string) => {
      const options = body.split("|");
      return options[Math.floor(random() * options.length)] ?? "";
    });
    if (next === current) return current;
    current = next;
  }
  return current;
}

class PromptBuilder {
  private readonly byId: Map<string, GraphNode>;
  private readonly incoming = new Map<string, GraphLink>();

  constructor(private readonly graph: Graph, private readonly schemas: Schemas, private readonly random: () => number) {
    this.byId = new Map(graph.nodes.map((node) => [node.id, node]));
    for (const link of graph.links) this.incoming.set(`${link.target}\u0000${link.targetInput}`, link);
  }

  linkInto(nodeId: string, input: string): GraphLink | undefined {
    return this.incoming.get(`${nodeId}\u0000${input}`);
  }

  resolve(link: GraphLink, seen: Set<string> = new Set()): Resolved {
    const source = this.byId.get(link.source);
    if (!source || seen.has(source.id)) return null;
    seen.add(source.id);
    if (source.classType === "Reroute") {
      const upstream = this.graph.links.find((l) => l.target === source.id);
      return upstream ? this.resolve(upstream, seen) : null;
    }
    if (source.classType === "PrimitiveNode") {
      return source.mode === MODE_NORMAL && "value" in source.values ? { constant: source.values.value } : null;
    }
    if (source.mode === MODE_MUTED) return null;
    if (source.mode === MODE_BYPASSED) {
      const upstream = this.bypassRoute(source, link);
      return upstream ? this.resolve(upstream, seen) : null;
    }
    if (!this.schemas.has(source.classType) || isHelper(source.classType)) return null;
    return { link: [source.id, link.sourceSlot] };
  }

  /** The input of a bypassed node that stands in for its output: same index if the type fits, else the
   * first input of exactly the wanted type, else the first compatible one. */
  private bypassRoute(node: GraphNode, link: GraphLink): GraphLink | undefined {
    const schema = this.schemas.get(node.classType);
    const wanted = outputSlots(node, schema)[link.sourceSlot]?.type ?? link.type;
    const inputs = savedInputSlots(this.graph, node, schema);
    const linked = (index: number) => this.linkInto(node.id, inputs[index].widget ?? inputs[index].name);
    const candidates: number[] = [];
    if (link.sourceSlot < inputs.length && typesCompatible(wanted, inputs[link.sourceSlot].type)) candidates.push(link.sourceSlot);
    inputs.forEach((slot, index) => slot.type.toUpperCase() === wanted.toUpperCase() && candidates.push(index));
    inputs.forEach((slot, index) => typesCompatible(wanted, slot.type) && candidates.push(index));
    for (const index of candidates) {
      const upstream = linked(index);
      if (upstream) return upstream;
    }
    return undefined;
  }

  nodeInputs(node: GraphNode, schema: ClassSchema): Record<string, unknown> {
    const inputs: Record<string, unknown> = {};
    for (const widget of schema.widgets) {
      const link = this.linkInto(node.id, widget.name);
      if (link) {
        const resolved = this.resolve(link);
        if (resolved && "link" in resolved) inputs[widget.name] = resolved.link;
        else if (resolved) inputs[widget.name] = this.constant(resolved.constant, widget.options);
        continue;
      }
      inputs[widget.name] = this.constant(node.values[widget.name] ?? widget.defaultValue, widget.options);
    }
    for (const socket of schema.sockets) {
      const link = this.linkInto(node.id, socket.name);
      const resolved = link ? this.resolve(link) : null;
      if (resolved && "link" in resolved) inputs[socket.name] = resolved.link;
      else if (resolved) inputs[socket.name] = this.constant(resolved.constant, {});
    }
    return inputs;
  }

  private constant(value: unknown, options: Record<string, unknown>): unknown {
    if (typeof value === "string" && options.dynamicPrompts) return resolveDynamicPrompt(value, this.random);
    // A list constant would read as a link; current frontends wrap it.
    return Array.isArray(value) ? { __value__: value } : value;
  }

  /** Nodes an output node depends on, walking through helpers and bypassed nodes. */
  reachable(): Set<string> {
    const seen = new Set<string>();
    const stack = this.graph.nodes
      .filter((n) => n.mode === MODE_NORMAL && (this.schemas.get(n.classType)?.outputNode ?? !this.schemas.has(n.classType)))
      .filter((n) => !isHelper(n.classType))
      .map((n) => n.id);
    while (stack.length) {
      const id = stack.pop()!;
      if (seen.has(id)) continue;
      seen.add(id);
      for (const link of this.graph.links) if (link.target === id && !seen.has(link.source)) stack.push(link.source);
    }
    return seen;
  }
}

/** The API prompt for a graph, plus the problems that would make the server refuse it. */
export function buildPrompt(graph: Graph, schemas: Schemas, random: () => number = Math.random): BuiltPrompt {
  const builder = new PromptBuilder(graph, schemas, random);
  const prompt: ApiPrompt = {};
  const problems: PromptProblem[] = [];
  const reachable = builder.reachable();
  for (const node of graph.nodes) {
    if (node.mode !== MODE_NORMAL || isHelper(node.classType)) continue;
    const schema = schemas.get(node.classType);
    if (!schema) {
      if (reachable.has(node.id)) problems.push({ nodeId: node.id, message: `node type ${node.classType} is not installed on the server` });
      continue;
    }
    prompt[node.id] = { class_type: node.classType, inputs: builder.nodeInputs(node, schema),
      _meta: { title: node.title ?? schema.title } };
  }
  return { prompt, problems };
}
