"""ComfyUI's API prompt format (the on-disk and wire format) parsed into a small graph model.

`{"id": {"class_type": str, "inputs": {name: value}, "_meta": {"title": str}}}`: a value that is a list is
a link `[node_id, output_index]`; `{"__value__": [...]}` is a constant list. The structure is checked with
jsonschema here; links and constants are judged against node schemas in `engine.validate`. Unknown extra
keys, in the prompt or in a node, are ignored as ComfyUI ignores them.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import jsonschema

from engine.schema import Registry
from engine.ui_workflow import UIWorkflowError, is_ui_workflow, ui_to_api

PROMPT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": {
        "type": "object",
        "required": ["class_type"],
        "properties": {
            "class_type": {"type": "string", "minLength": 1},
            "inputs": {"type": "object"},
            "_meta": {"type": "object", "properties": {"title": {"type": "string"}}},
        },
    },
}


class PromptFormatError(ValueError):
    """The prompt is not an API-format prompt; `problems` lists every structural fault found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Link:
    node_id: str
    output_index: int

    def to_api(self) -> list:
        return [self.node_id, self.output_index]


@dataclass(frozen=True)
class BadLink:
    """A list value that is not a well-formed `[node_id, output_index]`; kept so validation can name it."""

    value: Any


@dataclass(frozen=True)
class PromptNode:
    id: str
    class_type: str
    inputs: Mapping[str, Any]
    title: str | None = None

    def links(self) -> Iterator[tuple[str, Link]]:
        for name, value in self.inputs.items():
            if isinstance(value, Link):
                yield name, value

    def constants(self) -> dict[str, Any]:
        return {name: value for name, value in self.inputs.items() if not isinstance(value, (Link, BadLink))}


@dataclass(frozen=True)
class Workflow:
    nodes: Mapping[str, PromptNode]

    def __getitem__(self, node_id: str) -> PromptNode:
        return self.nodes[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def to_api(self) -> dict[str, Any]:
        """Back to API JSON (constant lists wrapped in `__value__`, as current frontends write them)."""
        return {node.id: _node_to_api(node) for node in self.nodes.values()}


def _node_to_api(node: PromptNode) -> dict[str, Any]:
    inputs = {}
    for name, value in node.inputs.items():
        if isinstance(value, Link):
            inputs[name] = value.to_api()
        elif isinstance(value, BadLink):
            inputs[name] = value.value
        else:
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
    body: dict[str, Any] = {"class_type": node.class_type, "inputs": inputs}
    if node.title is not None:
        body["_meta"] = {"title": node.title}
    return body


def parse_prompt(prompt: Any) -> Workflow:
    """Parse API-format JSON (already decoded); raises PromptFormatError listing every structural fault."""
    problems = [_describe(error) for error in jsonschema.Draft202012Validator(PROMPT_SCHEMA).iter_errors(prompt)]
    if problems:
        raise PromptFormatError(sorted(problems))
    nodes = {}
    for node_id, body in prompt.items():
        inputs = {name: parse_input_value(value) for name, value in body.get("inputs", {}).items()}
        title = body.get("_meta", {}).get("title")
        nodes[node_id] = PromptNode(id=node_id, class_type=body["class_type"], inputs=inputs, title=title)
    return Workflow(nodes)


def parse_input_value(value: Any) -> Any:
    """A link, a BadLink, or a constant (with a `__value__` wrapper removed)."""
    if isinstance(value, dict) and set(value) == {"__value__"}:
        return value["__value__"]
    if not isinstance(value, list):
        return value
    if len(value) == 2 and isinstance(value[0], (str, int)) and not isinstance(value[0], bool) \
            and isinstance(value[1], int) and not isinstance(value[1], bool) and value[1] >= 0:
        # Some scripts write node ids as numbers ([4, 0]); ids are strings everywhere else.
        return Link(str(value[0]), value[1])
    return BadLink(value)


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(part) for part in error.absolute_path) or "prompt"
    if error.validator == "required":
        return f"node {where!r}: missing 'class_type'"
    if where == "prompt":
        return f"the prompt must be a JSON object of nodes, got {type(error.instance).__name__}"
    return f"{where}: {error.message}"


def load_prompt_file(path: str | Path) -> dict[str, Any]:
    """Read an API prompt from a JSON file, a `POST /prompt` body or a PNG saved by SaveImage (its `prompt`
    text chunk). UI-format workflows (what the editor saves) are refused by name: converting them needs the
    node schemas, which `read_workflow_file` takes."""
    document, from_png = _read_document(path, f"{path}")
    if from_png and document.prompt is None:
        raise PromptFormatError([f"{path}: this PNG carries no 'prompt' metadata to run"])
    if is_ui_workflow(document.prompt):
        raise PromptFormatError([f"{path}: this is a UI-format workflow (the editor's 'Save'); "
                                 "export it with 'Save (API)' to run it"])
    return document.prompt


