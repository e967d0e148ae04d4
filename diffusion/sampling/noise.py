"""Noise with ComfyUI's seeding convention, drawn on the CPU so every device gets the same numbers.

Initial noise (model-formats.md 8.4): one float32 standard-normal draw of the latent's full shape from a
CPU generator seeded with the node's seed, so batch item 0 is the same at any batch size.
Per-step noise (our policy, 8.5): ComfyUI draws it on the sampling device from one generator for the whole
batch, so CUDA runs differ from CPU runs and an image depends on its batch size. We draw it on the CPU
(then move it), one generator per batch position: position 0 is seeded with the seed itself, position
k > 0 with a SplitMix64 hash of (seed, k). So a seed gives the same image on CPU and GPU, batch item k
is the same at any batch size (or alone, via LATENT `batch_index`), and a batch-1 CPU run equals
ComfyUI's exactly (its first step's noise is the initial noise).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Seeds arrive from the KSampler widget as 0 .. 2**64 - 1, which torch.Generator accepts unchanged.
MAX_SEED = 2**64 - 1


def splitmix64(value: int) -> int:
    """Steele et al.'s SplitMix64 finaliser: a cheap, well-mixed 64-bit hash for derived seeds."""
    value = (value + 0x9E3779B97F4A7C15) & MAX_SEED
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MAX_SEED
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MAX_SEED
    return value ^ (value >> 31)


def item_seed(seed: int, position: int) -> int:
    """The per-step noise seed of batch position `position` (the module docstring's policy)."""
    return seed if position == 0 else splitmix64((seed + position * 0x9E3779B97F4A7C15) & MAX_SEED)


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
    """Fresh standard-normal noise per call from per-position CPU generators (the module docstring's policy).

    `like` is [B, ...]; `batch_index` gives each item's original batch position (default 0 .. B-1).
    """

    def __init__(self, like: Tensor, seed: int, batch_index: Sequence[int] | None = None) -> None:
        if like.dim() == 0:
            raise ValueError("per-step noise needs a batched latent, got a 0-d tensor")
        positions = list(batch_index) if batch_index is not None else list(range(like.shape[0]))
        if len(positions) != like.shape[0]:
            raise ValueError(f"batch_index has {len(positions)} entries for a batch of {like.shape[0]}")
        cpu_generator(seed)  # validates the seed range
        self.like = like
        self.generators = [torch.Generator(device="cpu").manual_seed(item_seed(seed, p)) for p in positions]
        self.item_shape = tuple(like.shape[1:])

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        items = [torch.randn(self.item_shape, generator=g, dtype=torch.float32) for g in self.generators]
        return to_device(torch.stack(items), self.like)
