"""Deterministic multistep samplers: each step reuses the derivatives or x0 estimates of earlier steps."""
from __future__ import annotations

import math
from collections import deque

import numpy as np
from torch import Tensor

from .denoiser import (
    Denoiser,
    NoiseSampler,
    StepCallback,
    ancestral_step,
    denoise_with_uncond,
    half_log_snr,
    report,
    to_d,
)
from .quadrature import gauss_legendre, lagrange_basis


def adams_coefficients(nodes: list[float], start: float, end: float) -> list[float]:
    """Weights w_j with integral_start^end p(s) ds = sum_j w_j f(nodes[j]), p interpolating f at `nodes`.

    The variable-step Adams-Bashforth weights: each is the exact integral of a Lagrange basis polynomial
    (k-diffusion's LMS integrates the same polynomials numerically).
    """
    weights = []
    for j, node in enumerate(nodes):
        basis = np.polynomial.Polynomial([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * np.polynomial.Polynomial([-other, 1.0]) / (node - other)
        antiderivative = basis.integ()
        weights.append(float(antiderivative(end) - antiderivative(start)))
    return weights


def _adams_step(x: Tensor, history: deque[tuple[float, Tensor]], sigma_next: float) -> Tensor:
    nodes = [sigma for sigma, _ in history]
    weights = adams_coefficients(nodes, nodes[-1], sigma_next)
    for weight, (_, d) in zip(weights, history):
        x = x + d * weight
    return x


def sample_lms(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, order: int = 4, callback: StepCallback | None = None
) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) on the ODE derivative, up to `order` past slopes.

    Matches ComfyUI: the step to sigma = 0 jumps to D instead of integrating (k-diffusion and diffusers
    integrate that last interval too).
    """
    s = sigmas.tolist()
    history: deque[tuple[float, Tensor]] = deque(maxlen=order)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        history.append((s[i], to_d(x, s[i], denoised)))
        x = denoised if s[i + 1] == 0.0 else _adams_step(x, history, s[i + 1])
    return x


# DEIS-tAB works in the VP time of EDM's schedule (Karras et al. 2022, Table 1: eps_s = 1e-3, sigma from
# 0.002 to 80) whatever the model's own table is, as zju-pi's diff-solvers and ComfyUI do:
# sigma(t) = sqrt(exp(beta_min t + beta_d t^2 / 2) - 1).
_VP_EPS_S, _VP_SIGMA_MIN, _VP_SIGMA_MAX = 1e-3, 0.002, 80.0
_VP_BETA_D = 2.0 * (math.log1p(_VP_SIGMA_MIN**2) / _VP_EPS_S - math.log1p(_VP_SIGMA_MAX**2)) / (_VP_EPS_S - 1.0)
_VP_BETA_MIN = math.log1p(_VP_SIGMA_MAX**2) - 0.5 * _VP_BETA_D


def edm_vp_time(sigma: np.ndarray | float) -> np.ndarray | float:
    """The VP time t of a VE sigma on EDM's linear-beta schedule (the inverse of sigma(t) above)."""
    root = np.sqrt(_VP_BETA_MIN**2 + 2.0 * _VP_BETA_D * np.log1p(np.square(sigma)))
    return (root - _VP_BETA_MIN) / _VP_BETA_D


def deis_tab_weights(nodes: list[float], sigma: float, sigma_next: float) -> list[float]:
    """w_j = int_t(sigma)^t(sigma_next) L_j(tau) dsigma/dtau dtau for the Lagrange basis L_j on the VP
    times of the sigmas `nodes`: eps extrapolated as a polynomial in t, integrated exactly along sigma.

    Substituting sigma for tau leaves a smooth integrand, so 16-point Gauss-Legendre in sigma is exact to
    round-off (ComfyUI sums 10,000 points in t, which agrees to about 1e-4 relative).
    """
    sigma_points, quadrature_weights = gauss_legendre(sigma, sigma_next)
    times = [float(edm_vp_time(node)) for node in nodes]
    return [float(np.sum(basis * quadrature_weights)) for basis in lagrange_basis(times, edm_vp_time(sigma_points))]


def sample_deis(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, order: int = 3, callback: StepCallback | None = None
) -> Tensor:
    """DEIS-tAB (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator"), up
    to 3rd order, as ComfyUI's deis runs it ("tab" mode).

    In VE variables the exponential integrator's linear part vanishes (dx/dsigma = eps); tAB extrapolates
    eps as a polynomial in the VP time t (deis_tab_weights). The step to 0 is first order, as in ComfyUI.
    """
    s = sigmas.tolist()
    history: deque[tuple[float, Tensor]] = deque(maxlen=order)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        history.append((s[i], to_d(x, s[i], denoised)))
        if s[i + 1] == 0.0 or len(history) == 1:
            x = x + history[-1][1] * (s[i + 1] - s[i])
            continue
        weights = deis_tab_weights([sigma for sigma, _ in history], s[i], s[i + 1])
        for weight, (_, d) in zip(weights, history):
            x = x + d * weight
    return x


# Fixed-step Adams-Bashforth weights, newest slope first (orders 1-4).
_ADAMS_BASHFORTH = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def _fixed_adams(slopes: deque[Tensor]) -> Tensor:
    weights = _ADAMS_BASHFORTH[len(slopes) - 1]
    total = slopes[-1] * weights[0]
    for weight, slope in zip(weights[1:], reversed(list(slopes)[:-1])):
        total = total + slope * weight
    return total


def sample_ipndm(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, order: int = 4, callback: StepCallback | None = None
) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023, DEIS paper, sec. 4): fixed-step Adams-Bashforth on the slope with a
    lower-order warm start instead of PNDM's Runge-Kutta steps. The step to 0 returns D (ComfyUI)."""
    s = sigmas.tolist()
    slopes: deque[Tensor] = deque(maxlen=order)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        slopes.append(to_d(x, s[i], denoised))
        x = denoised if s[i + 1] == 0.0 else x + _fixed_adams(slopes) * (s[i + 1] - s[i])
    return x


