// Node schemas from `/object_info`, split once per class into the widgets and sockets the editor shows
// (web-editor.md section 2.1).

export type InputSpec = [unknown] | [unknown, Record<string, unknown>];

export interface ClassInfo {
  name: string;
  display_name?: string;
  description?: string;
  category?: string;
  input: {
    required?: Record<string, InputSpec>;
    optional?: Record<string, InputSpec>;
    hidden?: Record<string, unknown>;
  };
  input_order?: { required?: string[]; optional?: string[] };
  output: string[];
  output_name?: string[];
  output_is_list?: boolean[];
  output_node?: boolean;
  deprecated?: boolean;
  experimental?: boolean;
}

export type ObjectInfo = Record<string, ClassInfo>;

export type WidgetKind = "INT" | "FLOAT" | "STRING" | "BOOLEAN" | "COMBO";

export const CONTROL_MODES = ["fixed", "increment", "decrement", "randomize"] as const;
export type ControlMode = (typeof CONTROL_MODES)[number];

export interface WidgetSpec {
  name: string;
  kind: WidgetKind;
  options: Record<string, unknown>;
  choices: string[];
  optional: boolean;
  /** fixed/increment/decrement/randomize selector after the widget (seed-like inputs). */
  control: boolean;
  /** LoadImage's upload button: one extra `"image"` entry in widgets_values. */
  upload: boolean;
  defaultValue: unknown;
}

export interface SocketSpec {
  name: string;
  type: string;
  optional: boolean;
  tooltip?: string;
}

export interface OutputSpec {
  name: string;
  type: string;
  isList: boolean;
}

export interface ClassSchema {
  name: string;
  title: string;
  category: string;
  description: string;
  outputNode: boolean;
  /** Widgets in `widgets_values` order: required then optional, by input_order. */
  widgets: WidgetSpec[];
  /** Socket-only inputs, in schema order. */
  sockets: SocketSpec[];
  /** Every visible input in schema order (sockets and widgets), as ComfyUI lists a node's inputs. */
  inputOrder: string[];
  outputs: OutputSpec[];
}

const PRIMITIVE_KINDS = new Set(["INT", "FLOAT", "STRING", "BOOLEAN"]);

function ordered(names: Record<string, InputSpec> | undefined, order: string[] | undefined): string[] {
  const keys = Object.keys(names ?? {});
  if (!order) return keys;
  return [...order.filter((name) => keys.includes(name)), ...keys.filter((name) => !order.includes(name))];
}

/** A widget spec when the input spec describes a widget, else null (a socket). */
export function widgetFromSpec(name: string, spec: InputSpec, optional: boolean): WidgetSpec | null {
  const [type, rawOptions] = spec;
  const options = (rawOptions ?? {}) as Record<string, unknown>;
  if (options.forceInput) return null;
  let kind: WidgetKind;
  let choices: string[] = [];
  if (Array.isArray(type)) {
    kind = "COMBO";
    choices = type.map(String);
  } else if (type === "COMBO") {
    kind = "COMBO";
    choices = ((options.options as unknown[]) ?? []).map(String);
  } else if (typeof type === "string" && PRIMITIVE_KINDS.has(type)) {
    kind = type as WidgetKind;
  } else {
    return null;
  }
  return {
    name,
    kind,
    options,
    choices,
    optional,
    control: Boolean(options.control_after_generate),
    upload: Boolean(options.image_upload),
    defaultValue: defaultFor(kind, options, choices),
  };
}

function defaultFor(kind: WidgetKind, options: Record<string, unknown>, choices: string[]): unknown {
  if (options.default !== undefined) return options.default;
  switch (kind) {
    case "INT":
    case "FLOAT":
      return typeof options.min === "number" ? Math.max(0, options.min) : 0;
    case "STRING":
      return "";
    case "BOOLEAN":
      return false;
    case "COMBO":
      return choices[0] ?? "";
  }
}

export function parseClass(info: ClassInfo): ClassSchema {
  const widgets: WidgetSpec[] = [];
  const sockets: SocketSpec[] = [];
  const inputOrder: string[] = [];
  for (const group of ["required", "optional"] as const) {
    const specs = info.input?.[group] ?? {};
    for (const name of ordered(specs, info.input_order?.[group])) {
      const spec = specs[name];
      inputOrder.push(name);
      const widget = widgetFromSpec(name, spec, group === "optional");
      if (widget) widgets.push(widget);
      else
        sockets.push({
          name,
          type: String(spec[0]),
          optional: group === "optional",
          tooltip: (spec[1]?.tooltip as string | undefined) ?? undefined,
        });
    }
  }
  const outputs = (info.output ?? []).map((type, index) => ({
    type: String(type),
    name: info.output_name?.[index] ?? String(type),
    isList: Boolean(info.output_is_list?.[index]),
  }));
  return {
    name: info.name,
    title: info.display_name || info.name,
    category: info.category ?? "",
    description: info.description ?? "",
    outputNode: Boolean(info.output_node),
    widgets,
    sockets,
    inputOrder,
    outputs,
  };
}

/** Helper node types of the UI format that never reach the server (web-editor.md 3.3). */
export const HELPER_CLASSES: Record<string, ClassSchema> = {
  Reroute: {
    name: "Reroute", title: "Reroute", category: "utils", description: "Passes a link through.",
    outputNode: false, widgets: [], sockets: [{ name: "", type: "*", optional: false }], inputOrder: [""],
    outputs: [{ name: "", type: "*", isList: false }],
  },
  PrimitiveNode: {
    name: "PrimitiveNode", title: "Primitive", category: "utils",
    description: "One value fed into the widgets it is linked to.", outputNode: false, widgets: [], sockets: [],
    inputOrder: [], outputs: [{ name: "connect to widget input", type: "*", isList: false }],
  },
  Note: {
    name: "Note", title: "Note", category: "utils", description: "A text note.", outputNode: false,
    widgets: [{ name: "text", kind: "STRING", options: { multiline: true }, choices: [], optional: false,
      control: false, upload: false, defaultValue: "" }],
    sockets: [], inputOrder: ["text"], outputs: [],
  },
};
HELPER_CLASSES.MarkdownNote = { ...HELPER_CLASSES.Note, name: "MarkdownNote", title: "Markdown note" };

export function isHelper(classType: string): boolean {
  return classType in HELPER_CLASSES;
}

/** Parsed schemas, computed once per object_info (a prompt build over hundreds of nodes reuses them). */
export class Schemas {
  private readonly parsed = new Map<string, ClassSchema>();

  constructor(readonly info: ObjectInfo) {}

  get(classType: string): ClassSchema | undefined {
    if (classType in HELPER_CLASSES) return HELPER_CLASSES[classType];
    const cached = this.parsed.get(classType);
    if (cached) return cached;
    const info = this.info[classType];
    if (!info) return undefined;
    const schema = parseClass({ ...info, name: info.name ?? classType });
    this.parsed.set(classType, schema);
    return schema;
  }

  has(classType: string): boolean {
    return classType in HELPER_CLASSES || classType in this.info;
  }

  classNames(): string[] {
    return Object.keys(this.info);
  }
}

/** litegraph's rule: equal ignoring case, `*` or empty matches anything, `A,B` lists share a member. */
export function typesCompatible(output: string, input: string): boolean {
  if (!output || !input || output === "*" || input === "*") return true;
  const outs = output.toUpperCase().split(",").map((t) => t.trim());
  const ins = input.toUpperCase().split(",").map((t) => t.trim());
  return outs.some((t) => ins.includes(t));
}
