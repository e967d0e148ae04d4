// Opening and saving workflows: UI JSON, API JSON and PNGs with embedded metadata.
import type { Schemas } from "../api/objectInfo";
import { isApiPrompt, loadApiPrompt } from "../graph/apiLoad";
import type { Graph } from "../graph/model";
import { readPngText } from "../graph/png";
import { buildPrompt } from "../graph/toPrompt";
import { isUiWorkflow, loadUiWorkflow, saveUiWorkflow } from "../graph/workflow";

export class OpenError extends Error {}

/** A graph from a parsed JSON document: a UI workflow or an API prompt. */
export function graphFromJson(value: unknown, schemas: Schemas): Graph {
  if (isUiWorkflow(value)) return loadUiWorkflow(value, schemas);
  if (isApiPrompt(value)) return loadApiPrompt(value, schemas);
  throw new OpenError("this JSON is neither a UI workflow nor an API prompt");
}

/** A graph from a dropped or picked file (.json, or .png with a `workflow` or `prompt` text chunk). */
export async function graphFromFile(file: File, schemas: Schemas): Promise<Graph> {
  const buffer = await file.arrayBuffer();
  const text = readPngText(buffer);
  if (text) {
    const source = text.workflow ?? text.prompt;
    if (!source) throw new OpenError(`${file.name} carries no workflow`);
    return graphFromJson(JSON.parse(source), schemas);
  }
  try {
    return graphFromJson(JSON.parse(new TextDecoder().decode(buffer)), schemas);
  } catch (error) {
    if (error instanceof OpenError) throw error;
    throw new OpenError(`${file.name} is not a workflow: ${(error as Error).message}`);
  }
}

function download(name: string, value: unknown): void {
  const url = URL.createObjectURL(new Blob([JSON.stringify(value, null, 2)], { type: "application/json" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

const fileStem = (name: string) => name.replace(/[^\w.-]+/g, "_") || "workflow";

export function saveWorkflowFile(name: string, graph: Graph, schemas: Schemas): void {
  download(`${fileStem(name)}.json`, saveUiWorkflow(graph, schemas));
}

export function saveApiFile(name: string, graph: Graph, schemas: Schemas): void {
  download(`${fileStem(name)}_api.json`, buildPrompt(graph, schemas).prompt);
}