def ipndm_v_weights(steps: list[float]) -> list[float]:
    """Slope weights of iPNDM-v for the step sizes [h_n, h_n-1, ...] (newest first), one per slope.

    The variable-step iPNDM of zju-pi's diff-solvers (Apache-2.0; Zhou et al. 2024, "Fast ODE-based
    sampling for diffusion models in around 5 steps"), which ComfyUI runs: the 2nd-order weights are the
    exact variable-step Adams-Bashforth ones, the 3rd-order ones reduce to AB3 on equal steps. The 4th-order
    weights are kept as published although they are not AB4 on equal steps and sum to 1 only when
    consecutive step ratios agree.
    """
    if len(steps) == 1:
        return [1.0]
    h0, h1 = steps[0], steps[1]
    ratio = h0 / h1
    weights = [1.0 + ratio / 2.0, -ratio / 2.0]
    if len(steps) == 2:
        return weights
    h2 = steps[2]
    growth = h1 / h2
    third = (1.0 - h0 / (3.0 * (h0 + h1)) * (h0 * (h0 + h1)) / (h1 * (h1 + h2))) / 2.0
    weights = [weights[0] + third, weights[1] - (1.0 + growth) * third, third * growth]
    if len(steps) == 3:
        return weights
    h3 = steps[3]
    spread = h1 * (h1 + h2) / (h2 * (h2 + h3))
    fourth = (
        (1.0 - h0 / (3.0 * (h0 + h1))) / 2.0 + (1.0 - h0 / (2.0 * (h0 + h1))) * h0 / (6.0 * (h0 + h1 + h2))
    ) * (h0 * (h0 + h1) * (h0 + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    return [
        weights[0] + fourth,
        weights[1] - (1.0 + growth + spread) * fourth,
        weights[2] + (growth + spread * (1.0 + h2 / h3)) * fourth,
        -fourth * spread * growth,
    ]


def sample_ipndm_v(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, order: int = 4, callback: StepCallback | None = None
) -> Tensor:
    """iPNDM for variable step sizes (ipndm_v_weights above); the step to 0 returns D (ComfyUI)."""
    s = sigmas.tolist()
    slopes: deque[Tensor] = deque(maxlen=order)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        slopes.append(to_d(x, s[i], denoised))
        if s[i + 1] == 0.0:
            x = denoised
            continue
        steps = [s[i + 1] - s[i]] + [s[i - k] - s[i - k - 1] for k in range(len(slopes) - 1)]
        for weight, slope in zip(ipndm_v_weights(steps), reversed(slopes)):
            x = x + slope * (weight * steps[0])
    return x


def sample_plms(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """Pseudo linear multistep (Liu et al. 2022, PNDM with diffusers' `skip_prk_steps`).

    PNDM's "transfer" step with an eps estimate is DDIM, i.e. Euler in VE variables; the first step
    averages the slopes at both ends (a Heun step), later steps use fixed-step Adams-Bashforth (orders 2-4).
    """
    s = sigmas.tolist()
    slopes: deque[Tensor] = deque(maxlen=4)
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        d = to_d(x, s[i], denoised)
        dt = s[i + 1] - s[i]
        if i == 0 and s[i + 1] > 0.0:
            x_euler = x + d * dt
            d_next = to_d(x_euler, s[i + 1], denoiser(x_euler, s[i + 1]))
            slopes.append(d)
            x = x + (d + d_next) * (dt / 2.0)
            continue
        slopes.append(d)
        x = x + _fixed_adams(slopes) * dt
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, cfg_pp: bool = False, callback: StepCallback | None = None
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): 2nd-order multistep in data prediction.

    The first step is 1st order and the step to 0 returns D. With `cfg_pp` the linear part follows the
    unconditional prediction (CFG++, Chung et al. 2024).
    """
    s = sigmas.tolist()
    old: Tensor | None = None
    for i in range(len(s) - 1):
        if cfg_pp:
            denoised, base = denoise_with_uncond(denoiser, x, s[i])
        else:
            denoised = base = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        if s[i + 1] == 0.0:
            x = denoised
        else:
            h = half_log_snr(s[i + 1]) - half_log_snr(s[i])
            # e^-h x + (1 - e^-h) D, with the part that scales x taken from `base`.
            x = denoised + (x - base) * math.exp(-h)
            if old is not None:
                r = (half_log_snr(s[i]) - half_log_snr(s[i - 1])) / h
                x = x + (denoised - old) * (-math.expm1(-h) / (2.0 * r))
        old = base
    return x


def sample_res_multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    cfg_pp: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """RES 2nd-order multistep exponential integrator (Zhang et al. 2023, arXiv 2308.02157, eq. 22).

    With eta > 0 each step goes to sigma_down and adds ancestral noise (res_multistep_ancestral).
    """
    s = sigmas.tolist()
    old: Tensor | None = None
    old_sigma_down = 0.0
    for i in range(len(s) - 1):
        denoised, uncond = denoise_with_uncond(denoiser, x, s[i]) if cfg_pp else (denoiser(x, s[i]), None)
        report(callback, i, len(s) - 1, x, denoised)
        base = uncond if uncond is not None else denoised
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        if sigma_down == 0.0 or old is None:
            x = denoised + to_d(x, s[i], base) * sigma_down
        else:
            t, t_next = half_log_snr(s[i]), half_log_snr(sigma_down)
            h = t_next - t
            c2 = (half_log_snr(s[i - 1]) - half_log_snr(old_sigma_down)) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            start = x + (denoised - base)
            x = start * math.exp(-h) + (base * b1 + old * b2) * h
        if s[i + 1] > 0.0 and sigma_up > 0.0:
            if noise is None:
                raise ValueError("res_multistep with eta > 0 needs a noise sampler")
            x = x + noise(s[i], s[i + 1]) * (s_noise * sigma_up)
        old = base
        old_sigma_down = sigma_down
    return x
