"""Execution: order, partial execution, events, progress, interrupts, failures and what nodes receive."""
from __future__ import annotations

import threading

from engine import Executor, Int, NodeResult, ResultCache, node
from engine.events import ExecutionError, ExecutionInterrupted, NodeDone, Progress
from toy_nodes import build_prompt

DIAMOND = build_prompt(("1", "Constant", {"value": 3}), ("2", "Add", {"a": ["1", 0], "b": 1}),
                       ("3", "Multiply", {"a": ["1", 0], "b": 2}), ("4", "Add", {"a": ["2", 0], "b": ["3", 0]}),
                       ("5", "Output", {"value": ["4", 0]}))


def executing_order(events):
    return [e.node for e in events.of("executing") if e.node is not None]


def test_nodes_run_sources_first_and_compute_the_value(executor, events):
    result = executor.execute(DIAMOND, prompt_id="p1")
    assert result.status == "success"
    assert result.outputs == {"5": {"value": [(3 + 1) + 3 * 2]}}
    assert result.executed == ("1", "2", "3", "4", "5")
    assert executing_order(events) == ["1", "2", "3", "4", "5"]


def test_event_sequence_follows_comfyui_order(executor, events):
    executor.execute(build_prompt(("1", "Constant", {"value": 1}), ("2", "Output", {"value": ["1", 0]})),
                     prompt_id="p1")
    assert events.kinds() == ["execution_start", "execution_cached", "executing", "executing", "executed",
                              "execution_success", "executing"]
    assert [e.data() for e in events.of("executing")] == [
        {"node": "1", "display_node": "1", "prompt_id": "p1"}, {"node": "2", "display_node": "2", "prompt_id": "p1"},
        {"node": None, "display_node": None, "prompt_id": "p1"}]
    executed = events.of("executed")[0]
    assert executed.data() == {"node": "2", "display_node": "2", "output": {"value": [1]}, "prompt_id": "p1"}
    assert [e.node for e in events if isinstance(e, NodeDone)] == ["1", "2"]
    assert all(e.prompt_id == "p1" for e in events)


def test_nodes_feeding_no_output_never_run(executor, events):
    raw = {**DIAMOND, "9": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
           "10": {"class_type": "Add", "inputs": {"a": ["9", 0]}}}
    result = executor.execute(raw)
    assert result.status == "success"
    assert set(result.executed) == {"1", "2", "3", "4", "5"}


def test_targets_run_only_that_output_and_its_ancestors(executor):
    raw = {**DIAMOND, "6": {"class_type": "Output", "inputs": {"value": ["3", 0]}}}
    result = executor.execute(raw, targets=["6"])
    assert result.executed == ("1", "3", "6")
    assert result.outputs == {"6": {"value": [6]}}


def test_multiple_outputs_share_their_common_ancestors(executor):
    raw = {**DIAMOND, "6": {"class_type": "Output", "inputs": {"value": ["3", 0]}}}
    result = executor.execute(raw)
    assert sorted(result.executed) == ["1", "2", "3", "4", "5", "6"]
    assert result.outputs == {"5": {"value": [10]}, "6": {"value": [6]}}


def test_second_output_of_a_node_is_routed_by_index(executor):
    result = executor.execute(build_prompt(("1", "DivMod", {"a": 17, "b": 5}), ("2", "Output", {"value": ["1", 1]}),
                                           ("3", "Output", {"value": ["1", 0]})))
    assert result.outputs == {"2": {"value": [2]}, "3": {"value": [3]}}


def test_failing_node_reports_node_exception_and_traceback(executor, events):
    raw = build_prompt(("1", "Constant", {"value": 1}), ("2", "Fail", {"value": ["1", 0], "message": "no luck"}),
                       ("3", "Output", {"value": ["2", 0]}))
    result = executor.execute(raw, prompt_id="p2")
    assert result.status == "error" and not result.ok
    error = result.error
    assert isinstance(error, ExecutionError)
    assert (error.node_id, error.node_type, error.exception_type, error.exception_message) == (
        "2", "Fail", "RuntimeError", "no luck")
    assert error.executed == ["1"]
    assert error.current_inputs == {"value": "1", "message": "'no luck'"}
    assert "raise RuntimeError(message)" in "".join(error.traceback)
    assert events.kinds()[-2:] == ["execution_error", "executing"]
    assert events.of("execution_error")[0].data()["node_id"] == "2"


