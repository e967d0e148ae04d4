"""The UI-format converter: widgets_values mapping, helper nodes, muted and bypassed nodes, reading workflow
files and PNGs, and the nine shared ComfyUI examples converting to exactly their own API prompts."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import cli
from engine import Boolean, Combo, Float, Int, Registry, Socket, String, node
from engine.ui_workflow import (UIWorkflowError, convert_ui_workflow, is_ui_workflow, resolve_dynamic_prompt,
                               ui_to_api)
from engine.workflow import PromptFormatError, load_workflow_document, read_workflow_file

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "comfyui-examples"
EXAMPLE_NAMES = sorted(p.name.removesuffix(".workflow.json") for p in EXAMPLES.glob("*.workflow.json"))
#: The editor's converter (web/src/graph/toPrompt.ts) runs these same files: the two must not drift.
WEB_FIXTURES = Path(__file__).resolve().parents[1] / "web" / "fixtures"


# --- schemas shaped like ComfyUI's, so the rules are tested apart from the real SD nodes -----------------

@node(outputs=["LATENT"])
def Sampler(model: Socket("MODEL"), seed: Int(0, min=0, control_after_generate=True), steps: Int(20),
            sampler_name: Combo(["euler", "dpmpp_2m"]), latent: Socket("LATENT"),
            denoise: Float(1.0)) -> tuple:
    return (None,)


@node(outputs=["MODEL", "LATENT"])
def Loader(name: Combo(lambda: ["a.safetensors"])) -> tuple:
    return (None, None)


@node(outputs=["IMAGE", "MASK"])
def LoadPicture(image: Combo(lambda: ["cat.png"], image_upload=True)) -> tuple:
    return (None, None)


@node(outputs=["LATENT"])
def Blend(first: Socket("LATENT"), second: Socket("LATENT", optional=True) = None,
          amount: Float(0.5, optional=True) = 0.5, mode: Combo(["add", "mix"]) = "add",
          seed: Int(0, force_input=True) = 0) -> tuple:
    return (None,)


@node(outputs=["LATENT"])
def Encode(text: String("", multiline=True, dynamic_prompts=True), plain: String("")) -> tuple:
    return (None,)


@node(outputs=["LATENT"])
def Pick(choice: Combo(["x", "y"], control_after_generate=True), flag: Boolean(False)) -> tuple:
    return (None,)


@node(output_node=True)
def Show(latent: Socket("LATENT")) -> None:
    return None


REGISTRY = Registry([Sampler, Loader, LoadPicture, Blend, Encode, Pick, Show])


def ui_node(node_id: int, node_type: str, widgets: Any = None, inputs: list | None = None, mode: int = 0,
            outputs: list | None = None, **extra: Any) -> dict:
    return {"id": node_id, "type": node_type, "mode": mode, "inputs": inputs or [], "outputs": outputs or [],
            "widgets_values": widgets, **extra}


def socket(name: str, type_name: str, link: int | None, widget: bool = False) -> dict:
    entry = {"name": name, "type": type_name, "link": link}
    return {**entry, "widget": {"name": name}} if widget else entry


def ui_workflow(nodes: list[dict], links: list[list]) -> dict:
    return {"last_node_id": 99, "last_link_id": 99, "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}


def sampler_graph(sampler_widgets: list, extra_nodes: list[dict] = (), extra_links: list[list] = (),
                  sampler_inputs: list[dict] = ()) -> dict:
    """Loader 1 -> Sampler 2 -> Show 3, plus whatever a test adds."""
    nodes = [ui_node(1, "Loader", ["a.safetensors"]),
             ui_node(2, "Sampler", sampler_widgets,
                     [socket("model", "MODEL", 10), socket("latent", "LATENT", 11), *sampler_inputs]),
             ui_node(3, "Show", None, [socket("latent", "LATENT", 12)]), *extra_nodes]
    links = [[10, 1, 0, 2, 0, "MODEL"], [11, 1, 1, 2, 1, "LATENT"], [12, 2, 0, 3, 0, "LATENT"], *extra_links]
    return ui_workflow(nodes, links)


def test_widget_values_fill_widget_inputs_in_order_skipping_the_seed_control_value():
    prompt = ui_to_api(sampler_graph([42, "randomize", 12, "dpmpp_2m", 0.6]), REGISTRY)
    assert prompt["2"] == {"class_type": "Sampler", "inputs": {
        "seed": 42, "steps": 12, "sampler_name": "dpmpp_2m", "denoise": 0.6, "model": ["1", 0],
        "latent": ["1", 1]}}
    assert prompt["1"] == {"class_type": "Loader", "inputs": {"name": "a.safetensors"}}


@pytest.mark.parametrize("control", [True, False, "fixed", "increment", "decrement"])
def test_every_kind_of_control_value_is_skipped(control):
    prompt = ui_to_api(sampler_graph([42, control, 12, "euler", 1.0]), REGISTRY)
    assert prompt["2"]["inputs"]["steps"] == 12


def test_a_missing_control_slot_does_not_shift_the_values():
    prompt = ui_to_api(sampler_graph([42, 12, "euler", 1.0]), REGISTRY)
    assert {k: prompt["2"]["inputs"][k] for k in ("seed", "steps", "sampler_name", "denoise")} == {
        "seed": 42, "steps": 12, "sampler_name": "euler", "denoise": 1.0}


def test_a_combo_control_value_and_its_filter_text_are_skipped():
    graph = ui_workflow([ui_node(1, "Pick", ["y", "randomize", "", True])], [])
    assert ui_to_api(graph, REGISTRY)["1"]["inputs"] == {"choice": "y", "flag": True}


def test_the_upload_button_value_is_not_an_input():
    graph = ui_workflow([ui_node(1, "LoadPicture", ["cat.png", "image"])], [])
    assert ui_to_api(graph, REGISTRY)["1"]["inputs"] == {"image": "cat.png"}


def test_a_short_widgets_values_leaves_later_inputs_to_their_defaults():
    prompt = ui_to_api(sampler_graph([42, "fixed", 12]), REGISTRY)
    assert set(prompt["2"]["inputs"]) == {"seed", "steps", "model", "latent"}


def test_widgets_values_may_be_an_object_keyed_by_input_name():
    prompt = ui_to_api(sampler_graph({"steps": 9, "seed": 3, "unknown": 1}), REGISTRY)
    assert {k: v for k, v in prompt["2"]["inputs"].items() if k not in ("model", "latent")} == {"seed": 3, "steps": 9}


def test_optional_widgets_follow_required_ones_and_force_input_owns_no_slot():
    # Declared order is amount (optional), mode (required): the editor orders required first.
    graph = ui_workflow([ui_node(1, "Blend", ["mix", 0.25], [socket("first", "LATENT", None)])], [])
    assert ui_to_api(graph, REGISTRY)["1"]["inputs"] == {"mode": "mix", "amount": 0.25}


def test_a_primitive_node_value_replaces_the_converted_widget():
    primitive = ui_node(5, "PrimitiveNode", [777, "fixed"],
                        outputs=[{"name": "INT", "type": "INT", "links": [20], "widget": {"name": "seed"}}])
    graph = sampler_graph([1, "fixed", 12, "euler", 1.0], [primitive], [[20, 5, 0, 2, 2, "INT"]],
                          [socket("seed", "INT", 20, widget=True)])
    prompt = ui_to_api(graph, REGISTRY)
    assert prompt["2"]["inputs"]["seed"] == 777
    assert "5" not in prompt


def test_a_converted_widget_fed_by_a_node_becomes_a_link():
    graph = ui_workflow([ui_node(1, "Loader", ["a.safetensors"]),
                         ui_node(2, "Blend", ["add"], [socket("first", "LATENT", 10), socket("seed", "INT", 11)]),
                         ui_node(3, "Show", None, [socket("latent", "LATENT", 12)])],
                        [[10, 1, 1, 2, 0, "LATENT"], [11, 1, 0, 2, 1, "INT"], [12, 2, 0, 3, 0, "LATENT"]])
    assert ui_to_api(graph, REGISTRY)["2"]["inputs"] == {"mode": "add", "first": ["1", 1], "seed": ["1", 0]}


def test_links_resolve_through_a_chain_of_reroutes():
    reroutes = [ui_node(6, "Reroute", None, [socket("", "*", 11)]), ui_node(7, "Reroute", None, [socket("", "*", 21)])]
    graph = sampler_graph([1, "fixed", 12, "euler", 1.0], reroutes, [[21, 6, 0, 7, 0, "LATENT"],
                                                                     [22, 7, 0, 2, 1, "LATENT"]])
    graph["links"][1] = [11, 1, 1, 6, 0, "LATENT"]
    graph["nodes"][1]["inputs"][1]["link"] = 22
    prompt = ui_to_api(graph, REGISTRY)
    assert prompt["2"]["inputs"]["latent"] == ["1", 1]
    assert set(prompt) == {"1", "2", "3"}


def test_a_muted_output_is_removed_with_the_nodes_that_only_fed_it():
    graph = sampler_graph([1, "fixed", 12, "euler", 1.0])
    graph["nodes"][2]["mode"] = 2
    assert ui_to_api(graph, REGISTRY) == {}


def test_a_link_from_a_muted_node_removes_the_input_even_a_converted_widgets_saved_value():
    muted = ui_node(5, "Loader", ["a.safetensors"], mode=2)
    graph = sampler_graph([42, "fixed", 12, "euler", 1.0], [muted], [[20, 5, 0, 2, 2, "INT"]],
                          [socket("seed", "INT", 20, widget=True)])
    prompt = ui_to_api(graph, REGISTRY)
    assert "seed" not in prompt["2"]["inputs"] and prompt["2"]["inputs"]["steps"] == 12
    assert set(prompt) == {"1", "2", "3"}


def test_a_dangling_reroute_leaves_a_converted_widget_its_saved_value():
    reroute = ui_node(6, "Reroute", None, [socket("", "*", None)])
    graph = sampler_graph([42, "fixed", 12, "euler", 1.0], [reroute], [[20, 6, 0, 2, 2, "INT"]],
                          [socket("seed", "INT", 20, widget=True)])
    assert ui_to_api(graph, REGISTRY)["2"]["inputs"]["seed"] == 42


def bypass_graph(bypassed_inputs: list[dict], output_slot: int = 0) -> dict:
    """Loader 1 (MODEL, LATENT) -> bypassed Blend 2 -> Show 3 reading Blend's output `output_slot`."""
    return ui_workflow([ui_node(1, "Loader", ["a.safetensors"]),
                        ui_node(2, "Blend", ["add"], bypassed_inputs, mode=4),
                        ui_node(3, "Show", None, [socket("latent", "LATENT", 12)])],
                       [[10, 1, 1, 2, 0, "LATENT"], [11, 1, 0, 2, 1, "MODEL"], [13, 1, 0, 2, 2, "MODEL"],
                        [12, 2, output_slot, 3, 0, "LATENT"]])


