"""Node declaration with @node, the registry and the /object_info description.

No `from __future__ import annotations` here: some specs below use local variables (see engine/schema.py).
"""

import sys
import types

import pytest

import toy_nodes
from engine import (Boolean, Combo, ExecutionContext, Float, Hidden, Int, NodeResult, Registry, Socket, String,
                    import_node_module, node)

SAMPLERS = ["euler", "euler_ancestral"]


@node(category="sampling", outputs=[("LATENT", "LATENT")], description="Denoises a latent.")
def KSampler(model: Socket("MODEL"), seed: Int(0, min=0, max=2**64 - 1, control_after_generate=True),
             steps: Int(20, min=1, max=10000), cfg: Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01),
             sampler_name: Combo(SAMPLERS), positive: Socket("CONDITIONING"),
             denoise: Float(1.0, min=0.0, max=1.0, step=0.01),
             mask: Socket("MASK", optional=True) = None,
             unique_id: Hidden("UNIQUE_ID") = None, *, context: ExecutionContext) -> tuple:
    return (None,)


def test_object_info_matches_comfyui_shape():
    info = KSampler.object_info()
    assert info["input"] == {
        "required": {
            "model": ["MODEL"],
            "seed": ["INT", {"default": 0, "min": 0, "max": 18446744073709551615, "control_after_generate": True}],
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
            "sampler_name": [["euler", "euler_ancestral"], {}],
            "positive": ["CONDITIONING"],
            "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
        },
        "optional": {"mask": ["MASK"]},
        "hidden": {"unique_id": "UNIQUE_ID"},
    }
    assert info["input_order"] == {
        "required": ["model", "seed", "steps", "cfg", "sampler_name", "positive", "denoise"],
        "optional": ["mask"], "hidden": ["unique_id"]}
    assert (info["output"], info["output_name"], info["output_is_list"]) == (["LATENT"], ["LATENT"], [False])
    assert (info["name"], info["display_name"], info["category"]) == ("KSampler", "KSampler", "sampling")
    assert (info["description"], info["output_node"], info["python_module"]) == ("Denoises a latent.", False,
                                                                                  __name__)


def test_declaration_records_context_wish_and_hidden_inputs():
    assert KSampler.wants_context
    assert KSampler.hidden_input("UNIQUE_ID") == "unique_id"
    assert KSampler.hidden_input("PROMPT") is None
    assert not toy_nodes.Add.wants_context


def test_widget_options_pass_through():
    @node(outputs=["STRING"])
    def LoadThing(image: Combo(["a.png"], image_upload=True, tooltip="a file"),
                  text: String("hi", multiline=True, dynamic_prompts=True, force_input=True),
                  flag: Boolean(True, label_on="yes", label_off="no"),
                  size: Int(64, step=8, lazy=True, extra={"display": "slider"})) -> tuple:
        return ("",)

    required = LoadThing.object_info()["input"]["required"]
    assert required["image"] == [["a.png"], {"image_upload": True, "tooltip": "a file"}]
    assert required["text"] == ["STRING", {"default": "hi", "forceInput": True, "multiline": True,
                                           "dynamicPrompts": True}]
    assert required["flag"] == ["BOOLEAN", {"default": True, "label_on": "yes", "label_off": "no"}]
    assert required["size"] == ["INT", {"default": 64, "step": 8, "lazy": True, "display": "slider"}]


def test_computed_combo_options_are_evaluated_at_each_object_info():
    folder = ["one.safetensors"]

    @node(outputs=["MODEL"])
    def Loader(name: Combo(lambda: list(folder))) -> tuple:
        return (name,)

    registry = Registry([Loader])
    assert registry.object_info()["Loader"]["input"]["required"]["name"][0] == ["one.safetensors"]
    folder.append("two.safetensors")
    assert registry.object_info()["Loader"]["input"]["required"]["name"][0] == ["one.safetensors", "two.safetensors"]


def test_display_name_and_output_node_flag():
    info = toy_nodes.Constant.object_info()
    assert info["display_name"] == "Integer constant"
    assert toy_nodes.Output.object_info()["output_node"] is True
    assert toy_nodes.Output.object_info()["output"] == []


def test_decorated_node_stays_callable_as_a_function():
    assert toy_nodes.Add(2, 3) == (5,)
    assert toy_nodes.DivMod(a=7, b=2) == (3, 1)


def test_optional_input_without_python_default_is_refused():
    with pytest.raises(TypeError, match="optional input 'mask' needs a Python default"):
        @node()
        def Bad(mask: Socket("MASK", optional=True)) -> tuple:
            return ()


def test_unannotated_input_is_refused():
    with pytest.raises(TypeError, match="input 'value' must be annotated with an input spec"):
        @node()
        def Bad(value: int) -> tuple:
            return ()


def test_keyword_only_parameter_other_than_context_is_refused():
    with pytest.raises(TypeError, match="parameter 'extra' must be a plain input parameter"):
        @node()
        def Bad(value: Int(0), *, extra: Int(0)) -> tuple:
            return ()


def test_unknown_hidden_kind_is_refused():
    with pytest.raises(ValueError, match="Hidden input kind 'NODE_ID'"):
        Hidden("NODE_ID")


def test_result_of_normalises_tuples_and_node_results():
    assert toy_nodes.Add.result_of((3,)) == NodeResult(outputs=(3,))
    assert toy_nodes.Sink.result_of(None) == NodeResult()
    ui = NodeResult(ui={"value": [1]})
    assert toy_nodes.Output.result_of(ui) is ui


