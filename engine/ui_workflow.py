"""ComfyUI's UI-format workflow (what the editor saves, and the `workflow` chunk of its PNGs) turned into an API
prompt with our node schemas, by the rules ComfyUI's frontend applies when it queues a graph, so a shared
UI JSON replays headless with the same inputs the browser would have sent.

- `widgets_values` is a list in schema widget order (required inputs, then optional, sockets and
  `forceInput` primitives skipped; a widget converted to an input keeps its slot). Extra entries that are
  not inputs sit right after their widget and are skipped: the control value of a `control_after_generate`
  widget (`fixed`, `increment`, `decrement`, `randomize`, or an old-style boolean), the filter string of a
  COMBO with one, and LoadImage's upload button (`"image"`). A shorter list leaves the rest out, so the
  validator fills their defaults (workflows older than an input). Some custom nodes save an object keyed
  by input name; that is accepted too.
- Links walk upstream through Reroutes; a PrimitiveNode's value replaces the widget it feeds; a bypassed
  source (mode 4) passes one of its own inputs through: the one at the used output's index if its type
  fits, else the first of exactly the wanted type, else the first compatible one. A link from a muted
  node (mode 2), an unknown one or a bypassed one with nothing to pass removes the input, even a
  converted widget's saved value (the validator then fills a default or names the missing input); a
  dangling Reroute or an unconnected pass-through leaves a converted widget its saved value.
- Muted and bypassed nodes, Reroute, PrimitiveNode, Note and MarkdownNote never reach the prompt, and
  neither does a node that fed only nodes that did not reach it (a loader behind a muted SaveImage).
- STRING widgets declared `dynamic_prompts` get ComfyUI's treatment: `//` and `/* */` comments removed,
  `{a|b|c}` replaced by one choice (innermost first), so `rng` decides what a random choice gives.
- A node of a type the registry lacks is a problem naming it (`convert_ui_workflow` still gives the rest
  of the prompt, without it and its links, as the editor's own converter does).
- A list-valued constant is wrapped as `{"__value__": [...]}` so it cannot read as a link.
- Groups, positions, colours and the camera are ignored. Links may be arrays (schema 0.4) or objects
  (schema 1). Group nodes and subgraphs are refused by name (not supported yet).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Mapping

from engine.schema import NodeType, Registry
from engine.types import Combo, InputSpec, String, types_compatible

MUTED, BYPASSED = 2, 4
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UPLOAD_VALUE = "image"
#: Editor-only helpers: they shape the graph in the browser and never run.
UI_ONLY_TYPES = frozenset({"Reroute", "PrimitiveNode", "Note", "MarkdownNote"})


class UIWorkflowError(ValueError):
    """The UI workflow cannot become a prompt; `problems` names every node at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def is_ui_workflow(data: Any) -> bool:
    """Whether decoded JSON is an editor save (nodes and links tables) rather than an API prompt."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


@dataclass(frozen=True)
class UILink:
    origin_id: str
    origin_slot: int
    target_id: str


@dataclass(frozen=True)
class UINode:
    id: str
    type: str
    mode: int
    inputs: tuple[Mapping[str, Any], ...]
    outputs: tuple[Mapping[str, Any], ...]
    widgets_values: Any
    title: str | None

    @property
    def reaches_prompt(self) -> bool:
        return self.type not in UI_ONLY_TYPES and self.mode not in (MUTED, BYPASSED)


#: What a link from a node that left the prompt (muted, unknown, bypassed with nothing to pass) becomes.
_DROPPED = object()


@dataclass(frozen=True)
class _Constant:
    """A value that arrives over a link from a PrimitiveNode."""

    value: Any


@dataclass(frozen=True)
class UIConversion:
    """The API prompt, and what stops it from running as the editor showed it: nodes of unknown types,
    which are left out (their links vanish) so the rest can still be inspected."""

    prompt: dict[str, Any]
    problems: list[str]


def ui_to_api(workflow: Mapping[str, Any], registry: Registry, *, rng: random.Random | None = None) -> dict:
    """The API prompt of a UI-format workflow; raises UIWorkflowError naming every node that cannot convert."""
    conversion = convert_ui_workflow(workflow, registry, rng=rng)
    if conversion.problems:
        raise UIWorkflowError(conversion.problems)
    return conversion.prompt


def convert_ui_workflow(workflow: Mapping[str, Any], registry: Registry, *,
                        rng: random.Random | None = None) -> UIConversion:
    """As `ui_to_api`, returning the problems beside the prompt instead of raising for unknown node types
    (a malformed workflow still raises UIWorkflowError)."""
    nodes, links = _parse(workflow)
    return _Conversion(nodes, links, registry, rng or random.Random()).run()


def _parse(workflow: Mapping[str, Any]) -> tuple[dict[str, UINode], dict[Any, UILink]]:
    if not is_ui_workflow(workflow):
        raise UIWorkflowError(["not a UI-format workflow: expected an object with 'nodes' and 'links'"])
    problems: list[str] = []
    nodes: dict[str, UINode] = {}
    for position, raw in enumerate(workflow["nodes"]):
        if not isinstance(raw, dict) or "id" not in raw or not isinstance(raw.get("type"), str):
            problems.append(f"nodes[{position}]: a node needs an 'id' and a string 'type'")
            continue
        mode = raw.get("mode", 0)
        nodes[str(raw["id"])] = UINode(
            id=str(raw["id"]), type=raw["type"], mode=mode if isinstance(mode, int) else 0,
            inputs=tuple(i for i in raw.get("inputs") or () if isinstance(i, dict)),
            outputs=tuple(o for o in raw.get("outputs") or () if isinstance(o, dict)),
            widgets_values=raw.get("widgets_values"), title=raw.get("title"))
    links: dict[Any, UILink] = {}
    for position, raw in enumerate(workflow["links"] or ()):
        if raw is None:
            continue  # a deleted link's empty slot, harmless
        parsed = _link(raw)
        if parsed is None:
            problems.append(f"links[{position}]: expected [id, origin_id, origin_slot, target_id, target_slot, "
                            f"type] or an object with those keys, got {raw!r}")
        else:
            links[parsed[0]] = parsed[1]
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or ()
                 if isinstance(s, dict)}
    for node in nodes.values():
        if node.type in subgraphs or node.type.startswith(("workflow>", "workflow/")):
            problems.append(f"node {node.id} ({node.type}): subgraphs and group nodes are not supported yet; "
                            "convert it back to plain nodes in the editor")
    if problems:
        raise UIWorkflowError(problems)
    return nodes, links


def _link(raw: Any) -> tuple[Any, UILink] | None:
    if isinstance(raw, dict):
        raw = [raw.get(key) for key in ("id", "origin_id", "origin_slot", "target_id", "target_slot")]
    if not isinstance(raw, list) or len(raw) < 5 or not isinstance(raw[2], int) or isinstance(raw[2], bool) \
            or raw[0] is None or raw[1] is None or raw[3] is None:
        return None
    return raw[0], UILink(origin_id=str(raw[1]), origin_slot=raw[2], target_id=str(raw[3]))


class _Conversion:
    def __init__(self, nodes: dict[str, UINode], links: dict[Any, UILink], registry: Registry,
                 rng: random.Random) -> None:
        self.nodes = nodes
        self.links = links
        self.registry = registry
        self.rng = rng

    def run(self) -> UIConversion:
        kept = [node for node in self.nodes.values() if node.reaches_prompt]
        problems = [f"node {node.id} ({node.type}): node type {node.type!r} is not registered; "
                    "the custom node may not be installed" for node in kept if node.type not in self.registry]
        prompt = {node.id: self._api_node(node, self.registry[node.type]) for node in kept
                  if node.type in self.registry}
        return UIConversion(self._without_orphans(prompt), problems)

    def _api_node(self, node: UINode, node_type: NodeType) -> dict[str, Any]:
        widgets = _widget_specs(node_type)
        inputs = _widget_inputs(node.widgets_values, widgets)
        for ui_input in node.inputs:
            name, link_id = ui_input.get("name"), ui_input.get("link")
            if not isinstance(name, str) or link_id is None:
                continue
            spec = node_type.inputs.get(name)
            wanted = ui_input.get("type") or (spec.type_name if spec is not None else "*")
            source = self._source(link_id, wanted, set())
            if isinstance(source, _Constant):
                inputs[name] = _constant(source.value)
            elif source is _DROPPED:
                inputs.pop(name, None)
            elif source is not None:
                inputs[name] = source
        for name, spec in widgets.items():
            if isinstance(spec, String) and spec.dynamic_prompts and isinstance(inputs.get(name), str):
                inputs[name] = resolve_dynamic_prompt(inputs[name], self.rng)
        body: dict[str, Any] = {"class_type": node.type, "inputs": inputs}
        if isinstance(node.title, str):
            body["_meta"] = {"title": node.title}
        return body

    def _source(self, link_id: Any, wanted: str, seen: set) -> list | _Constant | object | None:
        """Where a link's value really comes from: `[node_id, slot]`, a PrimitiveNode's value, None (no value
        comes: a widget keeps its saved one) or _DROPPED (the source left the prompt, and the input with it:
        ComfyUI's frontend links it there, then deletes links into nodes it did not send)."""
        link = self.links.get(link_id)
        if link is None or link_id in seen or link.origin_id not in self.nodes:
            return None
        seen.add(link_id)
        origin = self.nodes[link.origin_id]
        if origin.type == "PrimitiveNode":
            values = origin.widgets_values
            return _Constant(values[0]) if isinstance(values, list) and values else None
        if origin.type == "Reroute":
            through = origin.inputs[0].get("link") if origin.inputs else None
            return self._source(through, wanted, seen) if through is not None else None
        if origin.type in UI_ONLY_TYPES:
            return None
        if origin.mode == BYPASSED:
            through = _bypass_input(origin, link.origin_slot, wanted)
            if through is None:
                return _DROPPED
            return self._source(through["link"], wanted, seen) if through.get("link") is not None else None
        if origin.mode == MUTED or origin.type not in self.registry:
            return _DROPPED
        return [origin.id, link.origin_slot]

    def _without_orphans(self, prompt: dict) -> dict:
        """Drop nodes that fed something in the editor but feed nothing that reaches the prompt, repeatedly."""
        fed_something = {link.origin_id for link in self.links.values() if link.target_id in self.nodes}
        while True:
            used = {value[0] for body in prompt.values() for value in body["inputs"].values()
                    if _is_link(value)}
            orphans = [node_id for node_id, body in prompt.items() if node_id in fed_something
                       and node_id not in used and not self.registry[body["class_type"]].output_node]
            if not orphans:
                return prompt
            for node_id in orphans:
                del prompt[node_id]


def _constant(value: Any) -> Any:
    # A list constant would read as a link in the API format; current frontends wrap it the same way.
    return {"__value__": value} if isinstance(value, list) else value


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _bypass_input(node: UINode, output_slot: int, wanted: str) -> Mapping[str, Any] | None:
    """The input a bypassed node passes through to its output `output_slot`, as ComfyUI's frontend picks it."""
    def type_of(ui_input: Mapping[str, Any]) -> str:
        return str(ui_input.get("type") or "*")

    same_index = [node.inputs[output_slot]] if 0 <= output_slot < len(node.inputs) else []
    candidates = [i for i in same_index if type_of(i) == wanted] + \
        [i for i in node.inputs if type_of(i) == wanted] + \
        [i for i in node.inputs if types_compatible(type_of(i), wanted)]
    return candidates[0] if candidates else None


def _widget_specs(node_type: NodeType) -> dict[str, InputSpec]:
    """The inputs that own a slot in `widgets_values`, in the editor's order: required, then optional."""
    widgets = [(name, spec) for name, spec in node_type.inputs.items()
               if spec.is_widget and not getattr(spec, "force_input", False)]
    return dict([w for w in widgets if not w[1].optional] + [w for w in widgets if w[1].optional])


def _widget_inputs(values: Any, widgets: Mapping[str, InputSpec]) -> dict[str, Any]:
    if isinstance(values, dict):
        return {name: _constant(values[name]) for name in widgets if name in values}
    if not isinstance(values, list):
        return {}
    inputs: dict[str, Any] = {}
    position = 0
    for name, spec in widgets.items():
        if position >= len(values):
            break
        inputs[name] = _constant(values[position])
        position += 1
        if getattr(spec, "control_after_generate", False) and position < len(values) \
                and _is_control_value(values[position]):
            position += 1
            if isinstance(spec, Combo) and position < len(values) and isinstance(values[position], str):
                position += 1  # the control's filter text
        if isinstance(spec, Combo) and spec.image_upload and position < len(values) \
                and values[position] == UPLOAD_VALUE:
            position += 1
    return inputs


def _is_control_value(value: Any) -> bool:
    # Booleans are the control slot of workflows from before the fixed/increment/randomize choice existed.
    return isinstance(value, bool) or value in CONTROL_VALUES


_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//.*")
_INNERMOST_CHOICE = re.compile(r"\{([^{}]*)\}")


def resolve_dynamic_prompt(text: str, rng: random.Random) -> str:
    """ComfyUI's dynamic prompt: comments stripped, then each `{a|b|c}` replaced by one of its options."""
    text = _COMMENTS.sub("", text)
    while True:
        resolved = _INNERMOST_CHOICE.sub(lambda match: rng.choice(match.group(1).split("|")), text)
        if resolved == text:
            return resolved
        text = resolved
