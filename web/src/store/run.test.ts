import { beforeEach, describe, expect, it } from "vitest";
import { useRun } from "./run";

const initial = useRun.getState();
const send = (type: string, data: Record<string, unknown>) => useRun.getState().handle({ type, data });

describe("run state from websocket events", () => {
  beforeEach(() => useRun.setState(initial, true));

  it("follows a run: running node, progress, cached nodes, images, done", () => {
    useRun.getState().queued("p1");
    send("execution_start", { prompt_id: "p1" });
    send("execution_cached", { nodes: ["4"], prompt_id: "p1" });
    send("executing", { node: "3", display_node: "3", prompt_id: "p1" });
    send("progress", { node: "3", value: 2, max: 5, prompt_id: "p1" });
    const during = useRun.getState();
    expect([during.status, during.executing, during.progress["3"], during.cached]).toEqual(["running", "3", { value: 2, max: 5 }, ["4"]]);
    send("executed", { node: "9", output: { images: [{ filename: "a.png", subfolder: "", type: "output" }] }, prompt_id: "p1" });
    send("execution_success", { prompt_id: "p1" });
    send("executing", { node: null, prompt_id: "p1" });
    const after = useRun.getState();
    expect([after.status, after.executing, after.images["9"][0].filename]).toEqual(["done", null, "a.png"]);
  });

  it("stays done when the POST answer arrives after a fast run has finished", () => {
    send("execution_start", { prompt_id: "p2" });
    send("execution_success", { prompt_id: "p2" });
    useRun.getState().queued("p2");
    expect(useRun.getState().status).toBe("done");
  });

  it("keeps the error dialog and node error when the POST answer arrives after a fast failure", () => {
    send("execution_start", { prompt_id: "p4" });
    send("execution_error", { prompt_id: "p4", node_id: "2", node_type: "Fail", exception_type: "RuntimeError",
      exception_message: "it broke", traceback: [] });
    useRun.getState().queued("p4");
    const state = useRun.getState();
    expect([state.status, state.failure?.message, state.problems["2"]?.length]).toEqual(["failed", "it broke", 1]);
  });

  it("puts an execution error on its node", () => {
    send("execution_start", { prompt_id: "p3" });
    send("execution_error", { prompt_id: "p3", node_id: "7", node_type: "Fail", exception_type: "RuntimeError",
      exception_message: "boom", traceback: ["line\n"] });
    const state = useRun.getState();
    expect([state.status, state.failure?.nodeId, state.problems["7"]]).toEqual(["failed", "7", [{ message: "RuntimeError: boom" }]]);
  });

  it("shows validation errors on the inputs they name", () => {
    useRun.getState().rejected("Prompt outputs failed validation", { "3": { errors: [{ message: "Value not in list",
      details: "sampler_name: 'eulr' not in [...]", extra_info: { input_name: "sampler_name" } }] } });
    expect(useRun.getState().problems).toEqual({ "3": [{ message: "Value not in list: sampler_name: 'eulr' not in [...]", input: "sampler_name" }] });
  });

  it("reads the queue size from status messages", () => {
    send("status", { status: { exec_info: { queue_remaining: 3 } }, sid: "x" });
    expect(useRun.getState().queueRemaining).toBe(3);
  });
});
