"""A Brownian tree: Brownian motion W(t) over an interval that can be queried at any t, in any order.

The SDE samplers need noise that belongs to a sigma interval rather than to a step index: the increment
W(b) - W(a) must be the same however the interval is later subdivided, so runs with different step counts
see the same underlying path (Kidger et al. 2021; torchsde's BrownianTree plays this role in
k-diffusion). Values come from recursive bisection with Brownian-bridge midpoints: for a node [a, b] with
known W(a), W(b), W((a+b)/2) = (W(a) + W(b))/2 + sqrt((b - a)/4) * z, with z drawn from a generator whose
seed is a hash of the node's position in the tree. A query descends until the node is narrower than
`tolerance * (t1 - t0)` and finishes with an exact bridge sample at t. Draws happen on the CPU unless a
device is given (the `_gpu` sampler variants, which like ComfyUI's then give device-dependent noise).
One tree covers the whole batch: since CPU randn fills 16-value blocks in order, batch item k's noise is
the same for any batch larger than k (given C*H*W a multiple of 16), but not for an item sampled alone.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

from .noise import MAX_SEED, splitmix64, to_device


class BrownianTree:
    """W(t) for t in [t0, t1] with W(t0) = 0, deterministic in (seed, t0, t1, shape)."""

    def __init__(
        self,
        t0: float,
        t1: float,
        shape: Sequence[int],
        seed: int,
        tolerance: float = 1e-6,
        cache_size: int = 64,
        device: torch.device | str = "cpu",
    ) -> None:
        if not t1 > t0:
            raise ValueError(f"Brownian tree needs t0 < t1, got [{t0}, {t1}]")
        self.t0, self.t1 = float(t0), float(t1)
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.min_width = tolerance * (self.t1 - self.t0)
        self.root_key = splitmix64(seed & MAX_SEED)
        self.w1 = self._normal(splitmix64(self.root_key ^ 0x5DEECE66D)) * math.sqrt(self.t1 - self.t0)
        self._cache: OrderedDict[int, Tensor] = OrderedDict()
        self.cache_size = cache_size

    def _normal(self, key: int) -> Tensor:
        generator = torch.Generator(device=self.device).manual_seed(key)
        return torch.randn(self.shape, generator=generator, dtype=torch.float64, device=self.device)

    def _midpoint(self, key: int, width: float, w_a: Tensor, w_b: Tensor) -> Tensor:
        cached = self._cache.get(key)
        if cached is None:
            cached = (w_a + w_b) * 0.5 + self._normal(key) * math.sqrt(width / 4.0)
            self._cache[key] = cached
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return cached

    def __call__(self, t: float) -> Tensor:
        """W(t) as a float64 tensor on the tree's device."""
        t = min(max(float(t), self.t0), self.t1)
        a, b = self.t0, self.t1
        w_a, w_b = torch.zeros(self.shape, dtype=torch.float64, device=self.device), self.w1
        key = self.root_key
        while True:
            if t == a:
                return w_a
            if t == b:
                return w_b
            width = b - a
            if width <= self.min_width:
                # Exact bridge sample inside the leaf: mean on the chord, variance (t-a)(b-t)/(b-a).
                frac = (t - a) / width
                std = math.sqrt((t - a) * (b - t) / width)
                leaf = splitmix64(key ^ 0xA5A5A5A5A5A5A5A5)
                return w_a + (w_b - w_a) * frac + self._normal(leaf) * std
            mid = 0.5 * (a + b)
            w_mid = self._midpoint(key, width, w_a, w_b)
            if t < mid:
                b, w_b, key = mid, w_mid, splitmix64((key * 2 + 1) & MAX_SEED)
            else:
                a, w_a, key = mid, w_mid, splitmix64((key * 2 + 2) & MAX_SEED)


class BrownianTreeNoiseSampler:
    """Unit-variance SDE noise (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) over the sigma range."""

    def __init__(self, like: Tensor, sigma_min: float, sigma_max: float, seed: int, on_device: bool = False) -> None:
        self.like = like
        self._tree_args = (sigma_min, sigma_max, like.shape, seed)
        self._device = like.device if on_device else torch.device("cpu")
        self._tree: BrownianTree | None = None

    @property
    def tree(self) -> BrownianTree:
        # Built on first use: a one-step schedule [sigma, 0] has no interval to span and never asks for noise.
        if self._tree is None:
            self._tree = BrownianTree(*self._tree_args, device=self._device)
        return self._tree

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        low, high = min(sigma, sigma_next), max(sigma, sigma_next)
        increment = (self.tree(high) - self.tree(low)) / math.sqrt(high - low)
        if increment.device.type == "cpu":
            return to_device(increment.float(), self.like)
        return increment.to(self.like.dtype)
