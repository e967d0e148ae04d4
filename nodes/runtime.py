"""The process-wide compute device, its dtype and the one model manager every SD node shares.

Nodes run in one process and share one device: a checkpoint loaded by one prompt and a VAE used by the next
must be tracked by the same ModelManager, or each would think the device is empty and over-fill it. The
choice comes from `RunSettings.device` ("auto": CUDA when torch sees a GPU, else the CPU).
"""
from __future__ import annotations

import threading

import torch

from diffusion.memory import ModelManager
from engine.context import RunSettings

# On the CPU nothing is ever moved (the offload device is the compute device), so the budget is unbounded.
_UNBOUNDED_BYTES = 1 << 62

_managers: dict[torch.device, ModelManager] = {}
_managers_lock = threading.Lock()


def compute_device(settings: RunSettings) -> torch.device:
    """The device models run on: settings.device, with "auto" meaning cuda when available, else cpu."""
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU (use --device auto or cpu)")
    return torch.device(settings.device)


def compute_dtype(settings: RunSettings) -> torch.dtype:
    """fp16 on CUDA (the weights' usual storage, half the memory), fp32 on the CPU (fp16 there is slow)."""
    return torch.float16 if compute_device(settings).type == "cuda" else torch.float32


def model_manager(settings: RunSettings) -> ModelManager:
    """The one ModelManager for the compute device of `settings`, created on first use."""
    device = compute_device(settings)
    with _managers_lock:
        manager = _managers.get(device)
        if manager is None:
            budget = _UNBOUNDED_BYTES if device.type == "cpu" else None
            manager = ModelManager(device, budget_bytes=budget)
            _managers[device] = manager
        return manager


def free_models(unload: bool = True) -> None:
    """The server's POST /free: offload every unpinned model from every device and release cached memory."""
    with _managers_lock:
        managers = list(_managers.values())
    for manager in managers:
        manager.free(unload=unload)


__all__ = ["compute_device", "compute_dtype", "free_models", "model_manager"]
