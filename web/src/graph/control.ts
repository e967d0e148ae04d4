// control_after_generate: what a seed-like widget becomes after a successful queue.
import type { Schemas, WidgetSpec } from "../api/objectInfo";
import type { Graph, GraphNode } from "./model";

const SEED_LIMIT = 2 ** 53 - 1; // JSON numbers beyond this lose digits in the browser

export function nextValue(value: unknown, mode: string, widget: Pick<WidgetSpec, "kind" | "options" | "choices">,
  random: () => number = Math.random): unknown {
  if (widget.kind === "COMBO") {
    const index = widget.choices.indexOf(String(value));
    const n = widget.choices.length;
    if (n === 0 || mode === "fixed") return value;
    if (mode === "increment") return widget.choices[Math.min(index + 1, n - 1)];
    if (mode === "decrement") return widget.choices[Math.max(index - 1, 0)];
    return widget.choices[Math.floor(random() * n)];
  }
  const min = Number(widget.options.min ?? 0);
  const max = Math.min(Number(widget.options.max ?? SEED_LIMIT), SEED_LIMIT);
  const step = widget.kind === "INT" ? 1 : Number(widget.options.step ?? 1);
  const current = Number(value) || 0;
  switch (mode) {
    case "increment":
      return Math.min(current + step, max);
    case "decrement":
      return Math.max(current - step, min);
    case "randomize":
      return widget.kind === "INT" ? Math.floor(min + random() * (Math.min(max, 2 ** 50) - min)) : min + random() * (max - min);
    default:
      return value;
  }
}

/** A new graph with every controlled widget (and primitive node) advanced once. */
export function applyControlAfterGenerate(graph: Graph, schemas: Schemas, random: () => number = Math.random): Graph {
  const nodes = graph.nodes.map((node): GraphNode => {
    const controlled = Object.entries(node.controls).filter(([, mode]) => mode !== "fixed");
    if (controlled.length === 0) return node;
    const values = { ...node.values };
    for (const [name, mode] of controlled) {
      const widget = node.primitive ? primitiveWidget(graph, schemas, node) : schemas.get(node.classType)?.widgets.find((w) => w.name === name);
      if (widget) values[name] = nextValue(values[name], mode, widget, random);
    }
    return { ...node, values };
  });
  return { ...graph, nodes };
}

/** The widget spec a PrimitiveNode takes its shape from: the first widget it feeds. */
export function primitiveWidget(graph: Graph, schemas: Schemas, node: GraphNode): WidgetSpec | undefined {
  for (const link of graph.links) {
    if (link.source !== node.id) continue;
    const target = graph.nodes.find((n) => n.id === link.target);
    const widget = target && schemas.get(target.classType)?.widgets.find((w) => w.name === link.targetInput);
    if (widget) return widget;
  }
  return undefined;
}
