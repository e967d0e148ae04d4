"""DPM-Solver (Lu et al. 2022, "DPM-Solver: a fast ODE solver for diffusion probabilistic model sampling").

Noise-prediction form in t = -log(sigma): eps(x, t) = (x - D(x, sigma)) / sigma, and the k-th order
singlestep updates of the paper's Algorithms 1-2. `dpm_fast` spends a fixed number of model calls on
orders 3/3/.../2/1 over steps even in t; `dpm_adaptive` pairs orders (2, 3) (or (1, 2)) and lets a PID
controller (Hairer & Wanner; Soderlind 2003) choose the step from their difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .denoiser import Denoiser, NoiseSampler, StepCallback, ancestral_step, report


def _sigma(t: float) -> float:
    return math.exp(-t)


def _t(sigma: float) -> float:
    return -math.log(sigma)


class _EpsModel:
    """The noise prediction eps(x, t) (and D) from a denoiser, counting model calls."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        sigma = _sigma(t)
        denoised = self.denoiser(x, sigma)
        self.calls += 1
        return (x - denoised) / sigma, denoised


def _step_1(x: Tensor, t: float, t_next: float, eps: Tensor) -> Tensor:
    return x - eps * (_sigma(t_next) * math.expm1(t_next - t))


def _first_stage(model: _EpsModel, x: Tensor, t: float, h: float, eps: Tensor, r1: float) -> Tensor:
    s1 = t + r1 * h
    eps_r1, _ = model(x - eps * (_sigma(s1) * math.expm1(r1 * h)), s1)
    return eps_r1


def _step_2(
    model: _EpsModel, x: Tensor, t: float, t_next: float, eps: Tensor, r1: float = 0.5
) -> tuple[Tensor, Tensor]:
    """DPM-Solver-2 step, also returning the stage's eps (DPM-Solver-3 with r1 = 1/3 shares that stage)."""
    h = t_next - t
    eps_r1 = _first_stage(model, x, t, h, eps, r1)
    x_next = x - eps * (_sigma(t_next) * math.expm1(h)) - (eps_r1 - eps) * (_sigma(t_next) / (2 * r1) * math.expm1(h))
    return x_next, eps_r1


def _step_3(
    model: _EpsModel, x: Tensor, t: float, t_next: float, eps: Tensor, eps_r1: Tensor | None = None
) -> Tensor:
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    h = t_next - t
    s2 = t + r2 * h
    if eps_r1 is None:
        eps_r1 = _first_stage(model, x, t, h, eps, r1)
    u2 = (
        x
        - eps * (_sigma(s2) * math.expm1(r2 * h))
        - (eps_r1 - eps) * (_sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0))
    )
    eps_r2, _ = model(u2, s2)
    correction = (eps_r2 - eps) * (_sigma(t_next) / r2 * (math.expm1(h) / h - 1.0))
    return x - eps * (_sigma(t_next) * math.expm1(h)) - correction


def _ancestral_target(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """Where the deterministic part of an ancestral step lands in t, and the noise std to add after it."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_down = min(t_end, _t(sigma_down))
    return t_down, math.sqrt(max(_sigma(t_next) ** 2 - _sigma(t_down) ** 2, 0.0))


def sample_dpm_fast(
    denoiser: Denoiser,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    n: int,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022, sec. 3.4): `n` model calls split into order-3 steps plus a tail."""
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(f"dpm_fast needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    t_start, t_end = _t(sigma_max), _t(sigma_min)
    m = n // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    model = _EpsModel(denoiser)
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_down, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        eps, denoised = model(x, t)
        report(callback, i, len(orders), x, denoised)
        if order == 1:
            x = _step_1(x, t, t_down, eps)
        elif order == 2:
            x, _ = _step_2(model, x, t, t_down, eps)
        else:
            x = _step_3(model, x, t, t_down, eps)
        if sigma_up:
            if noise is None:
                raise ValueError("dpm_fast with eta > 0 needs a noise sampler")
            x = x + noise(_sigma(t), _sigma(t_next)) * (s_noise * sigma_up)
    return x


@dataclass
class PIDStepController:
    """Step-size control from the error's history (Soderlind 2003); with the default (0, 1, 0) gains it is
    the classic integral controller h *= (1/err)^(1/order), softened by an arctan limiter."""

    h: float
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    order: float = 3.0
    accept_safety: float = 0.81
    eps: float = 1e-8
    errs: list[float] = field(default_factory=list)

    def propose_step(self, error: float) -> bool:
        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / self.order
        b2 = -(self.pcoeff + 2.0 * self.dcoeff) / self.order
        b3 = self.dcoeff / self.order
        inv_error = 1.0 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** b1 * self.errs[1] ** b2 * self.errs[2] ** b3
        factor = 1.0 + math.atan(factor - 1.0)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(
    denoiser: Denoiser,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise: NoiseSampler | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver-12 / -23 with adaptive steps (Lu et al. 2022, Alg. 4); ignores any step count.

    Each step's error is the RMS of (x_low - x_high) / max(atol, rtol * max(|x_low|, |x_prev|)); reading it
    is one host sync per step, which step-size control cannot avoid.
    """
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order}")
    t_start, t_end = _t(sigma_max), _t(sigma_min)
    controller = PIDStepController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    model = _EpsModel(denoiser)
    s = t_start
    x_prev = x
    step = 0
    while s < t_end - 1e-5:
        t = min(t_end, s + controller.h)
        t_down, sigma_up = _ancestral_target(s, t, t_end, eta)
        eps, denoised = model(x, s)
        report(callback, step, 0, x, denoised)
        if order == 2:
            x_low = _step_1(x, s, t_down, eps)
            x_high, _ = _step_2(model, x, s, t_down, eps)
        else:
            x_low, eps_r1 = _step_2(model, x, s, t_down, eps, r1=1.0 / 3.0)
            x_high = _step_3(model, x, s, t_down, eps, eps_r1)
        delta = torch.clamp(torch.maximum(x_low.abs(), x_prev.abs()) * rtol, min=atol)
        error = float(torch.linalg.vector_norm((x_low - x_high) / delta)) / math.sqrt(x.numel())
        if controller.propose_step(error):
            x_prev = x_low
            x = x_high
            if sigma_up:
                if noise is None:
                    raise ValueError("dpm_adaptive with eta > 0 needs a noise sampler")
                x = x + noise(_sigma(s), _sigma(t)) * (s_noise * sigma_up)
            s = t
        step += 1
    return x
