"""COMBO options computed from the run's folders: what a loader node lists is the configured models folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import cli
from engine import Executor, Registry, ResultCache, RunSettings, validate_prompt
from toy_nodes import build_prompt

TOY_NODES = str(Path(__file__).with_name("toy_nodes.py"))


def toy_models(root: Path, *names: str) -> RunSettings:
    for name in names:
        path = root / "models" / "toys" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("toy")
    return RunSettings(models_dir=root / "models", output_dir=root / "output")


def pick(name: str) -> dict:
    return build_prompt(("1", "PickToyFile", {"name": name}), ("2", "Output", {"value": ["1", 0]}))


def test_object_info_lists_the_files_of_the_configured_models_folder(registry: Registry, tmp_path: Path) -> None:
    settings = toy_models(tmp_path, "b.toy", "sub/a.toy", "ignored.txt")
    options = registry.object_info(settings)["PickToyFile"]["input"]["required"]["name"][0]
    assert options == ["b.toy", "sub/a.toy"]
    assert registry["PickToyFile"].object_info(toy_models(tmp_path / "empty"))["input"]["required"]["name"][0] == []


def test_validation_checks_a_file_name_against_the_configured_folder(registry: Registry, tmp_path: Path) -> None:
    settings = toy_models(tmp_path, "b.toy")
    assert validate_prompt(pick("b.toy"), registry, settings=settings).ok
    other = validate_prompt(pick("b.toy"), registry, settings=toy_models(tmp_path / "other", "c.toy"))
    [error] = other.node_errors["1"].errors
    assert (error.type, error.extra_info["input_name"]) == ("value_not_in_list", "name")
    assert error.extra_info["input_config"][0] == ["c.toy"]


def test_the_executor_validates_with_its_own_settings(registry: Registry, tmp_path: Path) -> None:
    executor = Executor(registry, cache=ResultCache(), settings=toy_models(tmp_path, "b.toy"))
    result = executor.execute(pick("b.toy"))
    assert result.ok and result.outputs == {"2": {"value": ["b.toy"]}}
    assert executor.execute(pick("missing.toy")).status == "invalid"


def test_cli_validate_and_nodes_take_the_models_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toy_models(tmp_path, "b.toy")
    workflow = tmp_path / "pick.json"
    workflow.write_text(json.dumps(pick("b.toy")))
    base = ["--no-default-nodes", "--nodes", TOY_NODES]
    assert cli.main(["validate", str(workflow), *base, "--models-dir", str(tmp_path / "models")]) == 0
    assert capsys.readouterr().out.strip() == "ok"
    assert cli.main(["validate", str(workflow), *base, "--models-dir", str(tmp_path / "nowhere")]) == 1
    assert "value_not_in_list" in capsys.readouterr().out
    assert cli.main(["nodes", "PickToyFile", "--json", *base, "--models-dir", str(tmp_path / "models")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["PickToyFile"]["input"]["required"]["name"][0] == ["b.toy"]
