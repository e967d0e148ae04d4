"""DPM-Solver++ SDE samplers (Lu et al. 2022b): exponential integrators of the reverse SDE.

All take their noise from a NoiseSampler over sigma intervals; the registry gives them a Brownian tree
so that the noise is a property of the sigma interval, not of the step count (model-formats.md 8.5).
"""
from __future__ import annotations

import math

from torch import Tensor

from .denoiser import (
    Denoiser,
    NoiseSampler,
    StepCallback,
    ancestral_step,
    half_log_snr,
    report,
    to_d,
)


def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    callback: StepCallback | None = None,
) -> Tensor:
    """SDE-DPM-Solver++ singlestep: an ancestral DPM-Solver++ stage to t + r*h, then a full step using
    the (1 - 1/(2r), 1/(2r)) mix of both x0 estimates. Two model calls per step; the step to 0 is Euler."""
    s = sigmas.tolist()
    mix = 1.0 / (2.0 * r)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        if s[i + 1] == 0.0:
            x = x + to_d(x, s[i], denoised) * (s[i + 1] - s[i])
            continue
        t, t_next = half_log_snr(s[i]), half_log_snr(s[i + 1])
        sigma_mid = math.exp(-(t + r * (t_next - t)))
        down, up = ancestral_step(s[i], sigma_mid, eta)
        x_mid = x * (down / s[i]) - denoised * math.expm1(t - half_log_snr(down))
        x_mid = x_mid + noise(s[i], sigma_mid) * (s_noise * up)
        denoised_mid = denoiser(x_mid, sigma_mid)
        down, up = ancestral_step(s[i], s[i + 1], eta)
        blended = denoised * (1.0 - mix) + denoised_mid * mix
        x = x * (down / s[i]) - blended * math.expm1(t - half_log_snr(down))
        x = x + noise(s[i], s[i + 1]) * (s_noise * up)
    return x


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    flow: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE: data-prediction multistep with the SDE's e^(-eta h) damping and exact
    Gaussian increment of std sigma_next * sqrt(1 - e^(-2 eta h)); `solver_type` picks the
    midpoint or Heun form of the 2nd-order correction.

    Written with alpha and lambda = log(alpha / sigma), so `flow` (alpha = 1 - sigma) needs no other change;
    a flow schedule must start below sigma 1 (run_sampler moves a leading 1 to percent_to_sigma(1e-4)).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    s = sigmas.tolist()
    old: Tensor | None = None
    h_last = 0.0
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        if s[i + 1] == 0.0:
            x = denoised
        else:
            h = half_log_snr(s[i + 1], flow) - half_log_snr(s[i], flow)
            eta_h = eta * h
            alpha_next = 1.0 - s[i + 1] if flow else 1.0
            decay = -math.expm1(-h - eta_h) * alpha_next
            x = x * (s[i + 1] / s[i] * math.exp(-eta_h)) + denoised * decay
            if old is not None:
                ratio = h / h_last
                if solver_type == "heun":
                    weight = decay / (-h - eta_h) + alpha_next
                else:
                    weight = 0.5 * decay
                x = x + (denoised - old) * (weight * ratio)
            if eta:
                std = s[i + 1] * math.sqrt(-math.expm1(-2.0 * eta_h)) * s_noise
                x = x + noise(s[i], s[i + 1]) * std
            h_last = h
        old = denoised
    return x


