"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams solver for fast sampling of diffusion models",
NeurIPS 2023): stochastic Adams-Bashforth predictor and Adams-Moulton corrector in data prediction.

With lambda = -log(sigma) and noise strength tau, the SDE's exact step from s to t is
    x_t = (sigma_t / sigma_s) e^(-tau^2 h) x_s + int_s^t (1 + tau^2) e^((1 + tau^2)(l - l_t)) D(l) dl + noise,
noise ~ sigma_t sqrt(1 - e^(-2 tau^2 h)) N(0, 1), h = l_t - l_s (VE units, alpha = 1; paper eqs. 14-18).
D is replaced by its Lagrange interpolant through the last x0 estimates: the predictor extrapolates from
points up to s, the corrector interpolates including the new point t. The weights integrate each basis
polynomial against the exponential kernel, here by Gauss-Legendre quadrature (exact to round-off for
these degrees). The corrector reuses the predictor's noise and, in PEC mode, the evaluation at the
predicted point; "pece" re-evaluates the model at the corrected point.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from torch import Tensor

from .denoiser import Denoiser, NoiseSampler, StepCallback, half_log_snr, report
from .model_sampling import ModelSampling
from .quadrature import gauss_legendre, lagrange_basis, weighted_sum

TauFunction = Callable[[float], float]


def stochastic_adams_weights(nodes: list[float], start: float, end: float, tau: float) -> list[float]:
    """int_start^end (1 + tau^2) e^((1 + tau^2)(l - end)) L_j(l) dl for the Lagrange basis L_j on `nodes`."""
    rate = 1.0 + tau * tau
    points, quadrature_weights = gauss_legendre(start, end)
    kernel = rate * np.exp(rate * (points - end)) * quadrature_weights
    return [float(np.sum(kernel * basis)) for basis in lagrange_basis(nodes, points)]


def default_tau(model_sampling: ModelSampling, eta: float = 1.0) -> TauFunction:
    """ComfyUI's default: stochastic (tau = eta) for sigmas between 20% and 80% of sampling, an ODE elsewhere."""
    upper, lower = model_sampling.percent_to_sigma(0.2), model_sampling.percent_to_sigma(0.8)
    return lambda sigma: eta if lower <= sigma <= upper else 0.0


def sample_sa_solver(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    model_sampling: ModelSampling | None = None,
    tau: TauFunction | None = None,
    predictor_order: int = 3,
    corrector_order: int = 4,
    pece: bool = False,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """SA-Solver with a `predictor_order` predictor and `corrector_order` corrector; lower orders at the end
    of a schedule that reaches 0, and the step to 0 returns D."""
    if tau is None:
        if model_sampling is None:
            raise ValueError("sa_solver needs a tau function or the model's sampling parameters")
        tau = default_tau(model_sampling)
    s = sigmas.tolist()
    steps = len(s) - 1
    lambdas = [half_log_snr(sigma) if sigma > 0.0 else math.inf for sigma in s]
    lower_at_end = s[-1] == 0.0
    history: list[Tensor] = []
    x_pred = x
    h = tau_now = 0.0
    step_noise: Tensor | float = 0.0
    for i in range(steps):
        denoised = denoiser(x_pred, s[i])
        report(callback, i, steps, x_pred, denoised)
        history = (history + [denoised])[-max(predictor_order, corrector_order) :]
        p_order = min(predictor_order, len(history))
        c_order = 0 if i == 0 or (s[i + 1] == 0.0 and not pece) else min(corrector_order, len(history))
        if lower_at_end:
            p_order, c_order = min(p_order, steps - 1 - i), min(c_order, steps - i)
        if c_order == 0:
            x = x_pred
        else:
            weights = stochastic_adams_weights(lambdas[i - c_order + 1 : i + 1], lambdas[i - 1], lambdas[i], tau_now)
            x = x * (s[i] / s[i - 1] * math.exp(-(tau_now**2) * h)) + weighted_sum(weights, history[-c_order:])
            if tau_now > 0.0 and s_noise > 0.0:
                x = x + step_noise
            if pece:
                denoised = denoiser(x, s[i])
                history[-1] = denoised
        if s[i + 1] == 0.0:
            x_pred = denoised
            continue
        tau_now = tau(s[i + 1])
        h = lambdas[i + 1] - lambdas[i]
        weights = stochastic_adams_weights(lambdas[i - p_order + 1 : i + 1], lambdas[i], lambdas[i + 1], tau_now)
        x_pred = x * (s[i + 1] / s[i] * math.exp(-(tau_now**2) * h)) + weighted_sum(weights, history[-p_order:])
        if tau_now > 0.0 and s_noise > 0.0:
            std = s[i + 1] * math.sqrt(-math.expm1(-2.0 * tau_now**2 * h)) * s_noise
            step_noise = noise(s[i], s[i + 1]) * std
            x_pred = x_pred + step_noise
    return x_pred
