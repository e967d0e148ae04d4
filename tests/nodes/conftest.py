"""Shared fixtures for the SD node tests: a models/input/output/temp tree with tiny checkpoints in it.

  node_settings    RunSettings over a session-wide tmp tree (device cpu) whose models/checkpoints holds
                   tiny-sd1.safetensors (eps) and tiny-sd2-v.safetensors (v-prediction), seed 0
  sd1_handles      (MODEL, CLIP, VAE) from CheckpointLoaderSimple on tiny-sd1.safetensors
  sd2_handles      the same for tiny-sd2-v.safetensors
  fresh_settings   RunSettings over an empty tree of this test's own (for tests that add or damage files)
  make_context     make_context(settings, node_id="1", class_type="Test") -> ExecutionContext, to call a
                   node function directly
  tiny_names       .sd1 and .sd2_v: the checkpoint file names above
Treat the session tree and handles as read-only.
"""
from types import SimpleNamespace

import pytest

from diffusion.tiny_models import write_tiny_checkpoint
from engine import ExecutionContext, RunSettings

SD1_NAME = "tiny-sd1.safetensors"
SD2_V_NAME = "tiny-sd2-v.safetensors"


def _settings(base) -> RunSettings:
    folders = {name: base / name for name in ("models", "input", "output", "temp")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    return RunSettings(models_dir=folders["models"], input_dir=folders["input"], output_dir=folders["output"],
                       temp_dir=folders["temp"], device="cpu")


@pytest.fixture(scope="session")
def node_settings(tmp_path_factory) -> RunSettings:
    settings = _settings(tmp_path_factory.mktemp("node_tree"))
    checkpoints = settings.models_dir / "checkpoints"
    checkpoints.mkdir()
    write_tiny_checkpoint(checkpoints / SD1_NAME, "sd1")
    write_tiny_checkpoint(checkpoints / SD2_V_NAME, "sd2", v_prediction=True)
    return settings


@pytest.fixture
def fresh_settings(tmp_path) -> RunSettings:
    return _settings(tmp_path)


def node_context(settings: RunSettings, node_id: str = "1", class_type: str = "Test") -> ExecutionContext:
    """An ExecutionContext for calling a node function directly; progress reports go nowhere."""
    return ExecutionContext(node_id, "prompt", class_type, settings, lambda value, maximum, preview: None,
                            lambda: False)


@pytest.fixture(scope="session")
def make_context():
    """make_context(settings, node_id="1", class_type="Test") -> ExecutionContext for direct node calls."""
    return node_context


@pytest.fixture(scope="session")
def sd1_handles(node_settings):
    from nodes.loaders import CheckpointLoaderSimple

    return CheckpointLoaderSimple(SD1_NAME, context=node_context(node_settings))


@pytest.fixture(scope="session")
def sd2_handles(node_settings):
    from nodes.loaders import CheckpointLoaderSimple

    return CheckpointLoaderSimple(SD2_V_NAME, context=node_context(node_settings))


@pytest.fixture(scope="session")
def tiny_names():
    return SimpleNamespace(sd1=SD1_NAME, sd2_v=SD2_V_NAME)
