"""Validation of API prompts: every error kind, in ComfyUI's node_errors shape, all reported at once."""
from __future__ import annotations

import pytest

import toy_nodes
from engine import Combo, node, validate_prompt
from engine.workflow import Link
from toy_nodes import build_prompt


def only_error(result, node_id):
    errors = result.node_errors[node_id].errors
    assert len(errors) == 1, [e.type for e in errors]
    return errors[0]


def test_valid_prompt_has_no_errors_and_lists_its_outputs(registry):
    result = validate_prompt(build_prompt(("1", "Constant", {"value": 2}), ("2", "Output", {"value": ["1", 0]})),
                             registry)
    assert result.ok and result.error is None
    assert result.node_errors == {}
    assert result.outputs == ("2",)
    assert result.to_json() == {"error": None, "node_errors": {}}


@pytest.mark.parametrize("raw, detail", [
    ([1, 2], "the prompt must be a JSON object of nodes, got list"),
    ({"1": {"inputs": {}}}, "node '1': missing 'class_type'"),
    ({"1": {"class_type": "Add", "inputs": [1]}}, "1/inputs: [1] is not of type 'object'"),
    ({"1": "Add"}, "1: 'Add' is not of type 'object'"),
])
def test_malformed_prompt_is_invalid_prompt(registry, raw, detail):
    result = validate_prompt(raw, registry)
    assert result.error.type == "invalid_prompt"
    assert result.error.details == detail
    assert result.node_errors == {}


def test_every_unknown_class_is_named(registry):
    result = validate_prompt(build_prompt(("1", "Nope", {}), ("2", "Gone", {}), ("3", "Constant", {"value": 1}),
                                          ("4", "Output", {"value": ["3", 0]})), registry)
    assert result.error.type == "missing_node_type"
    assert result.error.details == "unknown node classes: Gone, Nope (nodes 1, 2)"
    assert {n: e.class_type for n, e in result.node_errors.items()} == {"1": "Nope", "2": "Gone"}
    assert (result.outputs, result.failed_outputs) == ((), ("4",))


def test_prompt_without_output_nodes_is_prompt_no_outputs(registry):
    result = validate_prompt(build_prompt(("1", "Constant", {"value": 1})), registry)
    assert result.error.type == "prompt_no_outputs"
    assert result.to_json()["node_errors"] == {}


def test_missing_socket_input_is_required_input_missing(registry):
    result = validate_prompt(build_prompt(("1", "Output", {})), registry)
    error = only_error(result, "1")
    assert (error.type, error.details, error.extra_info) == (
        "required_input_missing", "value: required input is missing", {"input_name": "value"})
    assert result.error.type == "prompt_outputs_failed_validation"


def test_missing_widget_input_takes_its_declared_default(registry):
    # Old workflows miss inputs added later (inpaint_example lacks grow_mask_by); defaults fill them.
    result = validate_prompt(build_prompt(("1", "Add", {"a": 5}), ("2", "Output", {"value": ["1", 0]})), registry)
    assert result.ok
    assert result.workflow["1"].inputs == {"a": 5, "b": 0}


def test_missing_combo_without_declared_default_is_required_input_missing(registry):
    result = validate_prompt(build_prompt(("1", "PickComputed", {}), ("2", "Output", {"value": ["1", 0]})), registry)
    assert only_error(result, "1").type == "required_input_missing"


def test_missing_force_input_widget_is_not_defaulted(registry):
    result = validate_prompt(build_prompt(("1", "SaveText", {"filename": "a.txt"})), registry)
    assert only_error(result, "1").details == "text: required input is missing"


def test_absent_optional_input_is_left_out(registry):
    result = validate_prompt(build_prompt(("1", "Concat", {"a": "x", "b": "y"}), ("2", "Output", {"value": ["1", 0]})),
                             registry)
    assert result.workflow["1"].inputs == {"a": "x", "b": "y"}