def test_engine_is_ready_for_the_next_prompt_after_a_failure(executor):
    executor.execute(build_prompt(("1", "Fail", {}), ("2", "Output", {"value": ["1", 0]})))
    assert executor.execute(DIAMOND).outputs == {"5": {"value": [10]}}


def test_node_returning_the_wrong_arity_fails_with_a_clear_message(executor):
    result = executor.execute(build_prompt(("1", "BadArity", {"value": 1}), ("2", "Output", {"value": ["1", 0]})))
    assert (result.error.exception_type, result.error.exception_message) == (
        "TypeError", "node BadArity returned 2 output(s); it declares 1: ['value']")


def test_ui_data_that_is_not_json_fails_the_node_that_returned_it(registry, executor):
    # It goes to websocket clients and into the history; one odd value must not break those for everyone.
    @node(output_node=True)
    def ShowsAnObject(value: Int(0)) -> NodeResult:
        return NodeResult(ui={"images": [{"filename": object()}]})
    registry.register(ShowsAnObject)
    result = executor.execute(build_prompt(("1", "ShowsAnObject", {"value": 1})))
    assert (result.status, result.error.node_id, result.error.exception_type) == ("error", "1", "TypeError")
    assert result.error.exception_message.startswith("node ShowsAnObject returned ui data that is not JSON: ")
    assert result.outputs == {} and len(executor.cache) == 0


def test_invalid_prompt_runs_nothing_and_emits_nothing(executor, events):
    result = executor.execute(build_prompt(("1", "Output", {})))
    assert result.status == "invalid"
    assert result.validation.error.type == "prompt_outputs_failed_validation"
    assert list(events) == []


def test_progress_ticks_are_reported_between_executing_events(executor, events):
    executor.execute(build_prompt(("1", "Slow", {"value": 4, "ticks": 3}), ("2", "Output", {"value": ["1", 0]})),
                     prompt_id="p3")
    assert [(e.node, e.value, e.max) for e in events.of("progress")] == [("1", 1, 3), ("1", 2, 3), ("1", 3, 3)]
    assert events.kinds()[2:7] == ["executing", "progress", "progress", "progress", "executing"]
    assert events.of("progress")[0].data() == {"value": 1, "max": 3, "prompt_id": "p3", "node": "1"}


def test_interrupt_inside_a_node_stops_at_the_next_progress_tick(executor, events):
    def interrupt_at_second_tick(event):
        if isinstance(event, Progress) and event.value == 2:
            worker = threading.Thread(target=executor.interrupt)
            worker.start()
            worker.join()
    executor.subscribe(interrupt_at_second_tick)
    raw = build_prompt(("1", "Constant", {"value": 1}), ("2", "Slow", {"value": ["1", 0], "ticks": 50}),
                       ("3", "Output", {"value": ["2", 0]}))
    result = executor.execute(raw, prompt_id="p4")
    assert result.status == "interrupted"
    assert isinstance(result.error, ExecutionInterrupted)
    assert (result.error.node_id, result.error.node_type, result.error.executed) == ("2", "Slow", ["1"])
    assert [e.value for e in events.of("progress")] == [1, 2]
    assert events.kinds()[-2:] == ["execution_interrupted", "executing"]


def test_interrupt_between_nodes_stops_before_the_next_node(executor, events):
    executor.subscribe(lambda e: executor.interrupt() if isinstance(e, NodeDone) and e.node == "2" else None)
    result = executor.execute(DIAMOND)
    assert result.status == "interrupted"
    assert result.executed == ("1", "2")
    assert result.error.node_id == "3"


