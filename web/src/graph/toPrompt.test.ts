import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { Schemas, type ObjectInfo } from "../api/objectInfo";
import coreInfo from "../fixtures/core_object_info.json";
import { defaultGraph, DEMO_CHECKPOINT } from "./defaultGraph";
import { MODE_BYPASSED, MODE_MUTED } from "./model";
import { buildPrompt, resolveDynamicPrompt } from "./toPrompt";
import { loadUiWorkflow } from "./workflow";

// Shared with the Python side: each NAME.ui.json beside the NAME.api.json it must convert to.
const FIXTURES = join(__dirname, "../../../tests/web/fixtures");
const schemas = new Schemas(coreInfo as unknown as ObjectInfo);
const fixture = (name: string) => JSON.parse(readFileSync(join(FIXTURES, name), "utf8"));
const firstChoice = () => 0;

function withoutMeta(prompt: ReturnType<typeof buildPrompt>["prompt"]) {
  return Object.fromEntries(Object.entries(prompt).map(([id, n]) => [id, { class_type: n.class_type, inputs: n.inputs }]));
}

describe("shared UI -> API fixtures", () => {
  for (const file of readdirSync(FIXTURES).filter((f) => f.endsWith(".ui.json"))) {
    it(file, () => {
      const graph = loadUiWorkflow(fixture(file), schemas);
      expect(withoutMeta(buildPrompt(graph, schemas, firstChoice).prompt)).toEqual(fixture(file.replace(".ui.json", ".api.json")));
    });
  }
});

describe("buildPrompt", () => {
  const sampling = () => loadUiWorkflow(fixture("bypass_and_mute.ui.json"), schemas);

  it("sends the seed's value and not its control mode", () => {
    const inputs = buildPrompt(sampling(), schemas).prompt["3"].inputs;
    expect(inputs.seed).toBe(1234);
    expect(Object.values(inputs)).not.toContain("randomize");
  });

  it("routes a bypassed node's output to its input of the same type", () => {
    const graph = sampling();
    expect(graph.nodes.find((n) => n.id === "2")!.mode).toBe(MODE_BYPASSED);
    expect(buildPrompt(graph, schemas).prompt["6"].inputs.clip).toEqual(["4", 1]);
  });

  it("drops a link whose source is muted, so the server reports the missing input", () => {
    const graph = sampling();
    graph.nodes.find((n) => n.id === "3")!.mode = MODE_MUTED;
    const prompt = buildPrompt(graph, schemas).prompt;
    expect(prompt["3"]).toBeUndefined();
    expect(prompt["8"].inputs).toEqual({ vae: ["4", 2] });
  });

  it("refuses an unknown node type reachable from an output", () => {
    const graph = loadUiWorkflow(fixture("reroute_primitive_converted.ui.json"), schemas);
    expect(buildPrompt(graph, schemas).problems).toEqual([{ nodeId: "1", message: "node type SomeCustomLoader is not installed on the server" }]);
  });

  it("names a subgraph instance as such when refusing it", () => {
    const graph = loadUiWorkflow({ nodes: [{ id: 5, type: "8d6b3c1e-uuid", pos: [0, 0] }], links: [],
      definitions: { subgraphs: [{ id: "8d6b3c1e-uuid", name: "Upscaler", nodes: [], links: [] }] } }, schemas);
    expect(buildPrompt(graph, schemas).problems).toEqual([{ nodeId: "5",
      message: 'subgraph "Upscaler" cannot be queued yet: subgraphs are kept, not expanded' }]);
  });

  it("wraps a list-valued constant so it cannot read as a link", () => {
    const graph = sampling();
    graph.nodes.find((n) => n.id === "7")!.values.text = ["a", 1];
    expect(buildPrompt(graph, schemas).prompt["7"].inputs.text).toEqual({ __value__: ["a", 1] });
  });

  it("titles each node for _meta", () => {
    const graph = sampling();
    graph.nodes.find((n) => n.id === "6")!.title = "Positive";
    const prompt = buildPrompt(graph, schemas).prompt;
    expect([prompt["6"]._meta.title, prompt["7"]._meta.title]).toEqual(["Positive", "CLIPTextEncode"]);
  });
});

describe("resolveDynamicPrompt", () => {
  it("picks one alternative per group, nested groups first", () => {
    expect(resolveDynamicPrompt("a {cat|{red|blue} dog}", () => 0.99)).toBe("a blue dog");
  });

  it("removes comments first", () => {
    expect(resolveDynamicPrompt("a cat // not this\nsitting /* nor {this|that} */ still", () => 0)).toBe("a cat \nsitting  still");
  });

  it("leaves text without groups unchanged", () => {
    expect(resolveDynamicPrompt("plain (weighted:1.2) text")).toBe("plain (weighted:1.2) text");
  });
});

describe("defaultGraph", () => {
  it("is ComfyUI's txt2img on the demo checkpoint", () => {
    const prompt = buildPrompt(defaultGraph(schemas), schemas).prompt;
    expect(Object.values(prompt).map((n) => n.class_type).sort()).toEqual(["CLIPTextEncode", "CLIPTextEncode",
      "CheckpointLoaderSimple", "EmptyLatentImage", "KSampler", "SaveImage", "VAEDecode"]);
    expect(prompt["4"].inputs.ckpt_name).toBe(DEMO_CHECKPOINT);
    expect(prompt["3"].inputs).toMatchObject({ steps: 20, cfg: 8, sampler_name: "euler", scheduler: "normal",
      model: ["4", 0], positive: ["6", 0], negative: ["7", 0], latent_image: ["5", 0] });
    expect(prompt["5"].inputs).toEqual({ width: 512, height: 512, batch_size: 1 });
  });

  it("is a single note when the server lacks those node types", () => {
    const graph = defaultGraph(new Schemas({}));
    expect(graph.nodes.map((n) => n.classType)).toEqual(["Note"]);
    expect(String(graph.nodes[0].values.text)).toContain("CheckpointLoaderSimple");
  });
});