MALFORMED = "Bad linked input, must be a length-2 list of [node_id, output_index]"


@pytest.mark.parametrize("link, message, detail", [
    (["1"], MALFORMED, "value: ['1'] is not a link"),
    (["1", -1], MALFORMED, "value: ['1', -1] is not a link"),
    (["9", 0], "Bad linked input: the linked node does not exist",
     "value: links to node '9', which is not in the prompt"),
    (["1", 1], "Bad linked input: no such output",
     "value: node 1 (Constant) has 1 output(s), index 1 is out of range"),
])
def test_malformed_or_dangling_links_are_bad_linked_input(registry, link, message, detail):
    result = validate_prompt(build_prompt(("1", "Constant", {"value": 1}), ("2", "Output", {"value": link})), registry)
    error = only_error(result, "2")
    assert (error.type, error.message, error.details) == ("bad_linked_input", message, detail)


def test_socket_type_mismatch_is_return_type_mismatch(registry):
    result = validate_prompt(build_prompt(("1", "Pick", {"letter": "a"}), ("2", "Add", {"a": ["1", 0], "b": 1}),
                                          ("3", "Output", {"value": ["2", 0]})), registry)
    error = only_error(result, "2")
    assert error.type == "return_type_mismatch"
    assert error.details == "a: received_type(STRING) mismatch input_type(INT)"
    assert error.extra_info["received_type"] == "STRING"
    assert error.extra_info["linked_node"] == ["1", 0]


@pytest.mark.parametrize("inputs, error_type, detail", [
    ({"value": "seven"}, "invalid_input_type", "value: 'seven' is not a valid INT"),
    ({"value": True}, "invalid_input_type", "value: True is not a valid INT"),
    ({"value": -1001}, "value_smaller_than_min", "value: -1001 is smaller than min -1000"),
    ({"value": 1001}, "value_bigger_than_max", "value: 1001 is bigger than max 1000"),
])
def test_bad_constants_name_input_and_reason(registry, inputs, error_type, detail):
    result = validate_prompt(build_prompt(("1", "Constant", inputs), ("2", "Output", {"value": ["1", 0]})), registry)
    error = only_error(result, "1")
    assert (error.type, error.details) == (error_type, detail)
    assert error.extra_info["input_name"] == "value"
    assert error.extra_info["received_value"] == inputs["value"]
    assert error.extra_info["input_config"] == ["INT", {"default": 0, "min": -1000, "max": 1000}]


def test_combo_value_not_in_options_is_value_not_in_list(registry):
    result = validate_prompt(build_prompt(("1", "Pick", {"letter": "z"}), ("2", "Output", {"value": ["1", 0]})),
                             registry)
    error = only_error(result, "1")
    assert (error.type, error.details) == ("value_not_in_list", "letter: 'z' not in ['a', 'b', 'c']")
    assert error.extra_info["input_config"] == [["a", "b", "c"], {"default": "a"}]


def test_computed_combo_options_are_read_at_validation_time(registry, monkeypatch):
    good = build_prompt(("1", "PickComputed", {"name": "dynamic/2"}), ("2", "Output", {"value": ["1", 0]}))
    assert validate_prompt(good, registry).ok
    monkeypatch.setattr(toy_nodes, "_numbers_in", lambda folder: [f"{folder}/0"])
    assert only_error(validate_prompt(good, registry), "1").type == "value_not_in_list"


def test_constant_for_a_socket_input_is_invalid_input_type(registry):
    result = validate_prompt(build_prompt(("1", "ToText", {"value": 3, "upper": False}),
                                          ("2", "Output", {"value": ["1", 0]})), registry)
    assert only_error(result, "1").details == "value: INT input takes a link [node_id, output_index], got constant 3"


def test_node_validation_hook_reports_custom_validation_failed(registry):
    result = validate_prompt(build_prompt(("1", "Even", {"value": 3}), ("2", "Output", {"value": ["1", 0]})), registry)
    error = only_error(result, "1")
    assert (error.type, error.details) == ("custom_validation_failed", "value must be even, got 3")


