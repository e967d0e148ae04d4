"""Fixtures for running ComfyUI's shared example workflows (../shared/data/comfyui-examples, data only).

  example_registry   the real node registry (cli.load_registry([]))
  example_settings   RunSettings over a session tree whose models/ and input/ hold a tiny stand-in for every
                     file the examples name (example_stand_ins.py), device cpu, no live previews
  example_source     example_source(name, form) -> the path of an example as "png", "ui" or "api"
"""
from pathlib import Path

import pytest

from cli import load_registry
from engine import RunSettings
from example_stand_ins import write_example_files

EXAMPLES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "comfyui-examples"
_SUFFIXES = {"png": ".png", "ui": ".workflow.json", "api": ".prompt.json"}


@pytest.fixture(scope="session")
def example_registry():
    return load_registry([])


@pytest.fixture(scope="session")
def example_settings(tmp_path_factory) -> RunSettings:
    base = tmp_path_factory.mktemp("comfyui_examples")
    folders = {f"{name}_dir": base / name for name in ("models", "input", "output", "temp")}
    write_example_files(folders["models_dir"], folders["input_dir"])
    return RunSettings(**folders, device="cpu", preview="none")


@pytest.fixture(scope="session")
def example_source():
    def source(name: str, form: str) -> Path:
        path = EXAMPLES / f"{name}{_SUFFIXES[form]}"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the shared ComfyUI examples are expected beside the project")
        return path
    return source