def test_a_bypassed_node_passes_the_input_at_the_used_output_index_through():
    prompt = ui_to_api(bypass_graph([socket("first", "LATENT", 10), socket("second", "LATENT", 11)]), REGISTRY)
    assert prompt == {"1": {"class_type": "Loader", "inputs": {"name": "a.safetensors"}},
                      "3": {"class_type": "Show", "inputs": {"latent": ["1", 1]}}}


def test_a_bypassed_node_passes_the_first_input_of_the_wanted_type_otherwise():
    graph = bypass_graph([socket("m", "MODEL", 11), socket("first", "LATENT", 10)], output_slot=0)
    assert ui_to_api(graph, REGISTRY)["3"]["inputs"] == {"latent": ["1", 1]}


def test_a_bypassed_node_falls_back_to_a_compatible_input():
    graph = bypass_graph([socket("m", "MODEL", 11), socket("any", "*", 13)])
    assert ui_to_api(graph, REGISTRY)["3"]["inputs"] == {"latent": ["1", 0]}


def test_a_bypassed_node_without_a_fitting_input_drops_the_link():
    graph = bypass_graph([socket("m", "MODEL", 11)])
    assert ui_to_api(graph, REGISTRY) == {"3": {"class_type": "Show", "inputs": {}}}


def test_notes_and_editor_only_nodes_never_reach_the_prompt():
    notes = [ui_node(8, "Note", ["read me"]), ui_node(9, "MarkdownNote", ["# hi"])]
    assert set(ui_to_api(sampler_graph([1, "fixed", 12, "euler", 1.0], notes), REGISTRY)) == {"1", "2", "3"}


