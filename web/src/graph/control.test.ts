import { describe, expect, it } from "vitest";
import { Schemas, type ObjectInfo } from "../api/objectInfo";
import coreInfo from "../fixtures/core_object_info.json";
import { applyControlAfterGenerate, nextValue } from "./control";
import { loadUiWorkflow } from "./workflow";

const schemas = new Schemas(coreInfo as unknown as ObjectInfo);
const seed = schemas.get("KSampler")!.widgets.find((w) => w.name === "seed")!;

describe("nextValue", () => {
  it("follows each control mode", () => {
    expect([nextValue(5, "fixed", seed), nextValue(5, "increment", seed), nextValue(5, "decrement", seed),
      nextValue(0, "decrement", seed)]).toEqual([5, 6, 4, 0]);
  });

  it("randomizes within the widget's range", () => {
    expect(nextValue(5, "randomize", seed, () => 0.5)).toBe(2 ** 49);
  });
});

describe("applyControlAfterGenerate", () => {
  it("advances node widgets and primitive nodes, and leaves fixed ones", () => {
    const ui = {
      nodes: [
        { id: 1, type: "KSampler", pos: [0, 0], widgets_values: [10, "increment", 20, 8, "euler", "normal", 1] },
        { id: 2, type: "KSampler", pos: [0, 0], widgets_values: [10, "fixed", 20, 8, "euler", "normal", 1] },
        { id: 3, type: "PrimitiveNode", pos: [0, 0], outputs: [{ name: "INT", type: "INT", links: [1], widget: { name: "seed" } }],
          widgets_values: [100, "decrement"] },
        { id: 4, type: "KSampler", pos: [0, 0], inputs: [{ name: "seed", type: "INT", link: 1, widget: { name: "seed" } }],
          widgets_values: [0, "fixed", 20, 8, "euler", "normal", 1] },
      ],
      links: [[1, 3, 0, 4, 0, "INT"]],
    };
    const next = applyControlAfterGenerate(loadUiWorkflow(ui, schemas), schemas);
    expect(next.nodes.map((n) => n.values.seed ?? n.values.value)).toEqual([11, 10, 99, 0]);
  });
});
