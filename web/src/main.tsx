import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import "@xyflow/react/dist/style.css";
import { Schemas } from "./api/objectInfo";
import { buildPrompt } from "./graph/toPrompt";
import { saveUiWorkflow } from "./graph/workflow";
import { activeTab, useEditor } from "./store/editor";
import { App } from "./ui/App";

declare global {
  interface Window {
    /** A read-only view for tests and the console. */
    sdgraph: Record<string, () => unknown>;
  }
}

const schemas = (): Schemas => useEditor.getState().schemas;
window.sdgraph = {
  nodes: () => activeTab().graph.nodes,
  links: () => activeTab().graph.links,
  apiPrompt: () => buildPrompt(activeTab().graph, schemas()).prompt,
  workflow: () => saveUiWorkflow(activeTab().graph, schemas()),
  tabs: () => useEditor.getState().tabs.map((t) => t.name),
};

createRoot(document.getElementById("root")!).render(<StrictMode><App /></StrictMode>);