def test_crashing_hook_reports_on_the_node_and_its_dependents(registry):
    result = validate_prompt(build_prompt(("1", "BrokenValidator", {"value": 1}), ("2", "Add", {"a": ["1", 0]}),
                                          ("3", "Output", {"value": ["2", 0]})), registry)
    crash = only_error(result, "1")
    assert (crash.type, crash.details) == ("exception_during_validation", "validator exploded")
    assert crash.extra_info["exception_type"] == "ValueError"
    inner = only_error(result, "2")
    assert inner.type == "exception_during_inner_validation"
    assert inner.extra_info["linked_node"] == ["1", 0]


def test_cycle_is_reported_on_each_of_its_nodes(registry):
    result = validate_prompt(build_prompt(("1", "Add", {"a": ["3", 0], "b": 1}), ("2", "Add", {"a": ["1", 0]}),
                                          ("3", "Add", {"a": ["2", 0]}), ("4", "Output", {"value": ["3", 0]})),
                             registry)
    assert set(result.node_errors) == {"1", "2", "3"}
    for node_id in "123":
        error = only_error(result, node_id)
        assert error.type == "dependency_cycle"
        assert sorted(error.extra_info["cycle"]) == ["1", "2", "3"]
        assert error.details.startswith("nodes form a cycle: ")
        assert len(error.details.split(" -> ")) == 4
    assert result.node_errors["1"].dependent_outputs == ("4",)
    assert result.error.type == "prompt_outputs_failed_validation"


def test_cycle_feeding_no_output_is_not_reported(registry):
    result = validate_prompt(build_prompt(("1", "Add", {"a": ["2", 0]}), ("2", "Add", {"a": ["1", 0]}),
                                          ("3", "Constant", {"value": 1}), ("4", "Output", {"value": ["3", 0]})),
                             registry)
    assert result.ok and result.node_errors == {}


def test_self_loop_is_a_cycle(registry):
    result = validate_prompt(build_prompt(("1", "Add", {"a": ["1", 0]}), ("2", "Output", {"value": ["1", 0]})),
                             registry)
    assert only_error(result, "1").details == "nodes form a cycle: 1 -> 1"


def test_all_problems_are_reported_at_once(registry):
    result = validate_prompt(build_prompt(
        ("1", "Constant", {"value": 5000}), ("2", "Pick", {"letter": "q"}), ("3", "Add", {"a": ["2", 0], "b": "x"}),
        ("4", "Output", {"value": ["1", 0]}), ("5", "Output", {"value": ["3", 0]}), ("6", "Output", {})), registry)
    summary = {node_id: [e.type for e in entry.errors] for node_id, entry in result.node_errors.items()}
    assert summary == {"1": ["value_bigger_than_max"], "2": ["value_not_in_list"],
                       "3": ["return_type_mismatch", "invalid_input_type"], "6": ["required_input_missing"]}
    assert result.node_errors["2"].dependent_outputs == ("5",)
    assert len(result.messages()) == 1 + 5


def test_valid_outputs_run_when_others_fail(registry):
    result = validate_prompt(build_prompt(("1", "Constant", {"value": 1}), ("2", "Output", {"value": ["1", 0]}),
                                          ("3", "Constant", {"value": "bad"}), ("4", "Output", {"value": ["3", 0]})),
                             registry)
    assert result.ok
    assert (result.outputs, result.failed_outputs) == (("2",), ("4",))
    assert result.to_json()["node_errors"]["3"] == {
        "errors": [result.node_errors["3"].errors[0].to_json()], "dependent_outputs": ["4"], "class_type": "Constant"}