def test_unknown_node_types_are_all_named_with_their_ids():
    graph = sampler_graph([1, "fixed", 12, "euler", 1.0], [ui_node(8, "FancyUpscaler"), ui_node(9, "OtherPack")])
    with pytest.raises(UIWorkflowError) as caught:
        ui_to_api(graph, REGISTRY)
    assert caught.value.problems == [
        "node 8 (FancyUpscaler): node type 'FancyUpscaler' is not registered; the custom node may not be installed",
        "node 9 (OtherPack): node type 'OtherPack' is not registered; the custom node may not be installed"]


def test_convert_ui_workflow_leaves_unknown_nodes_and_their_links_out_and_names_them():
    graph = sampler_graph([1, "fixed", 12, "euler", 1.0], [ui_node(8, "FancyLoader")], [[20, 8, 0, 2, 0, "MODEL"]])
    graph["nodes"][1]["inputs"][0]["link"] = 20
    conversion = convert_ui_workflow(graph, REGISTRY)
    assert conversion.problems == ["node 8 (FancyLoader): node type 'FancyLoader' is not registered; "
                                   "the custom node may not be installed"]
    assert "model" not in conversion.prompt["2"]["inputs"] and "8" not in conversion.prompt


def test_a_list_valued_constant_is_wrapped_so_it_cannot_read_as_a_link():
    graph = ui_workflow([ui_node(1, "Encode", [["4", 0], "plain"])], [])
    assert ui_to_api(graph, REGISTRY)["1"]["inputs"]["text"] == {"__value__": ["4", 0]}


