"""What every sampler sees: a denoiser D(x, sigma), a noise source and a progress callback.

Samplers follow k-diffusion (Crowson): pure functions `(denoiser, x, sigmas, ...) -> x` in the
variance-exploding variables `x = x0 + sigma * noise`. Sigmas are read once into Python floats, so the
step coefficients are double-precision scalars and branching on them never waits on a device.
"""
from __future__ import annotations

import math
from typing import Callable, Protocol, runtime_checkable

from torch import Tensor


class Denoiser(Protocol):
    """D(x, sigma): the model's estimate of the clean sample at noise level `sigma` (a float)."""

    def __call__(self, x: Tensor, sigma: float) -> Tensor: ...


@runtime_checkable
class GuidedDenoiser(Protocol):
    """A denoiser that can also return the unconditional prediction, which CFG++ samplers renoise along."""

    def __call__(self, x: Tensor, sigma: float) -> Tensor: ...

    def denoise_with_uncond(self, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]: ...


class NoiseSampler(Protocol):
    """Unit-variance noise for the step from `sigma` to `sigma_next`, shaped like the latent."""

    def __call__(self, sigma: float, sigma_next: float) -> Tensor: ...


# callback(step, total, x, denoised): step is 0-based (report step + 1 of total as progress); `x` is the
# sample entering that step and `denoised` the model's x0 estimate there (for previews). total is 0 when
# the sampler cannot know it in advance (dpm_adaptive). Whatever it raises (an interrupt) propagates unchanged.
StepCallback = Callable[[int, int, Tensor, Tensor], None]


def report(callback: StepCallback | None, step: int, total: int, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(step, total, x, denoised)


def denoise_with_uncond(denoiser: Denoiser, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """(guided, unconditional) predictions; a plain denoiser is its own unconditional prediction."""
    if isinstance(denoiser, GuidedDenoiser):
        return denoiser.denoise_with_uncond(x, sigma)
    denoised = denoiser(x, sigma)
    return denoised, denoised


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): a deterministic step to sigma_down, then fresh noise of std sigma_up.

    sigma_down^2 + sigma_up^2 = sigma_next^2; eta = 1 gives DDPM's posterior variance (k-diffusion).
    """
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up


def half_log_snr(sigma: float, flow: bool = False) -> float:
    """lambda = log(alpha / sigma), the DPM-Solver time variable: -log(sigma) in VE units (alpha = 1),
    log((1 - sigma) / sigma) for rectified flow (alpha = 1 - sigma)."""
    if not flow:
        return -math.log(sigma)
    if sigma >= 1.0:
        # Infinite at pure noise: run_sampler starts these samplers at percent_to_sigma(1e-4) instead.
        raise ValueError(f"log-SNR of a flow sigma of {sigma} is infinite; start the schedule below 1")
    return math.log((1.0 - sigma) / sigma)