def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    eta: float = 1.0,
    s_noise: float = 1.0,
    flow: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """3rd-order multistep DPM-Solver++ SDE (k-diffusion): the x0 history gives 1st and 2nd divided
    differences, integrated against the phi_2 and phi_3 functions of the damped step h*(1 + eta).

    In alpha/lambda form like sample_dpmpp_2m_sde: x decays by (sigma_next/sigma) e^(-eta h) (which is
    e^(-h(1 + eta)) in VE units) and every x0 term carries alpha_next, so `flow` works unchanged.
    """
    s = sigmas.tolist()
    history: list[tuple[Tensor, float]] = []  # (denoised, h) of the last two steps, newest first
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        h = 0.0
        if s[i + 1] == 0.0:
            x = denoised
        else:
            h = half_log_snr(s[i + 1], flow) - half_log_snr(s[i], flow)
            h_eta = h * (eta + 1.0)
            alpha_next = 1.0 - s[i + 1] if flow else 1.0
            x = x * (s[i + 1] / s[i] * math.exp(-eta * h)) + denoised * (-math.expm1(-h_eta) * alpha_next)
            phi_2 = (math.expm1(-h_eta) / h_eta + 1.0) * alpha_next
            if len(history) == 2:
                (d_1, h_1), (d_2, h_2) = history
                r0, r1 = h_1 / h, h_2 / h
                slope_0 = (denoised - d_1) / r0
                slope_1 = (d_1 - d_2) / r1
                first = slope_0 + (slope_0 - slope_1) * (r0 / (r0 + r1))
                second = (slope_0 - slope_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5 * alpha_next
                x = x + first * phi_2 - second * phi_3
            elif len(history) == 1:
                d_1, h_1 = history[0]
                x = x + (denoised - d_1) * (phi_2 * h / h_1)
            if eta:
                std = s[i + 1] * math.sqrt(-math.expm1(-2.0 * h * eta)) * s_noise
                x = x + noise(s[i], s[i + 1]) * std
        history = [(denoised, h)] + history[:1]
    return x


def er_sde_noise_scale(sigma: float) -> float:
    """ER-SDE-Solver's default noise-scale function phi(sigma) = sigma (e^(sigma^0.3) + 10) (Cui et al. 2023)."""
    return sigma * (math.exp(sigma**0.3) + 10.0)


def _er_sde_integrals(sigma: float, sigma_next: float, points: int = 200) -> tuple[float, float]:
    """Left Riemann sums of int 1/phi and int (s - sigma)/phi over [sigma_next, sigma], 200 points as the
    reference implementation takes them."""
    width = (sigma - sigma_next) / points
    nodes = [sigma_next + k * width for k in range(points)]
    first = sum(1.0 / er_sde_noise_scale(s) for s in nodes) * width
    second = sum((s - sigma) / er_sde_noise_scale(s) for s in nodes) * width
    return first, second


def sample_er_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    s_noise: float = 1.0,
    max_stage: int = 3,
    callback: StepCallback | None = None,
) -> Tensor:
    """ER-SDE-Solver-3 in VE form (Cui et al. 2023, arXiv 2309.06169, sec. 4).

    The extended reverse SDE with noise scale phi has the exact solution
    x_next = r x + phi(sigma_next) * int phi'/phi^2 D + noise, r = phi(sigma_next)/phi(sigma). Expanding D in a
    Taylor series around sigma (slopes from past x0 estimates) and integrating by parts gives the
    coefficients (1 - r), dt + phi(sigma_next) int 1/phi and dt^2/2 + phi(sigma_next) int (s - sigma)/phi
    for D, D' and D''/2; the fresh noise has std sqrt(sigma_next^2 - (r sigma)^2).
    """
    s = sigmas.tolist()
    old: Tensor | None = None
    old_slope: Tensor | None = None
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        stage = min(max_stage, i + 1)
        if s[i + 1] == 0.0:
            x = denoised
        else:
            phi_next = er_sde_noise_scale(s[i + 1])
            r = phi_next / er_sde_noise_scale(s[i])
            x = x * r + denoised * (1.0 - r)
            if stage >= 2 and old is not None:
                dt = s[i + 1] - s[i]
                first, second = _er_sde_integrals(s[i], s[i + 1])
                slope = (denoised - old) / (s[i] - s[i - 1])
                x = x + slope * (dt + first * phi_next)
                if stage >= 3 and old_slope is not None:
                    curvature = (slope - old_slope) / ((s[i] - s[i - 2]) / 2.0)
                    x = x + curvature * (dt * dt / 2.0 + second * phi_next)
                old_slope = slope
            if s_noise:
                x = x + noise(s[i], s[i + 1]) * (s_noise * math.sqrt(max(s[i + 1] ** 2 - (s[i] * r) ** 2, 0.0)))
        old = denoised
    return x


