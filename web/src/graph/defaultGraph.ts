// The workflow a new tab opens with: ComfyUI's default txt2img, on the built-in demo checkpoint.
import type { Schemas } from "../api/objectInfo";
import { MODE_NORMAL, emptyGraph, type Graph, type GraphLink, type GraphNode } from "./model";

export const DEMO_CHECKPOINT = "sdgraph-demo-tiny-sd1.safetensors";

interface Placed {
  id: string;
  classType: string;
  pos: [number, number];
  size: [number, number];
  values: Record<string, unknown>;
  title?: string;
}

const NODES: Placed[] = [
  { id: "4", classType: "CheckpointLoaderSimple", pos: [26, 474], size: [315, 98], values: { ckpt_name: DEMO_CHECKPOINT } },
  { id: "6", classType: "CLIPTextEncode", pos: [415, 186], size: [422, 164],
    values: { text: "beautiful scenery nature glass bottle landscape, purple galaxy bottle" }, title: "Positive prompt" },
  { id: "7", classType: "CLIPTextEncode", pos: [413, 389], size: [425, 180], values: { text: "text, watermark" },
    title: "Negative prompt" },
  { id: "5", classType: "EmptyLatentImage", pos: [473, 609], size: [315, 106], values: { width: 512, height: 512, batch_size: 1 } },
  { id: "3", classType: "KSampler", pos: [863, 186], size: [315, 262],
    values: { seed: 0, steps: 20, cfg: 8, sampler_name: "euler", scheduler: "normal", denoise: 1 } },
  { id: "8", classType: "VAEDecode", pos: [1209, 188], size: [210, 46], values: {} },
  { id: "9", classType: "SaveImage", pos: [1451, 189], size: [210, 270], values: { filename_prefix: "sdgraph" } },
];

// [link id, source, source slot, target, target input, type]
const LINKS: [string, string, number, string, string, string][] = [
  ["1", "4", 0, "3", "model", "MODEL"],
  ["3", "4", 1, "6", "clip", "CLIP"],
  ["5", "4", 1, "7", "clip", "CLIP"],
  ["4", "6", 0, "3", "positive", "CONDITIONING"],
  ["6", "7", 0, "3", "negative", "CONDITIONING"],
  ["2", "5", 0, "3", "latent_image", "LATENT"],
  ["7", "3", 0, "8", "samples", "LATENT"],
  ["8", "4", 2, "8", "vae", "VAE"],
  ["9", "8", 0, "9", "images", "IMAGE"],
];

/** The default txt2img graph, or a single note when the server lacks its node types. */
export function defaultGraph(schemas: Schemas): Graph {
  const graph = emptyGraph();
  const missing = [...new Set(NODES.map((n) => n.classType))].filter((c) => !schemas.has(c));
  if (missing.length > 0) {
    graph.nodes.push({ id: "1", classType: "Note", pos: [80, 80], size: [420, 160], mode: MODE_NORMAL, values: {
      text: `The default txt2img workflow needs node types this server does not have (${missing.join(", ")}).\n`
        + "Double-click the canvas to add nodes." }, controls: {}, saved: {} });
    graph.lastNodeId = 1;
    return graph;
  }
  for (const placed of NODES) {
    const schema = schemas.get(placed.classType)!;
    const node: GraphNode = { id: placed.id, classType: placed.classType, pos: placed.pos, size: placed.size, mode: MODE_NORMAL,
      title: placed.title, values: {}, controls: {}, saved: {} };
    for (const widget of schema.widgets) {
      const wanted = placed.values[widget.name];
      node.values[widget.name] = wanted !== undefined && (widget.kind !== "COMBO" || widget.choices.includes(String(wanted)) || widget.name === "ckpt_name")
        ? wanted : widget.defaultValue;
      if (widget.control) node.controls[widget.name] = "randomize";
    }
    graph.nodes.push(node);
  }
  graph.links = LINKS.map(([id, source, sourceSlot, target, targetInput, type]): GraphLink => ({ id, source, sourceSlot, target, targetInput, type }));
  graph.lastNodeId = 9;
  graph.lastLinkId = 9;
  return graph;
}
