"""The editor's unit tests convert ComfyUI's workflows with a hand-written copy of the core node schemas
(web/src/fixtures/core_object_info.json). Where our registry has the same class, its widgets must be laid
out the same way (names, order, kinds, control and upload entries), or `widgets_values` would map
differently in the tests than against the real server."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cli import load_registry
from engine import RunSettings

FIXTURE = Path(__file__).parents[2] / "web" / "src" / "fixtures" / "core_object_info.json"
PRIMITIVES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def widget_layout(info: dict[str, Any]) -> list[tuple[str, str, bool, bool]]:
    """(name, kind, has a control entry, has an upload entry) per widget, in widgets_values order."""
    layout = []
    for group in ("required", "optional"):
        specs = info["input"].get(group, {})
        order = info.get("input_order", {}).get(group, list(specs))
        for name in order:
            kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            if options.get("forceInput"):
                continue
            if isinstance(kind, list) or kind == "COMBO":
                kind = "COMBO"
            elif kind not in PRIMITIVES:
                continue
            layout.append((name, kind, bool(options.get("control_after_generate")), bool(options.get("image_upload"))))
    return layout


@pytest.fixture(scope="module")
def registry_info(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("schemas")
    settings = RunSettings(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                           temp_dir=root / "temp", device="cpu")
    return load_registry([]).object_info(settings)


CORE = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("class_name", sorted(CORE))
def test_the_core_fixture_lays_out_widgets_as_our_registry_does(class_name: str, registry_info: dict[str, Any]) -> None:
    assert class_name in registry_info, f"{class_name}, a ComfyUI core node, is missing from our registry"
    assert widget_layout(CORE[class_name]) == widget_layout(registry_info[class_name])
    assert CORE[class_name]["output"] == registry_info[class_name]["output"]
