"""UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework for fast sampling of diffusion
models"), multistep, data prediction, with the B(h) = h ("bh1") or B(h) = e^h - 1 ("bh2") variants.

Written in VE variables with lambda = -log(sigma); the VP form's alpha factors cancel (x_VE = x_VP / alpha).
The corrector UniC reuses the model call at the predicted point, so it costs no extra evaluation.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
from torch import Tensor

from .denoiser import Denoiser, StepCallback, half_log_snr, report
from .quadrature import weighted_sum

# ComfyUI's uni_pc replaces a final sigma of 0 by 0.001 and returns the sample there.
FINAL_SIGMA = 0.001


def _coefficients(rks: list[float], hh: float, variant: str) -> tuple[np.ndarray, np.ndarray, float]:
    """The UniPC linear system (paper eq. 8 / Alg. 2-3): R[i, k] = r_k^i, b_i = i! phi_(i+1)(hh) / B(h)."""
    order = len(rks)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, rhs = [], []
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial = 1.0
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.array(rows), np.array(rhs), b_h


def sample_uni_pc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    variant: str = "bh1",
    max_order: int = 3,
    lower_order_final: bool = True,
    callback: StepCallback | None = None,
) -> Tensor:
    """UniPC-p with UniC on every step but the last; order min(3, steps - 1).

    `lower_order_final` (ComfyUI's and diffusers' setting) lowers the order over the last steps, which
    steadies few-step runs but caps the asymptotic order at 2 (the last step is a 1st-order predictor).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"uni_pc variant must be 'bh1' or 'bh2', got {variant!r}")
    s = sigmas.tolist()
    if s[-1] == 0.0:
        s[-1] = FINAL_SIGMA
    steps = len(s) - 1
    order = max(1, min(max_order, steps - 1))
    denoised = denoiser(x, s[0])
    report(callback, 0, steps, x, denoised)
    history: deque[tuple[float, Tensor]] = deque([(s[0], denoised)], maxlen=order)
    for step in range(1, steps + 1):
        step_order = min(step, order, steps + 1 - step) if lower_order_final else min(step, order)
        sigma_prev, model_prev = history[-1]
        sigma = s[step]
        h = half_log_snr(sigma) - half_log_snr(sigma_prev)
        rks, slopes = [], []
        for sigma_k, model_k in list(history)[-step_order:-1][::-1]:
            rk = (half_log_snr(sigma_k) - half_log_snr(sigma_prev)) / h
            rks.append(rk)
            slopes.append((model_k - model_prev) / rk)
        rks.append(1.0)
        hh = -h
        rows, rhs, b_h = _coefficients(rks, hh, variant)
        x_base = x * (sigma / sigma_prev) - model_prev * math.expm1(hh)
        if slopes:
            rhos_p = [0.5] if step_order == 2 else np.linalg.solve(rows[:-1, :-1], rhs[:-1])
            x_pred = x_base - weighted_sum(rhos_p, slopes) * b_h
        else:
            x_pred = x_base
        if step == steps:
            return x_pred
        model_t = denoiser(x_pred, sigma)
        report(callback, step, steps, x_pred, model_t)
        rhos_c = [0.5] if step_order == 1 else np.linalg.solve(rows, rhs)
        correction = weighted_sum(rhos_c[:-1], slopes) + (model_t - model_prev) * float(rhos_c[-1])
        x = x_base - correction * b_h
        history.append((sigma, model_t))
    return x
