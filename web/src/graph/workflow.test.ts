import { describe, expect, it } from "vitest";
import { Schemas, parseClass, type ClassInfo, type ObjectInfo } from "../api/objectInfo";
import coreInfo from "../fixtures/core_object_info.json";
import { loadApiPrompt } from "./apiLoad";
import { buildPrompt } from "./toPrompt";
import { loadUiWorkflow, readWidgetValues, saveUiWorkflow, writeWidgetValues } from "./workflow";

const schemas = new Schemas(coreInfo as unknown as ObjectInfo);
const info = coreInfo as unknown as Record<string, ClassInfo>;

const pickerInfo: ClassInfo = {
  name: "Picker", input: { required: {
    image: [["a.png", "b.png"], { image_upload: true }],
    style: ["COMBO", { options: ["x", "y"], control_after_generate: true }],
    amount: ["FLOAT", { default: 0.5 }],
    hidden_text: ["STRING", { forceInput: true }],
  } }, output: ["IMAGE"],
};

describe("readWidgetValues", () => {
  it("skips the seed's control entry", () => {
    const read = readWidgetValues(parseClass(info.KSampler), [5, "increment", 30, 7, "euler", "karras", 0.5]);
    expect(read.values).toEqual({ seed: 5, steps: 30, cfg: 7, sampler_name: "euler", scheduler: "karras", denoise: 0.5 });
    expect(read.controls).toEqual({ seed: "increment" });
  });

  it("skips a combo's control and filter entries and the upload entry; forceInput has no slot", () => {
    const read = readWidgetValues(parseClass(pickerInfo), ["b.png", "image", "y", "randomize", "", 0.25]);
    expect(read.values).toEqual({ image: "b.png", style: "y", amount: 0.25 });
    expect(read.controls).toEqual({ style: "randomize" });
  });

  it("accepts widgets_values keyed by input name", () => {
    expect(readWidgetValues(parseClass(info.EmptyLatentImage), { height: 640, width: 320 }).values)
      .toEqual({ width: 320, height: 640, batch_size: 1 });
  });

  it("reads a file from before the seed had a control entry", () => {
    expect(readWidgetValues(parseClass(info.KSampler), [1, 20, 8, "euler", "normal", 1]).values)
      .toEqual({ seed: 1, steps: 20, cfg: 8, sampler_name: "euler", scheduler: "normal", denoise: 1 });
  });

  it("reads an old boolean control slot as randomize", () => {
    expect(readWidgetValues(parseClass(info.KSampler), [1, true, 20, 8, "euler", "normal", 1]).controls.seed).toBe("randomize");
  });

  it("writes back the same array it read", () => {
    const saved = ["b.png", "image", "y", "decrement", "", 0.25];
    const schema = parseClass(pickerInfo);
    const node = { id: "1", classType: "Picker", pos: [0, 0] as [number, number], mode: 0 as const, saved: {},
      ...readWidgetValues(schema, saved) };
    expect(writeWidgetValues(schema, node)).toEqual(saved);
  });
});