@dataclass(frozen=True)
class WorkflowDocument:
    """What a workflow file holds: the API prompt to run and, when known, the editor's UI workflow, which
    belongs in `extra_data.extra_pnginfo.workflow` so the images saved from it carry it on."""

    prompt: Any
    ui_workflow: dict[str, Any] | None = None


def read_workflow_file(source: str | Path | bytes, registry: Registry) -> dict[str, Any]:
    """The API prompt in an API JSON file, a `POST /prompt` body, a UI-format JSON (converted with the node
    schemas of `registry`) or a PNG (its `prompt` chunk, else its `workflow` chunk converted)."""
    return load_workflow_document(source, registry).prompt


def load_workflow_document(source: str | Path | bytes, registry: Registry) -> WorkflowDocument:
    """As `read_workflow_file`, keeping the UI workflow that came with the prompt (see WorkflowDocument)."""
    name = "workflow data" if isinstance(source, bytes) else str(source)
    document, from_png = _read_document(source, name)
    if is_ui_workflow(document.prompt):
        return _converted(document.prompt, registry, name)
    if from_png and document.prompt is None:
        if document.ui_workflow is None:
            raise PromptFormatError([f"{name}: this PNG carries neither 'prompt' nor 'workflow' metadata"])
        return _converted(document.ui_workflow, registry, name)
    return document


def _converted(ui_workflow: dict[str, Any], registry: Registry, name: str) -> WorkflowDocument:
    try:
        return WorkflowDocument(ui_to_api(ui_workflow, registry), ui_workflow)
    except UIWorkflowError as problem:
        raise PromptFormatError([f"{name}: {p}" for p in problem.problems]) from problem


def _read_document(source: str | Path | bytes, name: str) -> tuple[WorkflowDocument, bool]:
    """The document, and whether it came from a PNG."""
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
        from_png = raw.startswith(PNG_SIGNATURE)
        # utf-8-sig: Windows editors start UTF-8 files with a byte order mark, which json.loads refuses.
        texts = png_text_chunks(raw) if from_png else {"prompt": raw.decode("utf-8-sig")}
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PromptFormatError([f"{name}: cannot read: {error}"]) from error
    prompt = _json(texts["prompt"], f"{name}: its 'prompt' chunk" if from_png else name) \
        if "prompt" in texts else None
    try:
        ui_workflow = _json(texts["workflow"], f"{name}: its 'workflow' chunk") if "workflow" in texts else None
    except PromptFormatError:
        if prompt is None:
            raise
        ui_workflow = None  # a damaged copy of the editor's graph must not stop a good prompt from running
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), dict) and "class_type" not in prompt["prompt"]:
        # the body of a POST /prompt request (not a node with id "prompt"), maybe with the UI workflow
        extra_data = prompt.get("extra_data")
        pnginfo = extra_data.get("extra_pnginfo") if isinstance(extra_data, dict) else None
        ui_workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
        prompt = prompt["prompt"]
    return WorkflowDocument(prompt, ui_workflow if is_ui_workflow(ui_workflow) else None), from_png


def _json(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFormatError([f"{name}: not valid JSON: {error}"]) from error


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Bounds what one compressed text chunk may inflate to (a small chunk can hold gigabytes); prompts and UI
#: workflows are far smaller. Pillow bounds its text chunks for the same reason.
MAX_TEXT_CHUNK_BYTES = 64 * 1024 * 1024


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG (tEXt, zTXt, iTXt), read without an imaging library.

    tEXt is Latin-1 by the PNG spec, but ComfyUI-era writers put UTF-8 JSON there, so UTF-8 is tried first.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    texts: dict[str, str] = {}
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length = struct.unpack(">I", data[position:position + 4])[0]
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        position += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            try:
                key, value = _text_chunk(kind, body)
            except (IndexError, zlib.error) as error:
                raise ValueError(f"corrupt {kind.decode()} chunk: {error}") from error
            texts.setdefault(key, value)
    return texts


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str]:
    key, _, rest = body.partition(b"\x00")
    if kind == b"zTXt":
        rest = _inflate(kind, key, rest[1:])  # one byte of compression method, then zlib data
    elif kind == b"iTXt":
        compressed, rest = rest[0], rest[2:]  # compression flag and method
        _language, _, rest = rest.partition(b"\x00")
        _translated, _, rest = rest.partition(b"\x00")
        rest = _inflate(kind, key, rest) if compressed else rest
    try:
        value = rest.decode("utf-8")
    except UnicodeDecodeError:
        value = rest.decode("latin-1")
    return key.decode("latin-1"), value


def _inflate(kind: bytes, key: bytes, data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    inflated = inflater.decompress(data, MAX_TEXT_CHUNK_BYTES)
    if inflater.unconsumed_tail and inflater.decompress(inflater.unconsumed_tail, 1):
        raise ValueError(f"{kind.decode()} chunk {key.decode('latin-1')!r} inflates to more than "
                         f"{MAX_TEXT_CHUNK_BYTES} bytes")
    return inflated