def test_errors_in_nodes_feeding_no_output_are_not_reported(registry):
    result = validate_prompt(build_prompt(("1", "Constant", {"value": 1}), ("2", "Output", {"value": ["1", 0]}),
                                          ("3", "Constant", {"value": "bad"})), registry)
    assert result.ok and result.node_errors == {}


def test_targets_narrow_the_outputs(registry):
    raw = build_prompt(("1", "Constant", {"value": 1}), ("2", "Output", {"value": ["1", 0]}),
                       ("3", "Constant", {"value": "bad"}), ("4", "Output", {"value": ["3", 0]}))
    result = validate_prompt(raw, registry, targets=["2"])
    assert (result.outputs, result.node_errors) == (("2",), {})
    missing = validate_prompt(raw, registry, targets=["2", "77"])
    assert missing.error.type == "invalid_prompt"
    assert missing.error.details == "partial_execution_targets name nodes not in the prompt: ['77']"


@pytest.mark.parametrize("targets", ["12", [["2"]], [None]])
def test_targets_that_are_not_a_list_of_node_ids_are_invalid_prompt(registry, targets):
    # A bare string must not be read character by character ("12" would run nodes 1 and 2).
    raw = build_prompt(("1", "Output", {"value": ["3", 0]}), ("2", "Output", {"value": ["3", 0]}),
                       ("3", "Constant", {"value": 1}), ("12", "Output", {"value": ["3", 0]}))
    result = validate_prompt(raw, registry, targets=targets)
    assert (result.error.type, result.outputs) == ("invalid_prompt", ())
    assert result.error.details == f"partial_execution_targets must be a list of node ids, got {targets!r}"


def test_numeric_targets_name_nodes_by_their_string_ids(registry):
    raw = build_prompt(("1", "Constant", {"value": 1}), ("2", "Output", {"value": ["1", 0]}),
                       ("3", "Output", {"value": ["1", 0]}))
    assert validate_prompt(raw, registry, targets=[2]).outputs == ("2",)


def test_undeclared_inputs_and_extra_keys_are_ignored(registry):
    raw = {"7:3": {"class_type": "Constant", "inputs": {"value": "4", "choose file to upload": "image"},
                   "_meta": {"title": "four"}, "color": "#fff"},
           "8": {"class_type": "Output", "inputs": {"value": ["7:3", 0]}, "is_changed": None}}
    result = validate_prompt(raw, registry)
    assert result.ok
    node = result.workflow["7:3"]
    assert (node.inputs, node.title) == ({"value": 4}, "four")
    assert result.workflow["8"].inputs == {"value": Link("7:3", 0)}


def test_numeric_node_id_in_link_becomes_a_string(registry):
    result = validate_prompt({"4": {"class_type": "Constant", "inputs": {"value": 1}},
                              "5": {"class_type": "Output", "inputs": {"value": [4, 0]}}}, registry)
    assert result.workflow["5"].inputs == {"value": Link("4", 0)}


def test_wrapped_constant_list_is_a_value_not_a_link(registry):
    result = validate_prompt(build_prompt(("1", "Concat", {"a": {"__value__": ["1", 0]}, "b": "y"}),
                                          ("2", "Output", {"value": ["1", 0]})), registry)
    error = only_error(result, "1")
    assert (error.type, error.extra_info["received_value"]) == ("invalid_input_type", ["1", 0])



def _unreadable_folder():
    raise PermissionError("models folder unreadable")


@node(outputs=[("STRING", "name")])
def UnreadableLoader(name: Combo(_unreadable_folder)) -> tuple:
    return (name,)


def test_failing_option_listing_is_exception_during_validation(registry):
    registry.register(UnreadableLoader)
    result = validate_prompt(build_prompt(("1", "UnreadableLoader", {"name": "x"}),
                                          ("2", "Output", {"value": ["1", 0]})), registry)
    error = only_error(result, "1")
    assert (error.type, error.details) == ("exception_during_validation", "name: models folder unreadable")
    assert error.extra_info["exception_type"] == "PermissionError"
