// Where a typed or dragged number settles, from the widget's schema options.
import type { WidgetSpec } from "../api/objectInfo";

function decimals(step: number): number {
  const text = String(step);
  return text.includes(".") ? text.split(".")[1].length : 0;
}

/** The number a typed or dragged value settles to: an INT on its step's multiples (ComfyUI snaps a width
 * of step 8 to 8s), a FLOAT rounded to its `round` option or step; then clamped to min and max. */
export function settleNumber(widget: WidgetSpec, value: number): number {
  const min = typeof widget.options.min === "number" ? widget.options.min : -Infinity;
  const max = typeof widget.options.max === "number" ? widget.options.max : Infinity;
  const clamp = (v: number) => Math.min(max, Math.max(min, v));
  let settled = clamp(value);
  if (widget.kind === "INT") {
    const step = Number(widget.options.step ?? 1) || 1;
    return clamp(Math.round(settled / step) * step);
  }
  const round = widget.options.round;
  const precision = round === false ? null : typeof round === "number" && round > 0 ? round : Number(widget.options.step ?? 0.01);
  if (precision) settled = Number((Math.round(settled / precision) * precision).toFixed(decimals(precision)));
  return clamp(settled);
}
