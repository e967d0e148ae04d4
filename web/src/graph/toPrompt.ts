// From the editor's graph to an API prompt, with ComfyUI's frontend rules (web-editor.md 3.5): helper,
// muted and bypassed nodes never reach the server, links resolve through reroutes and bypassed nodes,
// primitive nodes' values land in the widgets they feed.
import { isHelper, typesCompatible, type ClassSchema, type Schemas } from "../api/objectInfo";
import { MODE_BYPASSED, MODE_MUTED, MODE_NORMAL, type Graph, type GraphLink, type GraphNode } from "./model";
import { savedInputSlots, widgetSocketType } from "./workflow";

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

/** Where a link's value comes from: a link, a PrimitiveNode's constant, "keep" (no value arrives: a widget
 * keeps its own) or "drop" (the source left the prompt and the input goes with it, as ComfyUI's frontend
 * deletes links into nodes it did not send). */
type Resolved = { link: [string, number] } | { constant: unknown } | "keep" | "drop";

// ComfyUI's dynamic prompts: comments (from // to the line's end, and slash-star blocks) removed, then
// one {a|b|c} alternative chosen per group, innermost first.
export function resolveDynamicPrompt(text: string, random: () => number = Math.random): string {
  let current = text.replace(/\/\*[\s\S]*?\*\/|\/\/.*/g, "");
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

  resolve(link: GraphLink, wanted: string, seen: Set<string> = new Set()): Resolved {
    const source = this.byId.get(link.source);
    if (!source || seen.has(link.id)) return "keep";
    seen.add(link.id);
    if (source.classType === "PrimitiveNode") return "value" in source.values ? { constant: source.values.value } : "keep";
    if (source.classType === "Reroute") {
      const upstream = this.graph.links.find((l) => l.target === source.id);
      return upstream ? this.resolve(upstream, wanted, seen) : "keep";
    }
    if (isHelper(source.classType)) return "keep";
    if (source.mode === MODE_BYPASSED) {
      const through = this.bypassInput(source, link.sourceSlot, wanted);
      if (through === null) return "drop";
      return through ? this.resolve(through, wanted, seen) : "keep";
    }
    if (source.mode === MODE_MUTED || !this.schemas.has(source.classType)) return "drop";
    return { link: [source.id, link.sourceSlot] };
  }

  /** The input a bypassed node passes through for the wanted type: the one at the used output's index if
   * its type matches, else the first of exactly that type, else the first compatible one. Null when none
   * fits; undefined when the chosen input has no link. */
  private bypassInput(node: GraphNode, outputSlot: number, wanted: string): GraphLink | null | undefined {
    const inputs = savedInputSlots(this.graph, node, this.schemas.get(node.classType));
    const exact = (index: number) => inputs[index].type === wanted;
    const chosen = outputSlot < inputs.length && exact(outputSlot) ? outputSlot
      : [...inputs.keys()].find(exact) ?? [...inputs.keys()].find((i) => typesCompatible(inputs[i].type, wanted));
    if (chosen === undefined) return null;
    return this.linkInto(node.id, inputs[chosen].widget ?? inputs[chosen].name);
  }

  nodeInputs(node: GraphNode, schema: ClassSchema): Record<string, unknown> {
    const inputs: Record<string, unknown> = {};
    for (const widget of schema.widgets) inputs[widget.name] = this.constant(node.values[widget.name] ?? widget.defaultValue, widget.options);
    const linked = [...schema.sockets.map((s) => ({ name: s.name, type: s.type, options: {} as Record<string, unknown> })),
      ...schema.widgets.map((w) => ({ name: w.name, type: widgetSocketType(w), options: w.options }))];
    for (const input of linked) {
      const link = this.linkInto(node.id, input.name);
      if (!link) continue;
      const resolved = this.resolve(link, input.type);
      if (resolved === "drop") delete inputs[input.name];
      else if (resolved === "keep") continue;
      else if ("link" in resolved) inputs[input.name] = resolved.link;
      else inputs[input.name] = this.constant(resolved.constant, input.options);
    }
    return inputs;
  }

  private constant(value: unknown, options: Record<string, unknown>): unknown {
    if (typeof value === "string" && options.dynamicPrompts) return resolveDynamicPrompt(value, this.random);
    // A list constant would read as a link; current frontends wrap it.
    return Array.isArray(value) ? { __value__: value } : value;
  }

  /** Nodes with a path to an output node, or to a node of a type the server lacks (it may be an output). */
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
  const definitions = (graph.topLevel.definitions as { subgraphs?: { id?: string; name?: string }[] } | undefined)?.subgraphs ?? [];
  const subgraphs = new Map(definitions.map((d) => [String(d.id), String(d.name ?? d.id)]));
  for (const node of graph.nodes) {
    if (node.mode !== MODE_NORMAL || isHelper(node.classType)) continue;
    const schema = schemas.get(node.classType);
    if (!schema) {
      const subgraph = subgraphs.get(node.classType);
      if (reachable.has(node.id)) problems.push({ nodeId: node.id, message: subgraph !== undefined
        ? `subgraph ${JSON.stringify(subgraph)} cannot be queued yet: subgraphs are kept, not expanded`
        : `node type ${node.classType} is not installed on the server` });
      continue;
    }
    prompt[node.id] = { class_type: node.classType, inputs: builder.nodeInputs(node, schema),
      _meta: { title: node.title ?? schema.title } };
  }
  return { prompt: withoutOrphans(prompt, graph, schemas), problems };
}

/** Drop nodes that fed something in the editor but feed nothing that reached the prompt (a loader behind
 * a muted SaveImage), repeatedly, as the Python converter does. */
function withoutOrphans(prompt: ApiPrompt, graph: Graph, schemas: Schemas): ApiPrompt {
  const fedSomething = new Set(graph.links.map((l) => l.source));
  for (;;) {
    const used = new Set(Object.values(prompt).flatMap((n) => Object.values(n.inputs))
      .filter((v): v is [string, number] => Array.isArray(v) && v.length === 2 && typeof v[0] === "string").map((v) => v[0]));
    const orphans = Object.keys(prompt).filter((id) => fedSomething.has(id) && !used.has(id) && !schemas.get(prompt[id].class_type)?.outputNode);
    if (orphans.length === 0) return prompt;
    for (const id of orphans) delete prompt[id];
  }
}
