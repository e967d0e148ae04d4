"""Noise with ComfyUI's seeding convention, drawn on the CPU so every device gets the same numbers.

Initial noise (model-formats.md 8.4): one float32 standard-normal draw of the latent's full shape from a
CPU generator seeded with the node's seed, so batch item 0 is the same at any batch size.
Per-step noise (our policy, 8.5): ComfyUI draws it on the sampling device, which makes CUDA runs differ
from CPU runs. We draw it from a second CPU generator seeded with the same seed and move it to the
device, so a seed gives the same image on CPU and GPU; on CPU this is exactly ComfyUI's noise (the first
step's noise equals the initial noise).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Seeds arrive from the KSampler widget as 0 .. 2**64 - 1, which torch.Generator accepts unchanged.
MAX_SEED = 2**64 - 1


def cpu_generator(seed: int) -> torch.Generator:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in 0 .. 2**64 - 1, got {seed}")
    return torch.Generator(device="cpu").manual_seed(seed)


def initial_noise(shape: Sequence[int], seed: int, batch_index: Sequence[int] | None = None) -> Tensor:
    """The starting noise for a latent of `shape` (float32, CPU).

    With `batch_index` (a LATENT's list of original batch positions) the noise for position k is the
    k-th `[1, C, H, W]` draw, so a latent split out of a batch gets the noise it had inside it.
    """
    generator = cpu_generator(seed)
    if batch_index is None:
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    if len(batch_index) != shape[0]:
        raise ValueError(f"batch_index has {len(batch_index)} entries for a batch of {shape[0]}")
    item_shape = (1, *shape[1:])
    draws = [torch.randn(item_shape, generator=generator, dtype=torch.float32) for _ in range(max(batch_index) + 1)]
    return torch.cat([draws[k] for k in batch_index], dim=0)


def to_device(noise: Tensor, like: Tensor) -> Tensor:
    """Move CPU noise to `like`'s device and dtype without stalling the host on CUDA."""
    if like.device.type == "cuda":
        return noise.pin_memory().to(like.device, like.dtype, non_blocking=True)
    return noise.to(like.device, like.dtype)


class GaussianNoiseSampler:
    """Fresh standard-normal noise per call, drawn on a CPU generator (the policy in the module docstring)."""

    def __init__(self, like: Tensor, seed: int) -> None:
        self.like = like
        self.generator = cpu_generator(seed)

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        noise = torch.randn(tuple(self.like.shape), generator=self.generator, dtype=torch.float32)
        return to_device(noise, self.like)


class DeviceNoiseSampler:
    """Per-step noise from a generator on the sampling device itself (ComfyUI's own behaviour)."""

    def __init__(self, like: Tensor, seed: int) -> None:
        self.like = like
        self.generator = torch.Generator(device=like.device).manual_seed(seed)

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        return torch.randn(tuple(self.like.shape), generator=self.generator, device=self.like.device).to(self.like.dtype)
