"""The process-wide device, dtype and model manager the SD nodes share."""
import pytest
import torch
from torch import nn

from engine import RunSettings
from nodes import runtime


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.compute_device(RunSettings(device="auto")) == torch.device("cpu")
    assert runtime.compute_dtype(RunSettings(device="auto")) == torch.float32


def test_auto_is_cuda_in_fp16_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.compute_device(RunSettings(device="auto")) == torch.device("cuda")
    assert runtime.compute_dtype(RunSettings(device="auto")) == torch.float16


def test_asking_for_cuda_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device 'cuda' was asked for but torch sees no CUDA GPU"):
        runtime.compute_device(RunSettings(device="cuda"))


def test_every_run_on_a_device_shares_one_manager(tmp_path):
    first = runtime.model_manager(RunSettings(device="cpu"))
    other_folders = runtime.model_manager(RunSettings(device="cpu", models_dir=tmp_path))
    assert first is other_folders and first.device == torch.device("cpu")


def test_free_models_unloads_what_the_manager_holds():
    manager = runtime.model_manager(RunSettings(device="cpu"))
    model = nn.Linear(4, 4)
    with manager.use(model):
        assert manager.is_resident(model)
    runtime.free_models()
    assert not manager.is_resident(model)
