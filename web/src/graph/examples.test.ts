// The nine ComfyUI-made example workflows, read from the shared data folder at test time: each UI file,
// converted with our rules, must give the API prompt ComfyUI's own frontend embedded beside it.
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { Schemas, type ObjectInfo } from "../api/objectInfo";
import coreInfo from "../fixtures/core_object_info.json";
import { buildPrompt } from "./toPrompt";
import { loadUiWorkflow, saveUiWorkflow } from "./workflow";

const EXAMPLES = process.env.SDGRAPH_COMFYUI_EXAMPLES ?? join(__dirname, "../../../../shared/data/comfyui-examples");
const schemas = new Schemas(coreInfo as unknown as ObjectInfo);
const names = readdirSync(EXAMPLES).filter((f) => f.endsWith(".workflow.json")).map((f) => f.replace(".workflow.json", ""));

// Inputs that ComfyUI's old frontend sent but that are not inputs of the node.
const UI_LEFTOVERS = new Set(["choose file to upload", "upload"]);
// Widgets newer than the file: the loader fills their schema default, which the old prompt lacks.
const NEWER_WIDGETS: Record<string, Record<string, Record<string, unknown>>> = {
  inpaint_example: { VAEEncodeForInpaint: { grow_mask_by: 6 } },
  sdxlturbo_example: { SDTurboScheduler: { denoise: 1 } },
};

function read(name: string, kind: string): Record<string, unknown> {
  return JSON.parse(readFileSync(join(EXAMPLES, `${name}.${kind}.json`), "utf8"));
}

function expectedPrompt(name: string): Record<string, { class_type: string; inputs: Record<string, unknown> }> {
  const prompt = read(name, "prompt") as Record<string, { class_type: string; inputs: Record<string, unknown> }>;
  const result: typeof prompt = {};
  for (const [id, node] of Object.entries(prompt)) {
    const inputs = Object.fromEntries(Object.entries(node.inputs).filter(([key]) => !UI_LEFTOVERS.has(key)));
    Object.assign(inputs, NEWER_WIDGETS[name]?.[node.class_type] ?? {});
    result[id] = { class_type: node.class_type, inputs };
  }
  return result;
}

function ours(prompt: ReturnType<typeof buildPrompt>["prompt"]) {
  return Object.fromEntries(Object.entries(prompt).map(([id, n]) => [id, { class_type: n.class_type, inputs: n.inputs }]));
}

describe("ComfyUI example workflows", () => {
  it("are all nine present", () => {
    expect(names).toHaveLength(9);
  });

  for (const name of names) {
    it(`${name}: the UI file converts to the prompt ComfyUI embedded`, () => {
      const graph = loadUiWorkflow(read(name, "workflow"), schemas);
      const built = buildPrompt(graph, schemas, () => 0);
      expect(built.problems).toEqual([]);
      expect(ours(built.prompt)).toEqual(expectedPrompt(name));
    });

    it(`${name}: save then load gives the same prompt`, () => {
      const graph = loadUiWorkflow(read(name, "workflow"), schemas);
      const again = loadUiWorkflow(JSON.parse(JSON.stringify(saveUiWorkflow(graph, schemas))), schemas);
      expect(buildPrompt(again, schemas, () => 0).prompt).toEqual(buildPrompt(graph, schemas, () => 0).prompt);
    });
  }
});
