// One widget row per schema widget: number, text, toggle, drop-down, plus the seed control selector and
// LoadImage's upload button (web-editor.md 2.1). Every row also carries a target handle (in NodeView).
import { useEffect, useRef, useState, type PointerEvent as ReactPointerEvent } from "react";
import { uploadImage } from "../api/client";
import { CONTROL_MODES, type WidgetSpec } from "../api/objectInfo";
import type { EditKind } from "../store/editor";
import { settleNumber } from "./numbers";

export interface WidgetProps {
  testId: string;
  widget: WidgetSpec;
  value: unknown;
  onChange(value: unknown, kind: EditKind): void;
  onCommit(): void;
}

function NumberWidget({ testId, widget, value, onChange, onCommit }: WidgetProps) {
  const [text, setText] = useState(String(value ?? ""));
  const drag = useRef<{ x: number; start: number } | null>(null);
  useEffect(() => setText(String(value ?? "")), [value]);
  const step = widget.kind === "INT" ? Number(widget.options.step ?? 1) || 1 : Number(widget.options.step ?? 0.1) || 0.1;
  const settle = () => {
    const parsed = Number(text);
    if (text.trim() === "" || !Number.isFinite(parsed)) setText(String(value ?? ""));
    else onChange(settleNumber(widget, parsed), "coalesce");
    onCommit();
  };
  const nudge = (direction: number) => onChange(settleNumber(widget, (Number(value) || 0) + direction * step), "coalesce");
  const onPointerDown = (event: ReactPointerEvent<HTMLSpanElement>) => {
    drag.current = { x: event.clientX, start: Number(value) || 0 };
    event.currentTarget.setPointerCapture(event.pointerId);
  };
  const onPointerMove = (event: ReactPointerEvent<HTMLSpanElement>) => {
    if (!drag.current) return;
    const steps = Math.round((event.clientX - drag.current.x) / 6);
    onChange(settleNumber(widget, drag.current.start + steps * step), "live");
  };
  const onPointerUp = () => {
    drag.current = null;
    onCommit();
  };
  const slider = widget.options.display === "slider" && typeof widget.options.min === "number" && typeof widget.options.max === "number";
  return (
    <span className="number-widget">
      <button type="button" className="nudge" tabIndex={-1} onClick={() => nudge(-1)} aria-label={`decrease ${widget.name}`}>‹</button>
      <span className="drag-label nodrag" title="drag to change" onPointerDown={onPointerDown} onPointerMove={onPointerMove}
        onPointerUp={onPointerUp}>{widget.name}</span>
      {slider && <input type="range" className="nodrag" min={Number(widget.options.min)} max={Number(widget.options.max)} step={step}
        value={Number(value) || 0} onChange={(e) => onChange(settleNumber(widget, Number(e.target.value)), "coalesce")} />}
      <input data-testid={testId} className="nodrag nowheel" type="number" step={step} value={text}
        min={widget.options.min as number | undefined} max={widget.options.max as number | undefined}
        onChange={(e) => {
          setText(e.target.value);
          const parsed = Number(e.target.value);
          if (e.target.value.trim() !== "" && Number.isFinite(parsed)) onChange(widget.kind === "INT" ? Math.round(parsed) : parsed, "coalesce");
        }}
        onBlur={settle} onKeyDown={(e) => e.key === "Enter" && settle()} />
      <button type="button" className="nudge" tabIndex={-1} onClick={() => nudge(1)} aria-label={`increase ${widget.name}`}>›</button>
    </span>
  );
}

function TextWidget({ testId, widget, value, onChange, onCommit }: WidgetProps) {
  const common = { "data-testid": testId, className: "nodrag nowheel", value: String(value ?? ""), placeholder: (widget.options.placeholder as string) ?? widget.name,
    onBlur: onCommit, spellCheck: false };
  return widget.options.multiline
    ? <textarea {...common} rows={4} onChange={(e) => onChange(e.target.value, "coalesce")} />
    : <label className="inline"><span>{widget.name}</span><input {...common} onChange={(e) => onChange(e.target.value, "coalesce")} /></label>;
}

function BooleanWidget({ testId, widget, value, onChange }: WidgetProps) {
  const on = Boolean(value);
  return (
    <label className="inline toggle">
      <span>{widget.name}</span>
      <input data-testid={testId} className="nodrag" type="checkbox" checked={on} onChange={(e) => onChange(e.target.checked, "step")} />
      <em>{on ? String(widget.options.label_on ?? "true") : String(widget.options.label_off ?? "false")}</em>
    </label>
  );
}

function ComboWidget({ testId, widget, value, onChange }: WidgetProps) {
  const current = String(value ?? "");
  const missing = !widget.choices.includes(current);
  const [uploading, setUploading] = useState<string | null>(null);
  const upload = async (file: File | undefined) => {
    if (!file) return;
    setUploading("uploading…");
    try {
      const ref = await uploadImage(file);
      const name = ref.subfolder ? `${ref.subfolder}/${ref.filename}` : ref.filename;
      if (!widget.choices.includes(name)) widget.choices.push(name);
      onChange(name, "step");
      setUploading(null);
    } catch (error) {
      setUploading(`upload failed: ${(error as Error).message}`);
    }
  };
  return (
    <label className={`inline combo${missing ? " missing" : ""}`} title={missing ? `${current} is not on the server` : undefined}>
      <span>{widget.name}</span>
      <select data-testid={testId} className="nodrag nowheel" value={current} onChange={(e) => onChange(e.target.value, "step")}>
        {missing && <option value={current}>{current || "(none)"} ⚠ missing</option>}
        {widget.choices.map((choice) => <option key={choice} value={choice}>{choice}</option>)}
      </select>
      {widget.upload && (
        <input data-testid={`${testId}-upload`} className="nodrag upload" type="file" accept="image/*" title="upload an image"
          onChange={(e) => upload(e.target.files?.[0])} />
      )}
      {uploading && <small>{uploading}</small>}
    </label>
  );
}

export function WidgetEditor(props: WidgetProps) {
  switch (props.widget.kind) {
    case "INT":
    case "FLOAT":
      return <NumberWidget {...props} />;
    case "STRING":
      return <TextWidget {...props} />;
    case "BOOLEAN":
      return <BooleanWidget {...props} />;
    case "COMBO":
      return <ComboWidget {...props} />;
  }
}

export function ControlSelect({ testId, mode, onChange }: { testId: string; mode: string; onChange(mode: string): void }) {
  return (
    <label className="inline control">
      <span>control after generate</span>
      <select data-testid={testId} className="nodrag" value={mode} onChange={(e) => onChange(e.target.value)}>
        {CONTROL_MODES.map((m) => <option key={m} value={m}>{m}</option>)}
      </select>
    </label>
  );
}