describe("loadUiWorkflow", () => {
  const file = {
    last_node_id: 3, last_link_id: 1, version: 0.4, extra: { ds: { scale: 0.5, offset: [10, 20] } }, mystery: { keep: true },
    groups: [{ title: "G", bounding: [0, 0, 100, 100], color: "#fff", font_size: 24, locked: true }],
    nodes: [
      { id: 1, type: "CheckpointLoaderSimple", pos: [0, 0], size: [300, 100], mode: 0, outputs: [], widgets_values: ["not-installed.ckpt"],
        color: "#322" },
      { id: 2, type: "MysteryNode", pos: [1, 2], mode: 0, inputs: [{ name: "x", type: "MODEL", link: 1 }],
        outputs: [{ name: "y", type: "FOO", links: null }], widgets_values: [1, "two"], properties: { cnr_id: "pack" } },
      { id: 3, type: "CheckpointLoaderSimple", pos: [0, 200], mode: 2, outputs: [{ name: "MODEL", type: "MODEL", links: [1] }],
        widgets_values: ["sdgraph-demo-tiny-sd1.safetensors"] },
    ],
    links: [[1, 3, 0, 2, 0, "MODEL"]],
  };

  it("keeps a combo value outside the server's list instead of replacing it", () => {
    expect(loadUiWorkflow(file, schemas).nodes[0].values.ckpt_name).toBe("not-installed.ckpt");
  });

  it("keeps an unknown node type with its slots and values, and saves it back unchanged", () => {
    const saved = saveUiWorkflow(loadUiWorkflow(file, schemas), schemas) as { nodes: Record<string, unknown>[] };
    const mystery = saved.nodes.find((n) => n.id === 2)!;
    expect(mystery).toMatchObject({ type: "MysteryNode", widgets_values: [1, "two"], properties: { cnr_id: "pack" },
      inputs: [{ name: "x", type: "MODEL", link: 1 }] });
  });

  it("keeps unknown top-level keys, the camera, node colours and group extras when re-saving", () => {
    const saved = saveUiWorkflow(loadUiWorkflow(file, schemas), schemas) as Record<string, unknown>;
    expect(saved.mystery).toEqual({ keep: true });
    expect(saved.extra).toEqual({ ds: { scale: 0.5, offset: [10, 20] } });
    expect((saved.nodes as Record<string, unknown>[])[0].color).toBe("#322");
    expect(saved.groups).toEqual([{ title: "G", bounding: [0, 0, 100, 100], color: "#fff", font_size: 24, locked: true }]);
  });

  it("reads the mode of muted nodes", () => {
    expect(loadUiWorkflow(file, schemas).nodes.map((n) => n.mode)).toEqual([0, 0, 2]);
  });

  it("matches a link's target slot by the saved inputs' names, not the schema's order", () => {
    const ui = {
      nodes: [
        { id: 1, type: "EmptyLatentImage", pos: [0, 0], outputs: [], widgets_values: [512, 512, 1] },
        { id: 2, type: "VAEDecode", pos: [0, 0], inputs: [{ name: "vae", type: "VAE", link: null }, { name: "samples", type: "LATENT", link: 7 }] },
      ],
      links: [[7, 1, 0, 2, 1, "LATENT"]],
    };
    expect(loadUiWorkflow(ui, schemas).links).toEqual([{ id: "7", source: "1", sourceSlot: 0, target: "2", targetInput: "samples", type: "LATENT" }]);
  });
});

describe("loadApiPrompt", () => {
  const prompt = {
    "10": { class_type: "EmptyLatentImage", inputs: { width: 640, height: 512, batch_size: 1 } },
    "4": { class_type: "CheckpointLoaderSimple", inputs: { ckpt_name: "m.safetensors" } },
    "3": { class_type: "KSampler", inputs: { seed: 9, steps: 4, cfg: 2, sampler_name: "euler", scheduler: "normal", denoise: 1,
      model: ["4", 0], positive: ["5", 0], negative: ["5", 0], latent_image: ["10", 0] } },
    "5": { class_type: "CLIPTextEncode", inputs: { text: "x", clip: ["4", 1] } },
  };

  it("round-trips to the same prompt", () => {
    const built = buildPrompt(loadApiPrompt(prompt, schemas), schemas).prompt;
    expect(Object.fromEntries(Object.entries(built).map(([id, n]) => [id, { class_type: n.class_type, inputs: n.inputs }]))).toEqual(prompt);
  });

  it("places each node in a column after the nodes it depends on", () => {
    const x = Object.fromEntries(loadApiPrompt(prompt, schemas).nodes.map((n) => [n.id, n.pos[0]]));
    expect(x["4"]).toBeLessThan(x["5"]);
    expect(x["5"]).toBeLessThan(x["3"]);
    expect(x["10"]).toBeLessThan(x["3"]);
  });

  it("keeps the seed it ran with (control fixed)", () => {
    expect(loadApiPrompt(prompt, schemas).nodes.find((n) => n.id === "3")!.controls).toEqual({ seed: "fixed" });
  });
});
