"""What the editor's end-to-end tests do to the page, named as a user would say it (a uniquely named
module, since tests may not import from conftest)."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

try:
    from playwright.sync_api import expect
except ImportError:  # conftest's chromium_path fixture skips or fails, naming what to install
    expect = None

ARTIFACTS = Path(__file__).with_name("artifacts")

DROP_FILE = """async ({b64, name, type}) => {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name, { type }));
    const target = document.querySelector('.react-flow');
    for (const kind of ['dragenter', 'dragover', 'drop'])
        target.dispatchEvent(new DragEvent(kind, { bubbles: true, cancelable: true, dataTransfer: dt }));
}"""


def screenshot(page: Any, name: str) -> None:
    """A picture of a key state, kept under tests/web/artifacts for a person to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def node(node_id: str) -> str:
    return f'.react-flow__node[data-id="{node_id}"]'


def handle(node_id: str, handle_id: str) -> str:
    return f'{node(node_id)} .react-flow__handle[data-handleid="{handle_id}"]'


def graph_nodes(page: Any) -> list[dict]:
    return page.evaluate("window.sdgraph.nodes()")


def api_prompt(page: Any) -> dict:
    return page.evaluate("window.sdgraph.apiPrompt()")


def add_node(page: Any, query: str, at: tuple[int, int]) -> str:
    """Double-click the canvas at `at`, search the palette, press Enter; the new node's id."""
    before = {n["id"] for n in graph_nodes(page)}
    page.locator(".react-flow__pane").dblclick(position={"x": at[0], "y": at[1]})
    page.get_by_test_id("palette").fill(query)
    page.keyboard.press("Enter")
    page.wait_for_function("n => window.sdgraph.nodes().length === n", arg=len(before) + 1)
    (added,) = {n["id"] for n in graph_nodes(page)} - before
    return added


def connect(page: Any, source: str, output: int, target: str, input_name: str) -> None:
    page.locator(handle(source, f"out:{output}")).drag_to(page.locator(handle(target, f"in:{input_name}")))


def drop_file(page: Any, data: bytes, name: str, mime: str) -> None:
    page.evaluate(DROP_FILE, {"b64": base64.b64encode(data).decode(), "name": name, "type": mime})


def drop_json(page: Any, value: Any, name: str = "workflow.json") -> None:
    """Drop a workflow JSON on the canvas and, for a UI-format one, wait until its nodes are on it: the
    browser reads a dropped file asynchronously, so a test reading the graph at once may see the old one."""
    drop_file(page, json.dumps(value).encode(), name, "application/json")
    if isinstance(value, dict) and isinstance(value.get("nodes"), list):
        ids = sorted(str(entry["id"]) for entry in value["nodes"])
        page.wait_for_function("ids => ids.every(id => window.sdgraph.nodes().some(n => String(n.id) === id))",
                               arg=ids)


def ui_workflow(nodes: list[dict], links: list[list]) -> dict:
    """A schema-0.4 UI workflow; each node needs id, type and widgets_values, inputs/outputs when linked."""
    for index, entry in enumerate(nodes):
        entry.setdefault("pos", [100 + 300 * index, 120])
        entry.setdefault("size", [240, 120])
        entry.setdefault("mode", 0)
        entry.setdefault("inputs", [])
        entry.setdefault("outputs", [])
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max([link[0] for link in links], default=0),
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def into_output(source_id: int, source_type: str, widgets_values: list, output_id: int, **output_keys: Any) -> dict:
    """A workflow of one INT-producing toy node feeding the toy Output node."""
    return ui_workflow(
        [{"id": source_id, "type": source_type, "widgets_values": widgets_values,
          "outputs": [{"name": "value", "type": "INT", "links": [1]}]},
         {"id": output_id, "type": "Output", "inputs": [{"name": "value", "type": "*", "link": 1}], **output_keys}],
        [[1, source_id, 0, output_id, 0, "INT"]])
