"""Validation of an API prompt against the registry, before anything runs, reporting every problem at once.

Errors use ComfyUI's shapes so its clients understand them: a prompt-level error `{type, message, details,
extra_info}` and `node_errors: {node_id: {errors: [...], dependent_outputs: [...], class_type}}`.
Behaviour, and where it departs from ComfyUI:
- Only output nodes (or `targets`, ComfyUI's `partial_execution_targets`) and their ancestors are checked,
  as in ComfyUI; valid outputs run even when others fail (`ValidationResult.outputs`).
- Unknown classes anywhere stop the prompt (`missing_node_type`) as in ComfyUI, but every one is named.
- A missing widget input with a declared default gets that default: workflows saved before an input
  existed (e.g. VAEEncodeForInpaint without `grow_mask_by`) keep working. Without a default it is
  `required_input_missing`.
- Inputs a node does not declare are dropped (old workflows carry leftovers like `choose file to upload`).
- Cycles are found statically (`dependency_cycle`, naming the cycle's nodes); ComfyUI only fails at run time.
- A crash inside a validation hook is `exception_during_validation` on that node and
  `exception_during_inner_validation` on the nodes linked to it, as ComfyUI reports them.
"""
from __future__ import annotations

import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import networkx as nx

from engine.context import RunSettings
from engine.schema import NodeType, Registry
from engine.types import Combo, InputError, InputSpec
from engine.workflow import BadLink, Link, PromptFormatError, PromptNode, Workflow, parse_prompt

_MISSING = object()


@dataclass(frozen=True)
class ValidationError:
    type: str
    message: str
    details: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "details": self.details, "extra_info": self.extra_info}


@dataclass(frozen=True)
class NodeErrors:
    class_type: str
    errors: tuple[ValidationError, ...]
    dependent_outputs: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"errors": [e.to_json() for e in self.errors], "dependent_outputs": list(self.dependent_outputs),
                "class_type": self.class_type}


@dataclass(frozen=True)
class ValidationResult:
    """`error` is set when nothing can run; `outputs` are the output nodes that may run, `workflow` the
    prompt with constants converted, defaults filled and undeclared inputs dropped."""

    error: ValidationError | None
    node_errors: dict[str, NodeErrors]
    outputs: tuple[str, ...] = ()
    failed_outputs: tuple[str, ...] = ()
    workflow: Workflow | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """`{"error": ..., "node_errors": ...}` as in the body of ComfyUI's `POST /prompt` answers."""
        return {"error": self.error.to_json() if self.error else None,
                "node_errors": {node_id: errors.to_json() for node_id, errors in self.node_errors.items()}}

    def messages(self) -> list[str]:
        """One human-readable line per problem, for the CLI and logs."""
        lines = [f"{self.error.message}: {self.error.details}" if self.error.details else self.error.message] \
            if self.error else []
        for node_id, entry in self.node_errors.items():
            for error in entry.errors:
                lines.append(f"node {node_id} ({entry.class_type}): {error.type}: {error.details or error.message}")
        return lines


def validate_prompt(prompt: Any, registry: Registry, targets: Sequence[str] | None = None,
                    settings: RunSettings | None = None) -> ValidationResult:
    """Check an API prompt (decoded JSON) before running it; `targets` narrows the outputs to run and
    `settings` are the folders that COMBO options (model files) are listed from."""
    try:
        workflow = parse_prompt(prompt)
    except PromptFormatError as problem:
        error = ValidationError("invalid_prompt", "Invalid prompt", "; ".join(problem.problems),
                                {"problems": problem.problems})
        return ValidationResult(error=error, node_errors={})
    return _Validation(workflow, registry, settings).run(targets)


def _error(error_type: str, message: str, details: str, **extra_info: Any) -> ValidationError:
    return ValidationError(error_type, message, details, extra_info)


