"""Toy node types for engine tests: plain Python values, no torch.

Also loadable by path with `sdgraph --nodes tests/engine/toy_nodes.py`.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

from engine import (ALWAYS_RERUN, Boolean, Combo, ExecutionContext, Float, Hidden, Int, NodeResult, RunSettings,
                    Socket, String, node)
from engine.paths import list_files, resolve_inside

LETTERS = ["a", "b", "c"]


def build_prompt(*nodes: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    """An API prompt from (node_id, class_type, inputs) triples."""
    return {node_id: {"class_type": class_type, "inputs": inputs} for node_id, class_type, inputs in nodes}


@node(category="toy", outputs=[("INT", "value")], display_name="Integer constant")
def Constant(value: Int(0, min=-1000, max=1000)) -> tuple:
    return (value,)


@node(category="toy", outputs=[("INT", "sum")])
def Add(a: Int(0), b: Int(0)) -> tuple:
    return (a + b,)


@node(category="toy", outputs=[("INT", "product")])
def Multiply(a: Int(1), b: Int(1)) -> tuple:
    return (a * b,)


@node(category="toy", outputs=[("INT", "quotient"), ("INT", "remainder")])
def DivMod(a: Int(0), b: Int(1, min=1)) -> tuple:
    return divmod(a, b)


@node(category="toy", outputs=[("FLOAT", "value")])
def Scale(value: Float(1.0, min=0.0, max=10.0, step=0.1, round=0.01), factor: Float(2.0)) -> tuple:
    return (value * factor,)


@node(category="toy", outputs=[("STRING", "text")])
def Concat(a: String("", multiline=True), b: String(""), separator: String(" ", optional=True) = " ") -> tuple:
    return (a + separator + b,)


@node(category="toy", outputs=[("STRING", "text")])
def ToText(value: Socket("INT"), upper: Boolean(False, label_on="upper", label_off="as is")) -> tuple:
    return (str(value).upper() if upper else str(value),)


@node(category="toy", outputs=[("STRING", "letter")])
def Pick(letter: Combo(LETTERS, default="a")) -> tuple:
    return (letter,)


def _numbers_in(folder: str) -> list[str]:
    return [f"{folder}/{i}" for i in range(3)]


@node(category="toy", outputs=[("STRING", "name")])
def PickComputed(name: Combo(lambda: _numbers_in("dynamic"))) -> tuple:
    return (name,)


@node(category="toy", output_node=True, description="Shows a value in the client.")
def Output(value: Socket("*", tooltip="anything")) -> NodeResult:
    return NodeResult(ui={"value": [value]})


@node(category="toy", output_node=True)
def Sink(value: Socket("*"), note: String("", optional=True) = "") -> None:
    return None


@node(category="toy", outputs=[("INT", "value")])
def Fail(value: Int(0), message: String("boom")) -> tuple:
    raise RuntimeError(message)


@node(category="toy", outputs=[("INT", "value")])
def Slow(value: Int(0), ticks: Int(3, min=1), *, context: ExecutionContext) -> tuple:
    for tick in range(ticks):
        context.progress(tick + 1, ticks)
    return (value,)


def _even(inputs: Mapping[str, Any]) -> str | None:
    return None if inputs.get("value", 0) % 2 == 0 else f"value must be even, got {inputs['value']}"


@node(category="toy", outputs=[("INT", "value")], validate=_even)
def Even(value: Int(0)) -> tuple:
    return (value,)


def _explode(inputs: Mapping[str, Any]) -> str | None:
    raise ValueError("validator exploded")


@node(category="toy", outputs=[("INT", "value")], validate=_explode)
def BrokenValidator(value: Int(0)) -> tuple:
    return (value,)


@node(category="toy", outputs=[("INT", "value")], cacheable=False)
def Volatile(value: Int(0)) -> tuple:
    return (value,)


@node(category="toy", outputs=[("INT", "value")], fingerprint=lambda inputs, settings: ALWAYS_RERUN)
def AlwaysRerun(value: Int(0)) -> tuple:
    return (value,)


def _file_hash(inputs: Mapping[str, Any], settings: RunSettings) -> str:
    return hashlib.sha256(resolve_inside(settings.input_dir, inputs["name"]).read_bytes()).hexdigest()


@node(category="toy", outputs=[("STRING", "text")], fingerprint=_file_hash)
def ReadText(name: String("note.txt"), *, context: ExecutionContext) -> tuple:
    return (resolve_inside(context.settings.input_dir, name).read_text(),)


@node(category="toy", outputs=[("STRING", "id")])
def WhoAmI(value: Int(0), unique_id: Hidden("UNIQUE_ID"), extra_pnginfo: Hidden("EXTRA_PNGINFO")) -> tuple:
    return (f"{unique_id}:{value}:{sorted((extra_pnginfo or {}).keys())}",)


class Blob:
    """Stands in for a tensor: reports its size through `nbytes`, as torch tensors and numpy arrays do."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


@node(category="toy", outputs=[("BLOB", "blob")])
def MakeBlob(size: Int(1000, min=0)) -> tuple:
    return (Blob(size),)


@node(category="toy", outputs=[("INT", "value")])
def BadArity(value: Int(0)) -> tuple:
    return (value, value)


@node(category="toy", output_node=True, outputs=[("STRING", "path")])
def SaveText(text: String("", force_input=True), filename: String("out.txt"), *,
             context: ExecutionContext) -> NodeResult:
    target = resolve_inside(context.settings.output_dir, filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return NodeResult(outputs=(str(target),), ui={"files": [{"filename": filename, "subfolder": "",
                                                            "type": "output"}]})


def _toy_files(settings: RunSettings) -> list[str]:
    return list_files(settings.models_dir / "toys", (".toy",))


@node(category="toy", outputs=[("STRING", "name")])
def PickToyFile(name: Combo(_toy_files)) -> tuple:
    """Options listed from the run's models folder, as loader nodes list checkpoints."""
    return (name,)