def test_an_unknown_type_that_is_muted_is_no_error():
    graph = sampler_graph([1, "fixed", 12, "euler", 1.0], [ui_node(8, "FancyUpscaler", mode=2)])
    assert set(ui_to_api(graph, REGISTRY)) == {"1", "2", "3"}


def test_subgraph_instances_are_refused_by_name():
    graph = sampler_graph([1, "fixed", 12, "euler", 1.0], [ui_node(8, "6f2e-uuid")])
    graph["definitions"] = {"subgraphs": [{"id": "6f2e-uuid", "nodes": []}]}
    with pytest.raises(UIWorkflowError, match="node 8 .*subgraphs and group nodes are not supported"):
        ui_to_api(graph, REGISTRY)


def test_schema_1_links_given_as_objects_convert_like_arrays():
    graph = sampler_graph([1, "fixed", 12, "euler", 1.0])
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    as_objects = {**graph, "links": [dict(zip(keys, link)) for link in graph["links"]], "version": 1}
    assert ui_to_api(as_objects, REGISTRY) == ui_to_api(graph, REGISTRY)


def test_a_malformed_link_is_reported_with_its_position_and_an_empty_slot_is_skipped():
    graph = sampler_graph([1, "fixed", 12, "euler", 1.0])
    graph["links"] += [None, ["x"]]
    with pytest.raises(UIWorkflowError, match=r"links\[4\]: expected \[id"):
        ui_to_api(graph, REGISTRY)


def test_a_node_title_becomes_the_prompt_title():
    graph = ui_workflow([ui_node(1, "Loader", ["a.safetensors"], title="Base model")], [])
    assert ui_to_api(graph, REGISTRY)["1"]["_meta"] == {"title": "Base model"}


def test_dynamic_prompt_widgets_resolve_choices_and_drop_comments_other_strings_stay():
    graph = ui_workflow([ui_node(1, "Encode", ["a {red|blue} cat // note\n/* x */{big|{tiny|small}}", "{a|b}"])], [])
    inputs = ui_to_api(graph, REGISTRY, rng=random.Random(3))["1"]["inputs"]
    assert inputs["plain"] == "{a|b}"
    assert inputs["text"] in {f"a {c} cat \n{s}" for c in ("red", "blue") for s in ("big", "tiny", "small")}


def test_dynamic_prompt_choices_cover_every_option():
    seen = {resolve_dynamic_prompt("{x|y|z}", random.Random(seed)) for seed in range(40)}
    assert seen == {"x", "y", "z"}


def test_is_ui_workflow_tells_editor_saves_from_api_prompts():
    assert is_ui_workflow(sampler_graph([1]))
    assert not is_ui_workflow({"1": {"class_type": "Loader", "inputs": {}}})
    assert not is_ui_workflow([])


# --- reading files ------------------------------------------------------------------------------------------

def png_with(chunks: dict[str, Any]) -> bytes:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, json.dumps(value))
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


API = {"1": {"class_type": "Loader", "inputs": {"name": "a.safetensors"}}}


def test_read_workflow_file_takes_api_json_and_ui_json(tmp_path):
    (tmp_path / "api.json").write_text(json.dumps(API))
    (tmp_path / "ui.json").write_text(json.dumps(sampler_graph([1, "fixed", 12, "euler", 1.0])))
    assert read_workflow_file(tmp_path / "api.json", REGISTRY) == API
    assert read_workflow_file(tmp_path / "ui.json", REGISTRY)["2"]["inputs"]["steps"] == 12