def test_result_of_refuses_wrong_arity_and_non_tuples():
    with pytest.raises(TypeError, match=r"node BadArity returned 2 output\(s\); it declares 1: \['value'\]"):
        toy_nodes.BadArity.result_of((1, 2))
    with pytest.raises(TypeError, match="node Add returned int; expected a tuple of 1 output"):
        toy_nodes.Add.result_of(5)


def test_load_module_registers_every_node_type_in_it(registry):
    expected = {"Constant", "Add", "Multiply", "DivMod", "Scale", "Concat", "ToText", "Pick", "PickComputed",
                "Output", "Sink", "Fail", "Slow", "Even", "BrokenValidator", "Volatile", "AlwaysRerun",
                "ReadText", "WhoAmI", "MakeBlob", "BadArity", "SaveText", "PickToyFile"}
    assert set(registry.names()) == expected
    assert list(registry.object_info()) == sorted(expected)


def test_registering_another_node_under_a_taken_name_is_refused(registry):
    @node(name="Add")
    def Impostor(a: Int(0)) -> tuple:
        return (a,)

    with pytest.raises(ValueError, match="node class 'Add' .* is already registered by toy_nodes"):
        registry.register(Impostor)
    registry.register(toy_nodes.Add)  # the same object again is harmless
    assert registry["Add"] is toy_nodes.Add


def test_unknown_class_lookup_names_the_class(registry):
    assert registry.get("Nope") is None
    with pytest.raises(KeyError, match="no node class 'Nope' is registered"):
        registry["Nope"]


def test_load_module_walks_package_submodules(tmp_path):
    package = tmp_path / "my_pack"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "maths.py").write_text(
        "from engine import Int, node\n"
        "@node(outputs=['INT'])\n"
        "def Triple(value: Int(0)) -> tuple:\n"
        "    return (3 * value,)\n")
    module = import_node_module(str(package))
    registry = Registry()
    found = registry.load_module(module)
    assert [t.name for t in found] == ["Triple"]
    assert registry["Triple"](value=2) == (6,)


def test_import_node_module_by_file_path(tmp_path):
    source = tmp_path / "extra_nodes.py"
    source.write_text("from engine import Int, node\n"
                      "@node(outputs=['INT'])\n"
                      "def Negate(value: Int(0)) -> tuple:\n"
                      "    return (-value,)\n")
    module = import_node_module(str(source))
    assert isinstance(module, types.ModuleType)
    assert Registry().load_module(module)[0](value=4) == (-4,)


def test_importable_name_is_imported_even_when_a_folder_of_that_name_is_in_the_cwd(tmp_path, monkeypatch):
    # `sdgraph` run from the checkout sees the `nodes/` folder; the package must still load as `nodes`.
    (tmp_path / "named_pack").mkdir()
    (tmp_path / "named_pack" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "named_pack", raising=False)
    assert import_node_module("named_pack").__name__ == "named_pack"


def test_folder_that_is_not_importable_loads_by_path(tmp_path, monkeypatch):
    (tmp_path / "loose_pack").mkdir()
    (tmp_path / "loose_pack" / "__init__.py").write_text("VALUE = 5\n")
    monkeypatch.chdir(tmp_path)
    module = import_node_module("loose_pack")
    assert module.VALUE == 5 and module.__name__.startswith("sdgraph_custom_loose_pack_")


def test_missing_dependency_of_an_importable_module_is_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "needy_pack").mkdir()
    (tmp_path / "needy_pack" / "__init__.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        import_node_module("needy_pack")


def test_import_node_module_names_a_missing_file(tmp_path):
    with pytest.raises(ImportError, match="does not exist"):
        import_node_module(str(tmp_path / "absent.py"))


def test_output_tooltips_and_flags_appear_in_object_info():
    @node(outputs=[("IMAGE", "IMAGE", "the decoded image"), "MASK"], deprecated=True, display_name="Decode")
    def Decode(samples: Socket("LATENT")) -> tuple:
        return (None, None)

    info = Decode.object_info()
    assert (info["output"], info["output_name"]) == (["IMAGE", "MASK"], ["IMAGE", "MASK"])
    assert info["output_tooltips"] == ["the decoded image", ""]
    assert (info["deprecated"], info["experimental"], info["display_name"]) == (True, False, "Decode")
    assert "output_tooltips" not in toy_nodes.Add.object_info()


def test_same_file_name_in_two_folders_gives_two_modules(tmp_path):
    for pack, value in (("pack_a", 1), ("pack_b", 2)):
        (tmp_path / pack).mkdir()
        (tmp_path / pack / "nodes.py").write_text(f"VALUE = {value}\n")
    first = import_node_module(str(tmp_path / "pack_a" / "nodes.py"))
    second = import_node_module(str(tmp_path / "pack_b" / "nodes.py"))
    assert (first.VALUE, second.VALUE) == (1, 2)
    assert import_node_module(str(tmp_path / "pack_a" / "nodes.py")) is first


def test_failing_option_listing_gives_empty_options_not_a_broken_object_info():
    def unreadable():
        raise PermissionError("models folder unreadable")

    @node(outputs=["MODEL"])
    def Loader(name: Combo(unreadable)) -> tuple:
        return (name,)

    assert Registry([Loader]).object_info()["Loader"]["input"]["required"]["name"] == [[], {}]
