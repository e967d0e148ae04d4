"""Node declaration (`@node`), the registry of node types, and their `/object_info` description.

A node is a plain function; its parameters are its inputs and their annotations are the input specs:

    @node(category="sampling", outputs=[("LATENT", "LATENT")])
    def KSampler(model: Socket("MODEL"), seed: Int(0, min=0, max=2**64 - 1, control_after_generate=True),
                 steps: Int(20, min=1, max=10000), *, context: ExecutionContext) -> tuple: ...

- An optional input is a spec with `optional=True` and needs a Python default (it is omitted when absent).
- A `Hidden("UNIQUE_ID" | "PROMPT" | "EXTRA_PNGINFO")` annotation is filled by the engine.
- A keyword-only `context` parameter receives the ExecutionContext; nodes that don't declare it don't get it.
- The function returns a tuple with one value per declared output, or a NodeResult carrying `ui` data too.
  Batch semantics are simple: a node gets exactly one value per input (no per-element list mapping as in
  ComfyUI's `INPUT_IS_LIST`); batches live inside tensors.

With `from __future__ import annotations` the specs are evaluated from the module's globals when the node
is declared, so they may then only refer to module-level names.

The decorated name stays callable (it calls the function), so nodes are unit-testable as functions.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

from engine.context import RunSettings
from engine.types import Hidden, InputSpec

#: A fingerprint hook returning this (or a float NaN, as ComfyUI's IS_CHANGED does) makes the node re-run.
ALWAYS_RERUN = float("nan")

ValidateHook = Callable[[Mapping[str, Any]], "str | None"]
FingerprintHook = Callable[[Mapping[str, Any], RunSettings], Hashable]


@dataclass(frozen=True)
class Output:
    type: str
    name: str
    tooltip: str | None = None


@dataclass(frozen=True)
class NodeResult:
    """A node's outputs plus `ui` data for the client, e.g. `{"images": [{"filename", "subfolder", "type"}]}`."""

    outputs: tuple = ()
    ui: Mapping[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class NodeType:
    name: str
    function: Callable[..., Any]
    inputs: Mapping[str, InputSpec]
    hidden: Mapping[str, Hidden]
    outputs: tuple[Output, ...]
    category: str = ""
    display_name: str = ""
    description: str = ""
    output_node: bool = False
    cacheable: bool = True
    wants_context: bool = False
    validate: ValidateHook | None = None
    fingerprint: FingerprintHook | None = None
    python_module: str = ""
    deprecated: bool = False
    experimental: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def hidden_input(self, kind: str) -> str | None:
        """The parameter name receiving hidden value `kind`, if the node declares one."""
        return next((name for name, spec in self.hidden.items() if spec.kind == kind), None)

    def result_of(self, returned: Any) -> NodeResult:
        """Normalise what the function returned, refusing anything that does not match the declared outputs."""
        result = returned if isinstance(returned, NodeResult) else None
        if returned is None and not self.outputs:
            result = NodeResult()
        elif isinstance(returned, tuple):
            result = NodeResult(outputs=returned)
        if result is None:
            raise TypeError(f"node {self.name} returned {type(returned).__name__}; expected a tuple of "
                            f"{len(self.outputs)} output(s) or a NodeResult")
        if len(result.outputs) != len(self.outputs):
            raise TypeError(f"node {self.name} returned {len(result.outputs)} output(s); it declares "
                            f"{len(self.outputs)}: {[o.name for o in self.outputs]}")
        if result.ui is not None:
            try:  # ui data goes to websocket clients and into the history as JSON
                json.dumps(result.ui, allow_nan=False)
            except (TypeError, ValueError) as problem:
                raise TypeError(f"node {self.name} returned ui data that is not JSON: {problem}") from None
        return result

    def object_info(self, settings: RunSettings | None = None) -> dict[str, Any]:
        """This node type in the shape of one entry of ComfyUI's `GET /object_info`; `settings` feeds COMBO
        options that depend on the configured folders."""
        groups: dict[str, dict[str, Any]] = {"required": {}}
        order: dict[str, list[str]] = {"required": []}
        for name, spec in self.inputs.items():
            group = "optional" if spec.optional else "required"
            groups.setdefault(group, {})[name] = spec.object_info(settings)
            order.setdefault(group, []).append(name)
        if self.hidden:
            groups["hidden"] = {name: spec.kind for name, spec in self.hidden.items()}
            order["hidden"] = list(self.hidden)
        info = {
            "input": groups, "input_order": order,
            "output": [o.type for o in self.outputs], "output_is_list": [False] * len(self.outputs),
            "output_name": [o.name for o in self.outputs],
            "name": self.name, "display_name": self.display_name or self.name, "description": self.description,
            "python_module": self.python_module, "category": self.category, "output_node": self.output_node,
            "deprecated": self.deprecated, "experimental": self.experimental,
        }
        if any(o.tooltip for o in self.outputs):
            info["output_tooltips"] = [o.tooltip or "" for o in self.outputs]
        return info


OutputDecl = str | tuple[str, str] | tuple[str, str, str] | Output


def node(*, category: str = "", outputs: Sequence[OutputDecl] = (), display_name: str = "",
         description: str = "", output_node: bool = False, cacheable: bool = True,
         validate: ValidateHook | None = None, fingerprint: FingerprintHook | None = None,
         name: str | None = None, deprecated: bool = False,
         experimental: bool = False) -> Callable[[Callable[..., Any]], NodeType]:
    """Declare a node type from a function (see the module docstring).

    `validate(constants)` returns None when fine or a message (reported as `custom_validation_failed`);
    `fingerprint(constants, settings)` returns a hashable summary of external state (a file's hash) that
    joins the cache key, or ALWAYS_RERUN. `cacheable=False` re-runs the node, and so its dependents, every time.
    """
    def declare(function: Callable[..., Any]) -> NodeType:
        inputs, hidden, wants_context = _inputs_of(function)
        return NodeType(
            name=name or function.__name__, function=function, inputs=inputs, hidden=hidden,
            outputs=tuple(_output_of(declared) for declared in outputs), category=category,
            display_name=display_name, description=description or inspect.getdoc(function) or "",
            output_node=output_node, cacheable=cacheable, wants_context=wants_context, validate=validate,
            fingerprint=fingerprint, python_module=function.__module__, deprecated=deprecated,
            experimental=experimental)
    return declare


def _output_of(declared: OutputDecl) -> Output:
    if isinstance(declared, Output):
        return declared
    if isinstance(declared, str):
        return Output(declared, declared)
    return Output(*declared)


def _inputs_of(function: Callable[..., Any]) -> tuple[dict[str, InputSpec], dict[str, Hidden], bool]:
    where = f"{function.__module__}.{function.__qualname__}"
    annotations = inspect.get_annotations(function, eval_str=True)
    inputs: dict[str, InputSpec] = {}
    hidden: dict[str, Hidden] = {}
    wants_context = False
    for parameter in inspect.signature(function).parameters.values():
        spec = annotations.get(parameter.name)
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name == "context":
            wants_context = True
        elif parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            raise TypeError(f"{where}: parameter {parameter.name!r} must be a plain input parameter "
                            "(only a keyword-only 'context' may follow the inputs)")
        elif isinstance(spec, Hidden):
            hidden[parameter.name] = spec
        elif isinstance(spec, InputSpec):
            if spec.optional and parameter.default is inspect.Parameter.empty:
                raise TypeError(f"{where}: optional input {parameter.name!r} needs a Python default "
                                "(it is not passed when absent)")
            inputs[parameter.name] = spec
        else:
            raise TypeError(f"{where}: input {parameter.name!r} must be annotated with an input spec "
                            f"(Int, Float, String, Boolean, Combo, Socket or Hidden), found {spec!r}")
    return inputs, hidden, wants_context


class Registry:
    """The node types a server or CLI knows, by class name."""

    def __init__(self, node_types: Iterable[NodeType] = ()) -> None:
        self._types: dict[str, NodeType] = {}
        for node_type in node_types:
            self.register(node_type)

    def register(self, node_type: NodeType) -> NodeType:
        known = self._types.get(node_type.name)
        if known is not None and known is not node_type:
            raise ValueError(f"node class {node_type.name!r} from {node_type.python_module} is already "
                             f"registered by {known.python_module}")
        self._types[node_type.name] = node_type
        return node_type

    def load_module(self, module: ModuleType) -> list[NodeType]:
        """Register every NodeType among a module's attributes; for a package, also its submodules."""
        found = [value for value in vars(module).values() if isinstance(value, NodeType)]
        for node_type in found:
            self.register(node_type)
        for submodule in _submodules(module):
            found.extend(self.load_module(submodule))
        return found

    def get(self, name: str) -> NodeType | None:
        return self._types.get(name)

    def __getitem__(self, name: str) -> NodeType:
        if name not in self._types:
            raise KeyError(f"no node class {name!r} is registered")
        return self._types[name]

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[NodeType]:
        return iter(self._types.values())

    def __len__(self) -> int:
        return len(self._types)

    def names(self) -> list[str]:
        return sorted(self._types)

    def object_info(self, settings: RunSettings | None = None) -> dict[str, dict[str, Any]]:
        """The whole `GET /object_info` answer; COMBO option callables are evaluated now, with `settings`."""
        return {name: self._types[name].object_info(settings) for name in self.names()}


def _submodules(module: ModuleType) -> list[ModuleType]:
    if not hasattr(module, "__path__"):
        return []
    names = sorted(info.name for info in pkgutil.iter_modules(module.__path__) if not info.name.startswith("_"))
    return [importlib.import_module(f"{module.__name__}.{name}") for name in names]


def import_node_module(reference: str) -> ModuleType:
    """Import a node module named by dotted name (`nodes`, `my_pack.nodes`) or by path (a `.py` file or
    a package directory): the custom-node mechanism of the CLI and server."""
    path = Path(reference)
    if not reference.endswith(".py"):
        if all(part.isidentifier() for part in reference.split(".")):
            # A dotted name is imported first, even with a folder of that name in the working directory
            # (`nodes` from the checkout): loaded by path it would become a second copy of the package.
            try:
                return importlib.import_module(reference)
            except ModuleNotFoundError as missing:
                named_itself = reference == missing.name or reference.startswith(f"{missing.name}.")
                if not (named_itself and path.is_dir()):
                    raise  # a missing dependency inside the module, or nothing of that name at all
        elif not path.is_dir():
            raise ImportError(f"node module {reference!r} is neither a module name, a .py file nor a folder")
    target = path / "__init__.py" if path.is_dir() else path
    if not target.is_file():
        raise ImportError(f"node module {reference!r}: {target} does not exist")
    # Named after the file and a hash of its full path: two packs may both ship a `nodes.py`.
    where = path.resolve()
    digest = hashlib.sha1(str(where).encode("utf-8")).hexdigest()[:8]
    module_name = f"sdgraph_custom_{where.stem if path.is_file() else where.name}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    locations = [str(where)] if path.is_dir() else None
    spec = importlib.util.spec_from_file_location(module_name, target, submodule_search_locations=locations)
    if spec is None or spec.loader is None:
        raise ImportError(f"node module {reference!r}: cannot be loaded from {target}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