def test_a_png_prompt_chunk_wins_over_its_workflow_chunk():
    data = png_with({"prompt": API, "workflow": sampler_graph([1, "fixed", 12, "euler", 1.0])})
    document = load_workflow_document(data, REGISTRY)
    assert document.prompt == API
    assert document.ui_workflow["nodes"][1]["type"] == "Sampler"


def test_a_damaged_workflow_chunk_does_not_stop_a_good_prompt_chunk():
    info = PngInfo()
    info.add_text("prompt", json.dumps(API))
    info.add_text("workflow", "{not json")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG", pnginfo=info)
    document = load_workflow_document(buffer.getvalue(), REGISTRY)
    assert (document.prompt, document.ui_workflow) == (API, None)


def test_a_png_with_only_a_workflow_chunk_is_converted():
    data = png_with({"workflow": sampler_graph([5, "fixed", 12, "euler", 1.0])})
    assert read_workflow_file(data, REGISTRY)["2"]["inputs"]["seed"] == 5


def test_a_post_prompt_body_keeps_its_ui_workflow(tmp_path):
    ui = sampler_graph([1])
    (tmp_path / "body.json").write_text(json.dumps({"prompt": API, "extra_data": {"extra_pnginfo": {"workflow": ui}}}))
    document = load_workflow_document(tmp_path / "body.json", REGISTRY)
    assert (document.prompt, document.ui_workflow) == (API, ui)


def test_conversion_problems_surface_as_prompt_format_errors_naming_the_file(tmp_path):
    (tmp_path / "ui.json").write_text(json.dumps(sampler_graph([1], [ui_node(8, "Missing")])))
    with pytest.raises(PromptFormatError, match=r"ui\.json: node 8 \(Missing\)"):
        read_workflow_file(tmp_path / "ui.json", REGISTRY)


def test_a_png_without_metadata_is_refused():
    with pytest.raises(PromptFormatError, match="neither 'prompt' nor 'workflow'"):
        read_workflow_file(png_with({}), REGISTRY)


# --- the nine ComfyUI examples, with the real node schemas ---------------------------------------------------

#: Left out of the comparison, being API-side leftovers the converter must not produce: the input
#: `choose file to upload` (LoadImage's upload button, serialised by old frontends) and the node-level key
#: `is_changed` (a file hash old frontends sent). `_meta` is compared only where the UI node has a title.
UI_LEFTOVER_INPUTS = {"choose file to upload"}


def comparable(value: Any) -> Any:
    """Numbers compare as numbers (the UI saves cfg 8 where the API has 8.0), never equal to booleans."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def api_nodes(prompt: dict) -> dict:
    return {node_id: (body["class_type"], {name: comparable(value) for name, value in body["inputs"].items()
                                           if name not in UI_LEFTOVER_INPUTS})
            for node_id, body in prompt.items()}


@pytest.fixture(scope="module")
def sd_registry() -> Registry:
    return cli.load_registry([])


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_each_comfyui_example_converts_to_exactly_its_api_prompt(name, sd_registry):
    ui = json.loads((EXAMPLES / f"{name}.workflow.json").read_text())
    expected = json.loads((EXAMPLES / f"{name}.prompt.json").read_text())
    assert api_nodes(ui_to_api(ui, sd_registry)) == api_nodes(expected)


def test_all_nine_examples_are_there():
    assert len(EXAMPLE_NAMES) == 9


@pytest.mark.parametrize("name", ["sdxl_simple_example", "img2img_workflow"])
def test_an_example_png_reads_back_its_prompt_chunk(name):
    expected = json.loads((EXAMPLES / f"{name}.prompt.json").read_text())
    assert read_workflow_file(EXAMPLES / f"{name}.png", REGISTRY) == expected


class FirstChoice(random.Random):
    """Picks the first option of every dynamic-prompt choice, as the editor's shared-fixture test does."""

    def choice(self, options):
        return options[0]


@pytest.mark.parametrize("name", sorted(p.name.removesuffix(".ui.json") for p in WEB_FIXTURES.glob("*.ui.json")))
def test_the_editors_shared_fixtures_convert_to_their_api_prompts(name, sd_registry):
    ui = json.loads((WEB_FIXTURES / f"{name}.ui.json").read_text())
    expected = json.loads((WEB_FIXTURES / f"{name}.api.json").read_text())
    conversion = convert_ui_workflow(ui, sd_registry, rng=FirstChoice())
    assert api_nodes(conversion.prompt) == api_nodes(expected)
    assert all(problem.startswith("node 1 (SomeCustomLoader)") for problem in conversion.problems)
