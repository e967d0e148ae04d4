// Queueing the active workflow: build the API prompt, POST it, then advance control_after_generate.
import { queuePrompt } from "../api/client";
import { applyControlAfterGenerate } from "../graph/control";
import { buildPrompt } from "../graph/toPrompt";
import { saveUiWorkflow } from "../graph/workflow";
import { activeTab, useEditor } from "./editor";
import { useRun, type NodeProblem } from "./run";

export const clientId = { value: "" };

/** Queue the active workflow `count` times; stops at the first refusal. */
export async function queueActive(count = 1): Promise<void> {
  for (let run = 0; run < Math.max(1, count); run += 1) {
    const { schemas } = useEditor.getState();
    useEditor.getState().settle();
    const graph = activeTab().graph;
    const built = buildPrompt(graph, schemas);
    if (built.problems.length > 0) {
      const local: Record<string, NodeProblem[]> = {};
      for (const p of built.problems) (local[p.nodeId] ??= []).push({ message: p.message });
      useRun.getState().rejected("the workflow cannot be queued", {}, local);
      return;
    }
    let answer;
    try {
      answer = await queuePrompt({ prompt: built.prompt, client_id: clientId.value,
        extra_data: { extra_pnginfo: { workflow: saveUiWorkflow(graph, schemas) } } });
    } catch (error) {
      useRun.getState().rejected(`the server could not be reached: ${error}`, {});
      return;
    }
    if (!answer.ok || !answer.promptId) {
      const message = [answer.error?.message, answer.error?.details].filter(Boolean).join(": ") || "the server refused the prompt";
      useRun.getState().rejected(message, answer.nodeErrors);
      return;
    }
    useRun.getState().queued(answer.promptId, answer.nodeErrors);
    // The value sent is the one shown; the next run gets the next value (ComfyUI's "after" setting).
    useEditor.getState().edit((g) => (g === graph ? applyControlAfterGenerate(g, schemas) : g), "live");
    useEditor.getState().settle();
  }
}