class _Validation:
    def __init__(self, workflow: Workflow, registry: Registry, settings: RunSettings | None) -> None:
        self.workflow = workflow
        self.registry = registry
        self.settings = settings
        self.errors: dict[str, list[ValidationError]] = {}
        self.crashed: set[str] = set()
        self.normalized: dict[str, PromptNode] = {}
        self.combo_options: dict[int, list[Any]] = {}

    def run(self, targets: Sequence[str] | None) -> ValidationResult:
        unknown = [n for n in self.workflow.nodes.values() if n.class_type not in self.registry]
        for prompt_node in unknown:
            self._add(prompt_node.id, _error("missing_node_type", "Node type not found",
                                             f"node class {prompt_node.class_type!r} is not registered",
                                             class_type=prompt_node.class_type, node_title=prompt_node.title))
        outputs, target_error = self._outputs(targets)
        if target_error is not None:
            return ValidationResult(error=target_error, node_errors={})
        ancestry = {output: self._ancestors(output) for output in outputs}
        to_check = [n for n in self.workflow.nodes if any(n in nodes for nodes in ancestry.values())]
        self._check_cycles(set(to_check))
        for node_id in to_check:
            self._check_node(self.workflow[node_id])
        for node_id in to_check:
            self._report_crashed_sources(self.workflow[node_id])
        good = () if unknown else tuple(o for o in outputs if not any(n in self.errors for n in ancestry[o]))
        failed = tuple(o for o in outputs if o not in good)
        return ValidationResult(error=self._prompt_error(unknown, outputs, good),
                                node_errors=self._node_errors(ancestry), outputs=good, failed_outputs=failed,
                                workflow=Workflow({**self.workflow.nodes, **self.normalized}))

    def _outputs(self, targets: Sequence[str] | None) -> tuple[list[str], ValidationError | None]:
        if targets is None:
            return [n.id for n in self.workflow.nodes.values()
                    if n.class_type in self.registry and self.registry[n.class_type].output_node], None
        if isinstance(targets, (str, bytes)) or not isinstance(targets, (list, tuple)) \
                or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in targets):
            # Straight from a POST body: a bare string would otherwise be read character by character.
            return [], _error("invalid_prompt", "Invalid prompt",
                              f"partial_execution_targets must be a list of node ids, got {targets!r}")
        targets = [str(t) for t in targets]  # numeric ids, as links may carry them
        missing = [t for t in targets if t not in self.workflow]
        if missing:
            return [], _error("invalid_prompt", "Invalid prompt",
                              f"partial_execution_targets name nodes not in the prompt: {missing}", missing=missing)
        return list(dict.fromkeys(targets)), None

    def _prompt_error(self, unknown: list[PromptNode], outputs: list[str],
                      good: tuple[str, ...]) -> ValidationError | None:
        if unknown:
            names = sorted({n.class_type for n in unknown})
            first = unknown[0]
            return _error("missing_node_type", f"Node '{first.title or first.class_type}' not found. "
                          "The custom node may not be installed.",
                          f"unknown node classes: {', '.join(names)} (nodes {', '.join(n.id for n in unknown)})",
                          node_id=first.id, class_type=first.class_type, node_title=first.title or first.class_type)
        if not outputs:
            return _error("prompt_no_outputs", "Prompt has no outputs", "the prompt has no output node to run")
        if not good:
            return _error("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                          f"{len(self.errors)} node(s) have errors")
        return None

    def _node_errors(self, ancestry: dict[str, set[str]]) -> dict[str, NodeErrors]:
        entries = {}
        for node_id, errors in self.errors.items():
            dependents = tuple(o for o, nodes in ancestry.items() if node_id in nodes)
            entries[node_id] = NodeErrors(self.workflow[node_id].class_type, tuple(errors), dependents)
        return entries

    def _add(self, node_id: str, error: ValidationError) -> None:
        self.errors.setdefault(node_id, []).append(error)

    def _ancestors(self, output: str) -> set[str]:
        seen = {output}
        queue = deque([output])
        while queue:
            for _, link in self.workflow[queue.popleft()].links():
                if link.node_id in self.workflow and link.node_id not in seen:
                    seen.add(link.node_id)
                    queue.append(link.node_id)
        return seen

    def _check_cycles(self, relevant: set[str]) -> None:
        """Name every cycle among the nodes the outputs need (a cycle node's ancestry holds the whole cycle)."""
        graph = nx.DiGraph()
        for prompt_node in self.workflow.nodes.values():
            for _, link in prompt_node.links():
                if link.node_id in self.workflow:
                    graph.add_edge(link.node_id, prompt_node.id)
        for component in nx.strongly_connected_components(graph):
            is_cycle = len(component) > 1 or graph.has_edge(*(next(iter(component)),) * 2)
            if not is_cycle or not component & relevant:
                continue
            cycle = [edge[0] for edge in nx.find_cycle(graph.subgraph(component))]
            path = " -> ".join(cycle + cycle[:1])
            for node_id in sorted(component):
                self._add(node_id, _error("dependency_cycle", "Dependency cycle", f"nodes form a cycle: {path}",
                                          cycle=cycle))

    def _check_node(self, prompt_node: PromptNode) -> None:
        node_type = self.registry.get(prompt_node.class_type)
        if node_type is None:
            return
        inputs: dict[str, Any] = {}
        count_before = len(self.errors.get(prompt_node.id, []))
        for name, spec in node_type.inputs.items():
            value = prompt_node.inputs.get(name, _MISSING)
            checked = self._check_input(prompt_node.id, name, spec, value)
            if checked is not _MISSING:
                inputs[name] = checked
        self.normalized[prompt_node.id] = PromptNode(prompt_node.id, prompt_node.class_type, inputs, prompt_node.title)
        if node_type.validate is not None and len(self.errors.get(prompt_node.id, [])) == count_before:
            self._run_hook(prompt_node.id, node_type, inputs)

    def _check_input(self, node_id: str, name: str, spec: InputSpec, value: Any) -> Any:
        """The value to run with, or _MISSING; records an error for anything wrong."""
        if value is _MISSING:
            if spec.optional:
                return _MISSING
            if spec.is_widget and spec.has_default() and not getattr(spec, "force_input", False):
                return getattr(spec, "default")
            self._add(node_id, _error("required_input_missing", "Required input is missing",
                                      f"{name}: required input is missing", input_name=name))
            return _MISSING
        if isinstance(value, BadLink):
            self._add(node_id, _error("bad_linked_input", "Bad linked input, must be a length-2 list of "
                                      "[node_id, output_index]", f"{name}: {value.value!r} is not a link",
                                      input_name=name, input_config=self._config(spec), received_value=value.value))
            return _MISSING
        if isinstance(value, Link):
            self._check_link(node_id, name, spec, value)
            return value
        return self._check_constant(node_id, name, spec, value)

    def _check_link(self, node_id: str, name: str, spec: InputSpec, link: Link) -> None:
        extra = {"input_name": name, "input_config": self._config(spec), "linked_node": link.to_api()}
        if link.node_id not in self.workflow:
            self._add(node_id, _error("bad_linked_input", "Bad linked input: the linked node does not exist",
                                      f"{name}: links to node {link.node_id!r}, which is not in the prompt", **extra))
            return
        source_type = self.registry.get(self.workflow[link.node_id].class_type)
        if source_type is None:
            return  # the source's own missing_node_type error says it all
        if link.output_index >= len(source_type.outputs):
            self._add(node_id, _error("bad_linked_input", "Bad linked input: no such output",
                                      f"{name}: node {link.node_id} ({source_type.name}) has "
                                      f"{len(source_type.outputs)} output(s), index {link.output_index} "
                                      "is out of range", **extra))
            return
        received = source_type.outputs[link.output_index].type
        if not spec.accepts_link(received):
            self._add(node_id, _error("return_type_mismatch", "Return type mismatch between linked nodes",
                                      f"{name}: received_type({received}) mismatch input_type({spec.type_name})",
                                      received_type=received, **extra))

    def _check_constant(self, node_id: str, name: str, spec: InputSpec, value: Any) -> Any:
        try:
            if isinstance(spec, Combo):
                return spec.coerce(value, self._options(spec))
            return spec.coerce(value)
        except InputError as problem:
            self._add(node_id, _error(problem.error_type, problem.message, f"{name}: {problem.details}",
                                      input_name=name, input_config=self._config(spec), received_value=value))
        except Exception as crash:  # a COMBO option callable failed (e.g. an unreadable models folder)
            self._record_crash(node_id, "exception_during_validation", f"{name}: {crash}", crash, input_name=name)
        return _MISSING

    def _run_hook(self, node_id: str, node_type: NodeType, inputs: dict[str, Any]) -> None:
        constants = {k: v for k, v in inputs.items() if not isinstance(v, Link)}
        try:
            verdict = node_type.validate(constants)  # type: ignore[misc]
        except Exception as crash:
            self._record_crash(node_id, "exception_during_validation", str(crash), crash)
            return
        if verdict is not None and verdict is not True:
            self._add(node_id, _error("custom_validation_failed", "Custom validation failed for node",
                                      str(verdict), input_names=sorted(constants)))

    def _record_crash(self, node_id: str, error_type: str, details: str, crash: Exception, **extra: Any) -> None:
        self.crashed.add(node_id)
        self._add(node_id, _error(error_type, "Exception when validating node", details,
                                  exception_type=type(crash).__name__, exception_message=str(crash),
                                  traceback=traceback.format_exception(crash), **extra))

    def _report_crashed_sources(self, prompt_node: PromptNode) -> None:
        for name, link in prompt_node.links():
            if link.node_id in self.crashed:
                self._add(prompt_node.id, _error("exception_during_inner_validation",
                                                 "Exception when validating inner node",
                                                 f"{name}: validating node {link.node_id} raised an exception",
                                                 input_name=name, linked_node=link.to_api()))

    def _options(self, spec: Combo) -> list[Any]:
        # One evaluation per validation: option callables may list folders, and all inputs must agree.
        if id(spec) not in self.combo_options:
            self.combo_options[id(spec)] = spec.current_options(self.settings)
        return self.combo_options[id(spec)]

    def _config(self, spec: InputSpec) -> list:
        if isinstance(spec, Combo):
            try:
                return spec.object_info(options=self._options(spec))
            except Exception:
                return ["COMBO", {}]
        return spec.object_info()