def _seeds_decay(h: float, eta: float, fraction: float) -> tuple[float, float]:
    """(e^(-fraction h (1 + eta)), 1 - e^(-2 fraction h eta)): the data-prediction SDE's damping of x over a
    fraction of the step and the share of unit noise variance gathered over it."""
    return math.exp(-fraction * h * (1.0 + eta)), -math.expm1(-2.0 * fraction * h * eta)


def sample_seeds_2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """SEEDS-2 (Gonzalez et al. 2023, arXiv 2305.14267), VE data prediction, midpoint stage at r = 1/2.

    An SDE stage to the log-sigma midpoint, then the full step with the (0, 1) mix of both x0 estimates
    (1 - 1/(2r) = 0). The noise of the first half-interval is reused, damped, in the full step, so the
    increments of both halves add up to the exact SDE variance sigma_next^2 (1 - e^(-2 eta h)).
    """
    s = sigmas.tolist()
    inject = eta > 0 and s_noise > 0
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        if s[i + 1] == 0.0:
            x = denoised
            continue
        h = half_log_snr(s[i + 1]) - half_log_snr(s[i])
        sigma_mid = math.sqrt(s[i] * s[i + 1])
        half, half_var = _seeds_decay(h, eta, 0.5)
        full, full_var = _seeds_decay(h, eta, 1.0)
        x_mid = x * half + denoised * (1.0 - half)
        if inject:
            first, second = noise(s[i], sigma_mid), noise(sigma_mid, s[i + 1])
            x_mid = x_mid + first * (sigma_mid * math.sqrt(half_var) * s_noise)
        denoised_mid = denoiser(x_mid, sigma_mid)
        x = x * full + denoised_mid * (1.0 - full)
        if inject:
            carried = math.sqrt(max(full_var - half_var, 0.0))
            x = x + (first * carried + second * math.sqrt(half_var)) * (s[i + 1] * s_noise)
    return x


def sample_seeds_3(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """SEEDS-3 (Gonzalez et al. 2023), VE data prediction, stages at r = 1/3 and 2/3 of the log-sigma step.

    Each stage adds the phi-weighted difference of the x0 estimates (an exponential Runge-Kutta step of
    order 3 in the drift); each sub-interval's noise is carried into the later stages with the damping
    accumulated since, so the full step again has variance sigma_next^2 (1 - e^(-2 eta h)).
    """
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    s = sigmas.tolist()
    inject = eta > 0 and s_noise > 0
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        if s[i + 1] == 0.0:
            x = denoised
            continue
        h = half_log_snr(s[i + 1]) - half_log_snr(s[i])
        h_eta = h * (1.0 + eta)
        sigma_1, sigma_2 = math.exp(-(half_log_snr(s[i]) + r1 * h)), math.exp(-(half_log_snr(s[i]) + r2 * h))
        (decay_1, var_1), (decay_2, var_2), (decay_3, var_3) = (_seeds_decay(h, eta, f) for f in (r1, r2, 1.0))
        if inject:
            n1, n2, n3 = noise(s[i], sigma_1), noise(sigma_1, sigma_2), noise(sigma_2, s[i + 1])
        x_1 = x * decay_1 + denoised * (1.0 - decay_1)
        if inject:
            x_1 = x_1 + n1 * (sigma_1 * math.sqrt(var_1) * s_noise)
        denoised_1 = denoiser(x_1, sigma_1)
        x_2 = x * decay_2 + denoised * (1.0 - decay_2)
        x_2 = x_2 + (denoised_1 - denoised) * ((r2 / r1) * ((decay_2 - 1.0) / (r2 * h_eta) + 1.0))
        if inject:
            x_2 = x_2 + (n1 * math.sqrt(max(var_2 - var_1, 0.0)) + n2 * math.sqrt(var_1)) * (sigma_2 * s_noise)
        denoised_2 = denoiser(x_2, sigma_2)
        x = x * decay_3 + denoised * (1.0 - decay_3)
        x = x + (denoised_2 - denoised) * ((1.0 / r2) * ((decay_3 - 1.0) / h_eta + 1.0))
        if inject:
            carried = n1 * math.sqrt(max(var_3 - var_2, 0.0)) + n2 * math.sqrt(max(var_2 - var_1, 0.0))
            x = x + (carried + n3 * math.sqrt(var_1)) * (s[i + 1] * s_noise)
    return x
