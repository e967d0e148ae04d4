import { describe, expect, it } from "vitest";
import { Schemas, type ObjectInfo } from "../api/objectInfo";
import coreInfo from "../fixtures/core_object_info.json";
import { addNode, classesAccepting, connect, connectionProblem, copyFragment, newNode, pasteFragment, removeLinks, removeNodes,
  toggleCollapse, toggleMode } from "./edit";
import { MODE_MUTED, MODE_NORMAL, emptyGraph, type Graph } from "./model";
import { buildPrompt } from "./toPrompt";

const schemas = new Schemas(coreInfo as unknown as ObjectInfo);

function graphOf(...classes: string[]): Graph {
  return classes.reduce((g, c, i) => addNode(g, newNode(g, schemas, c, [i * 300, 0])), emptyGraph());
}

describe("connect", () => {
  const g = graphOf("CheckpointLoaderSimple", "KSampler", "EmptyLatentImage", "EmptyLatentImage");

  it("links compatible sockets", () => {
    const linked = connect(g, schemas, { source: "3", sourceSlot: 0, target: "2", targetInput: "latent_image" });
    expect(linked.links).toEqual([{ id: "1", source: "3", sourceSlot: 0, target: "2", targetInput: "latent_image", type: "LATENT" }]);
  });

  it("keeps one link per input: a new one replaces the old", () => {
    const once = connect(g, schemas, { source: "3", sourceSlot: 0, target: "2", targetInput: "latent_image" });
    const twice = connect(once, schemas, { source: "4", sourceSlot: 0, target: "2", targetInput: "latent_image" });
    expect(twice.links.map((l) => l.source)).toEqual(["4"]);
  });

  it("refuses a type that does not fit, and says why", () => {
    expect(connectionProblem(g, schemas, { source: "1", sourceSlot: 1, target: "2", targetInput: "latent_image" })).toBe("CLIP does not fit LATENT");
    expect(connect(g, schemas, { source: "1", sourceSlot: 1, target: "2", targetInput: "latent_image" })).toBe(g);
  });

  it("refuses a link that would close a cycle", () => {
    const chain = connect(graphOf("LatentUpscale", "LatentUpscale"), schemas, { source: "1", sourceSlot: 0, target: "2", targetInput: "samples" });
    expect(connectionProblem(chain, schemas, { source: "2", sourceSlot: 0, target: "1", targetInput: "samples" })).toBe("the link would make a cycle");
  });

  it("feeds a widget from a link (a converted widget), and a primitive node takes that widget's shape and value", () => {
    let graph = graphOf("KSampler", "PrimitiveNode");
    graph = { ...graph, nodes: graph.nodes.map((n) => (n.id === "1" ? { ...n, values: { ...n.values, steps: 33 } } : n)) };
    graph = connect(graph, schemas, { source: "2", sourceSlot: 0, target: "1", targetInput: "steps" });
    expect(graph.nodes[1].primitive).toEqual({ type: "INT", widget: "steps", config: null });
    expect(graph.nodes[1].values).toEqual({ value: 33 });
    graph = { ...graph, nodes: graph.nodes.map((n) => (n.id === "2" ? { ...n, values: { value: 7 } } : n)) };
    expect(buildPrompt(graph, schemas).prompt["1"].inputs.steps).toBe(7);
  });
});

describe("removing", () => {
  const g = connect(graphOf("EmptyLatentImage", "LatentUpscale"), schemas, { source: "1", sourceSlot: 0, target: "2", targetInput: "samples" });

  it("a node takes its links with it", () => {
    expect(removeNodes(g, new Set(["1"])).links).toEqual([]);
  });

  it("nothing to remove leaves the same graph (no empty undo step)", () => {
    expect(removeLinks(g, new Set(["99"]))).toBe(g);
    expect(removeNodes(g, new Set(["99"]))).toBe(g);
  });
});

describe("toggleMode", () => {
  it("mutes, and muting again restores", () => {
    const g = graphOf("EmptyLatentImage");
    const muted = toggleMode(g, new Set(["1"]), MODE_MUTED);
    expect([muted.nodes[0].mode, toggleMode(muted, new Set(["1"]), MODE_MUTED).nodes[0].mode]).toEqual([MODE_MUTED, MODE_NORMAL]);
  });
});

describe("toggleCollapse", () => {
  it("collapses into the UI format's flags, keeping other flags, and expands when all are collapsed", () => {
    const g = graphOf("EmptyLatentImage", "EmptyLatentImage");
    const pinned = { ...g, nodes: g.nodes.map((n) => ({ ...n, saved: { flags: { pinned: true } } })) };
    const once = toggleCollapse(pinned, new Set(["1", "2"]));
    expect(once.nodes.map((n) => n.saved.flags)).toEqual([{ pinned: true, collapsed: true }, { pinned: true, collapsed: true }]);
    expect(toggleCollapse(once, new Set(["1"])).nodes[0].saved.flags).toEqual({ pinned: true, collapsed: false });
  });
});

describe("pasteFragment", () => {
  it("gives fresh ids, keeps the links among the copies, and offsets them", () => {
    const g = connect(graphOf("EmptyLatentImage", "LatentUpscale"), schemas, { source: "1", sourceSlot: 0, target: "2", targetInput: "samples" });
    const { graph, ids } = pasteFragment(g, copyFragment(g, new Set(["1", "2"])), [40, 40]);
    expect(ids).toEqual(["3", "4"]);
    expect(graph.links.at(-1)).toMatchObject({ source: "3", target: "4", targetInput: "samples" });
    expect(graph.nodes.find((n) => n.id === "3")!.pos).toEqual([40, 40]);
  });
});

describe("classesAccepting", () => {
  it("lists the classes with an input of that type", () => {
    expect(classesAccepting(schemas, "VAE").sort()).toEqual(["VAEDecode", "VAEEncode", "VAEEncodeForInpaint"]);
  });
});
