import { describe, expect, it } from "vitest";
import { widgetFromSpec } from "../api/objectInfo";
import { settleNumber } from "./numbers";

const steps = widgetFromSpec("steps", ["INT", { default: 20, min: 1, max: 10000 }], false)!;
const cfg = widgetFromSpec("cfg", ["FLOAT", { default: 8, min: 0, max: 100, step: 0.1, round: 0.01 }], false)!;
const denoise = widgetFromSpec("denoise", ["FLOAT", { default: 1, min: 0, max: 1, step: 0.01 }], false)!;
const free = widgetFromSpec("x", ["FLOAT", { default: 0, round: false }], false)!;

describe("settleNumber", () => {
  it("clamps to min and max", () => {
    expect([settleNumber(steps, 0), settleNumber(steps, 20000)]).toEqual([1, 10000]);
  });

  it("rounds an INT to a whole number", () => {
    expect(settleNumber(steps, 7.6)).toBe(8);
  });

  it("snaps an INT to its step's multiples", () => {
    const width = widgetFromSpec("width", ["INT", { default: 512, min: 16, max: 16384, step: 8 }], false)!;
    expect([settleNumber(width, 500), settleNumber(width, 3)]).toEqual([504, 16]);
  });

  it("rounds a FLOAT to its round option, else to its step", () => {
    expect([settleNumber(cfg, 7.456), settleNumber(denoise, 0.8751)]).toEqual([7.46, 0.88]);
  });

  it("leaves a FLOAT with round: false as typed", () => {
    expect(settleNumber(free, 0.123456)).toBe(0.123456);
  });
});
