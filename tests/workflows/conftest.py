"""Fixtures for running the example workflows in workflows/ end to end.

  workflow_registry   the real node registry (cli.load_registry([]))
  workflow_settings   RunSettings over a session tree holding the files the workflows name beyond the built-in
                      demo checkpoint (workflow_files.write_workflow_files), device cpu, no live previews
  load_workflow       load_workflow(name) -> the API prompt of workflows/NAME.json, at CI size
"""
import pytest

from cli import load_registry
from engine import RunSettings
from workflow_files import read_ci_workflow, write_workflow_files


@pytest.fixture(scope="session")
def workflow_registry():
    return load_registry([])


@pytest.fixture(scope="session")
def workflow_settings(tmp_path_factory) -> RunSettings:
    base = tmp_path_factory.mktemp("workflows")
    write_workflow_files(base / "models", base / "input")
    return RunSettings(models_dir=base / "models", input_dir=base / "input", output_dir=base / "output",
                       temp_dir=base / "temp", device="cpu", preview="none")


@pytest.fixture(scope="session")
def load_workflow(workflow_registry):
    return lambda name: read_ci_workflow(name, workflow_registry)