def test_interrupt_from_another_thread_reaches_a_running_prompt(registry, settings):
    executor = Executor(registry, cache=ResultCache(), settings=settings)
    first_tick = threading.Event()
    executor.subscribe(lambda e: first_tick.set() if isinstance(e, Progress) else None)
    outcome = []
    raw = build_prompt(("1", "Slow", {"value": 1, "ticks": 10**7}), ("2", "Output", {"value": ["1", 0]}))
    worker = threading.Thread(target=lambda: outcome.append(executor.execute(raw)))
    worker.start()
    assert first_tick.wait(timeout=10)
    executor.interrupt()
    worker.join(timeout=10)
    assert outcome[0].status == "interrupted"
    assert outcome[0].error.node_id == "1"


def test_interrupt_requested_while_the_prompt_is_validated_stops_it_before_any_node(registry, settings):
    # The server's worker has taken the prompt (the client sees it running) while it is still being validated.
    executor = Executor(registry, cache=ResultCache(), settings=settings)

    @node(outputs=[("INT", "value")], validate=lambda constants: executor.interrupt())
    def InterruptedWhileValidated(value: Int(0)) -> tuple:
        return (value,)
    registry.register(InterruptedWhileValidated)
    result = executor.execute(build_prompt(("1", "InterruptedWhileValidated", {"value": 1}),
                                           ("2", "Output", {"value": ["1", 0]})))
    assert (result.status, result.executed, result.error.node_id) == ("interrupted", (), "1")


def test_interrupt_is_cleared_for_the_next_prompt(executor):
    interrupter = executor.subscribe(lambda e: executor.interrupt() if isinstance(e, NodeDone) else None)
    assert executor.execute(DIAMOND).status == "interrupted"
    executor.unsubscribe(interrupter)
    assert executor.execute(DIAMOND).status == "success"


def test_interrupt_while_idle_does_not_affect_the_next_prompt(executor):
    executor.interrupt()
    assert executor.execute(DIAMOND).status == "success"


def test_hidden_inputs_receive_node_id_and_extra_pnginfo(executor):
    raw = build_prompt(("7", "WhoAmI", {"value": 2}), ("8", "Output", {"value": ["7", 0]}))
    result = executor.execute(raw, extra_data={"extra_pnginfo": {"workflow": {}}})
    assert result.outputs == {"8": {"value": ["7:2:['workflow']"]}}


def test_context_carries_settings_to_the_node(executor, settings):
    settings.input_dir.mkdir(parents=True)
    (settings.input_dir / "note.txt").write_text("hello")
    result = executor.execute(build_prompt(("1", "ReadText", {"name": "note.txt"}),
                                           ("2", "Output", {"value": ["1", 0]})))
    assert result.outputs == {"2": {"value": ["hello"]}}


def test_output_node_writes_into_the_output_folder(executor, settings):
    raw = build_prompt(("1", "Concat", {"a": "x", "b": "y", "separator": "-"}),
                       ("2", "SaveText", {"text": ["1", 0], "filename": "deep/out.txt"}))
    result = executor.execute(raw)
    assert (settings.output_dir / "deep" / "out.txt").read_text() == "x-y"
    assert result.outputs["2"] == {"files": [{"filename": "deep/out.txt", "subfolder": "", "type": "output"}]}


def test_broken_subscriber_does_not_fail_the_prompt(executor, events):
    def broken(event):
        raise RuntimeError("listener bug")
    executor.subscribe(broken)
    assert executor.execute(DIAMOND).status == "success"
    assert events.kinds()[-1] == "executing"


def test_unsubscribed_listener_gets_no_more_events(executor, events):
    executor.unsubscribe(events)
    executor.execute(DIAMOND)
    assert list(events) == []


def test_long_chains_run_without_recursion_limits(executor):
    length = 3000
    raw = build_prompt(("0", "Constant", {"value": 0}),
                       *((str(i), "Add", {"a": [str(i - 1), 0], "b": 1}) for i in range(1, length)),
                       ("out", "Output", {"value": [str(length - 1), 0]}))
    result = executor.execute(raw)
    assert result.outputs == {"out": {"value": [length - 1]}}
    assert executor.execute(raw).executed == ()
