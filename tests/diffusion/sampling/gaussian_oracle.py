"""Test oracles for sampling: the analytic Gaussian denoiser (model-formats.md 10.5) and a stand-in network."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.sampling.model_sampling import DiscreteModelSampling, ModelSampling

SD_SIGMA_MIN = 0.0291675
SD_SIGMA_MAX = 14.614642


@dataclass(frozen=True)
class GaussianData:
    """Data x0 ~ N(mu, s^2) element-wise: the exact denoiser and probability-flow ODE solution are closed-form."""

    mu: float = 0.5
    s: float = 0.3

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        s2 = self.s**2
        return (x * s2 + self.mu * sigma**2) / (s2 + sigma**2)

    __call__ = denoise

    def ode_solution(self, x_start: Tensor, sigma_start: float, sigma: float) -> Tensor:
        s2 = self.s**2
        return self.mu + (x_start - self.mu) * math.sqrt(s2 + sigma**2) / math.sqrt(s2 + sigma_start**2)

    def eps(self, x: Tensor, sigma: float) -> Tensor:
        return (x - self.denoise(x, sigma)) / sigma

    def v(self, x: Tensor, sigma: float) -> Tensor:
        """The v-prediction target for VE x (inverts DiscreteModelSampling's v formula)."""
        scale = sigma * sigma + 1.0
        return (x / scale - self.denoise(x, sigma)) * math.sqrt(scale) / sigma


@dataclass(frozen=True)
class FlowGaussianData:
    """The same data under rectified flow, x = (1 - sigma) x0 + sigma noise (model-formats.md 10.5)."""

    mu: float = 0.5
    s: float = 0.3

    def _variance(self, sigma: float) -> float:
        return (1 - sigma) ** 2 * self.s**2 + sigma**2

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        return self.mu + (x - (1 - sigma) * self.mu) * ((1 - sigma) * self.s**2 / self._variance(sigma))

    __call__ = denoise

    def ode_solution(self, x_start: Tensor, sigma_start: float, sigma: float) -> Tensor:
        ratio = math.sqrt(self._variance(sigma) / self._variance(sigma_start))
        return (1 - sigma) * self.mu + (x_start - (1 - sigma_start) * self.mu) * ratio

    def velocity(self, x: Tensor, sigma: float) -> Tensor:
        return (x - self.denoise(x, sigma)) / sigma


def karras64(n: int, sigma_min: float = SD_SIGMA_MIN, sigma_max: float = SD_SIGMA_MAX, rho: float = 7.0) -> Tensor:
    """Karras sigmas in float64 without the final 0 (order tests keep round-off out of the slope)."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class GaussianEpsNetwork:
    """A stand-in UNet: predicts the exact eps of GaussianData for the sigma its timestep names.

    Records each call's input and context shapes, inputs and `y` so tests can see how conditions were batched. Its
    prediction ignores the context except through `context_gain`: mean(context) * gain shifts eps, so
    cond and uncond differ in a known way.
    """

    def __init__(self, data: GaussianData, ms: ModelSampling, context_gain: float = 0.0) -> None:
        self.data, self.ms, self.context_gain = data, ms, context_gain
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.inputs: list[Tensor] = []
        self.ys: list[Tensor | None] = []

    def __call__(self, x_in: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls.append((tuple(x_in.shape), tuple(context.shape)))
        self.inputs.append(x_in)
        self.ys.append(y)
        sigma = self.ms.sigma(float(timestep[0]))
        x = x_in / self.ms.c_in(sigma)
        eps = self.data.eps(x, sigma)
        shift = context.mean(dim=(1, 2)).view(-1, *([1] * (x.dim() - 1))) * self.context_gain
        return eps + shift.to(eps.dtype)


