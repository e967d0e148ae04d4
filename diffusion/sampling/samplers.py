"""Single-step samplers: each step uses only the current sample (plus fresh noise for ancestral ones).

Names and behaviour follow ComfyUI's KSampler list (model-formats.md 9.2); the algorithms are the papers'
and k-diffusion's, written here in our own words.
"""
from __future__ import annotations

import math

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
from .model_sampling import ModelSampling

# ComfyUI's flow DPM++(2S) ancestral takes its midpoint at this sigma when a step starts at pure noise,
# where the log-SNR midpoint is undefined.
FLOW_FIRST_MIDPOINT = 0.9999


def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn). Order 1.

    DDIM with eta = 0 is this same update in VE variables (Song et al. 2021), so "ddim" runs it too.
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        x = x + to_d(x, s[i], denoised) * (s[i + 1] - s[i])
    return x


def flow_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float, float]:
    """(sigma_down, scale, renoise) for rectified flow, where x = (1 - sigma) x0 + sigma noise.

    The deterministic step lands at sigma_down = sigma_next * (1 + (sigma_next/sigma - 1) * eta); scaling
    by (1 - sigma_next)/(1 - sigma_down) restores the data coefficient of sigma_next, and fresh noise of std
    sqrt(sigma_next^2 - (scale * sigma_down)^2) restores its noise level (ComfyUI's "RF" variants).
    """
    sigma_down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
    scale = (1.0 - sigma_next) / (1.0 - sigma_down)
    renoise = math.sqrt(max(sigma_next**2 - (scale * sigma_down) ** 2, 0.0))
    return sigma_down, scale, renoise


def sample_euler_ancestral(
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
    """Euler to sigma_down, then ancestral noise of std sigma_up (k-diffusion). Order 1, stochastic.

    `flow` switches to the rectified-flow form of the same step (flow_ancestral_step).
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        if s[i + 1] == 0.0:
            x = denoised
        elif flow:
            sigma_down, scale, renoise = flow_ancestral_step(s[i], s[i + 1], eta)
            ratio = sigma_down / s[i]
            x = (x * ratio + denoised * (1.0 - ratio)) * scale
            x = x + noise(s[i], s[i + 1]) * (s_noise * renoise)
        else:
            sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
            x = x + to_d(x, s[i], denoised) * (sigma_down - s[i])
            x = x + noise(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def sample_euler_cfg_pp(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None
) -> Tensor:
    """CFG++ Euler (Chung et al. 2024): step from the guided x0 along the unconditional noise direction."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, uncond = denoise_with_uncond(denoiser, x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        x = denoised + to_d(x, s[i], uncond) * s[i + 1]
    return x


def sample_euler_ancestral_cfg_pp(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """CFG++ with ancestral noise: jump to sigma_down along the unconditional direction, then renoise."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, uncond = denoise_with_uncond(denoiser, x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        x = denoised + to_d(x, s[i], uncond) * sigma_down
        if s[i + 1] > 0.0:
            x = x + noise(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """Heun's method, the trapezoidal 2nd-order step of Karras et al. 2022, Alg. 2; the step to 0 is Euler."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        d = to_d(x, s[i], denoised)
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0.0:
            x = x + d * dt
            continue
        x_euler = x + d * dt
        d_next = to_d(x_euler, s[i + 1], denoiser(x_euler, s[i + 1]))
        x = x + (d + d_next) * (dt / 2.0)
    return x


def sample_heunpp2(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """Heun++ (Carzit's sd-webui-samplers-scheduler, as ComfyUI runs it).

    Each step looks ahead two Euler stages and mixes the three slopes with weights proportional to their
    sigmas relative to 3*sigma_0 (2*sigma_0 when only one stage fits); the last step is Euler.
    """
    s = sigmas.tolist()
    s_end = s[-1]
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        d = to_d(x, s[i], denoised)
        dt = s[i + 1] - s[i]
        if s[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, s[i + 1], denoiser(x_2, s[i + 1]))
        if s[i + 2] == s_end:
            w2 = s[i + 1] / (2.0 * s[0])
            x = x + (d * (1.0 - w2) + d_2 * w2) * dt
            continue
        x_3 = x_2 + d_2 * (s[i + 2] - s[i + 1])
        d_3 = to_d(x_3, s[i + 2], denoiser(x_3, s[i + 2]))
        w2 = s[i + 1] / (3.0 * s[0])
        w3 = s[i + 2] / (3.0 * s[0])
        x = x + (d * (1.0 - w2 - w3) + d_2 * w2 + d_3 * w3) * dt
    return x


def _log_midpoint(sigma: float, sigma_next: float) -> float:
    return math.exp(0.5 * (math.log(sigma) + math.log(sigma_next)))


def sample_dpm_2(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    """Midpoint method with the midpoint taken in log sigma (DPM-Solver-2 style, Karras et al. 2022). Order 2."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        d = to_d(x, s[i], denoised)
        if s[i + 1] == 0.0:
            x = x + d * (s[i + 1] - s[i])
            continue
        sigma_mid = _log_midpoint(s[i], s[i + 1])
        x_mid = x + d * (sigma_mid - s[i])
        d_mid = to_d(x_mid, sigma_mid, denoiser(x_mid, sigma_mid))
        x = x + d_mid * (s[i + 1] - s[i])
    return x


def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    eta: float = 1.0,
    s_noise: float = 1.0,
    callback: StepCallback | None = None,
) -> Tensor:
    """dpm_2 to sigma_down, then ancestral noise."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        d = to_d(x, s[i], denoised)
        if sigma_down == 0.0:
            x = x + d * (sigma_down - s[i])
        else:
            sigma_mid = _log_midpoint(s[i], sigma_down)
            x_mid = x + d * (sigma_mid - s[i])
            d_mid = to_d(x_mid, sigma_mid, denoiser(x_mid, sigma_mid))
            x = x + d_mid * (sigma_down - s[i])
        if s[i + 1] > 0.0:
            x = x + noise(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    eta: float = 1.0,
    s_noise: float = 1.0,
    cfg_pp: bool = False,
    flow: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2) to sigma_down, then ancestral noise.

    With `cfg_pp` the exponential-integrator steps start from x shifted by (guided - uncond), CFG++'s
    renoising along the unconditional prediction. `flow` runs the rectified-flow form instead.
    """
    if flow:
        if cfg_pp:
            raise ValueError("dpmpp_2s_ancestral_cfg_pp has no rectified-flow form")
        return _dpmpp_2s_ancestral_flow(denoiser, x, sigmas, noise=noise, eta=eta, s_noise=s_noise, callback=callback)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised, uncond = denoise_with_uncond(denoiser, x, s[i]) if cfg_pp else (denoiser(x, s[i]), None)
        report(callback, i, len(s) - 1, x, denoised)
        sigma_down, sigma_up = ancestral_step(s[i], s[i + 1], eta)
        if sigma_down == 0.0:
            x = denoised if cfg_pp else x + to_d(x, s[i], denoised) * (sigma_down - s[i])
        else:
            t, t_next = half_log_snr(s[i]), half_log_snr(sigma_down)
            h = t_next - t
            sigma_mid = math.exp(-(t + 0.5 * h))
            start = x + (denoised - uncond) if uncond is not None else x
            x_mid = start * (sigma_mid / s[i]) - denoised * math.expm1(-0.5 * h)
            denoised_mid = denoiser(x_mid, sigma_mid)
            x = start * (sigma_down / s[i]) - denoised_mid * math.expm1(-h)
        if s[i + 1] > 0.0:
            x = x + noise(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def _dpmpp_2s_ancestral_flow(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    eta: float,
    s_noise: float,
    callback: StepCallback | None,
) -> Tensor:
    """DPM-Solver++(2S) for x = (1 - sigma) x0 + sigma noise: in these variables the data-prediction
    exponential step from sigma to sigma' is x' = (sigma'/sigma) x + (1 - sigma'/sigma) D; the midpoint is
    taken in half log-SNR, then flow_ancestral_step renoises (ComfyUI's RF variant)."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        if s[i + 1] == 0.0:
            x = denoised
            continue
        sigma_down, scale, renoise = flow_ancestral_step(s[i], s[i + 1], eta)
        if s[i] >= 1.0:
            sigma_mid = FLOW_FIRST_MIDPOINT
        else:
            lam, lam_down = half_log_snr(s[i], flow=True), half_log_snr(sigma_down, flow=True)
            sigma_mid = 1.0 / (math.exp(lam + 0.5 * (lam_down - lam)) + 1.0)
        ratio = sigma_mid / s[i]
        denoised_mid = denoiser(x * ratio + denoised * (1.0 - ratio), sigma_mid)
        ratio = sigma_down / s[i]
        x = x * ratio + denoised_mid * (1.0 - ratio)
        if eta > 0.0:
            x = x * scale + noise(s[i], s[i + 1]) * (s_noise * renoise)
    return x


def sample_gradient_estimation(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    gamma: float = 2.0,
    cfg_pp: bool = False,
    callback: StepCallback | None = None,
) -> Tensor:
    """Permenter & Yuan 2024, "Interpreting and improving diffusion models from an optimization
    perspective": Euler with the slope extrapolated as gamma*d + (1 - gamma)*d_previous."""
    s = sigmas.tolist()
    old_d: Tensor | None = None
    for i in range(len(s) - 1):
        denoised, uncond = denoise_with_uncond(denoiser, x, s[i]) if cfg_pp else (denoiser(x, s[i]), None)
        report(callback, i, len(s) - 1, x, denoised)
        d = to_d(x, s[i], uncond if uncond is not None else denoised)
        dt = s[i + 1] - s[i]
        if old_d is None:
            x = denoised + d * s[i + 1] if cfg_pp else x + d * dt
        elif cfg_pp:
            x = denoised + d * s[i + 1] + (d - old_d) * ((gamma - 1.0) * dt)
        else:
            x = x + (d * gamma + old_d * (1.0 - gamma)) * dt
        old_d = d
    return x


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020, eq. 6-7), in VP units."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        alpha_bar = 1.0 / (s[i] ** 2 + 1.0)
        alpha_bar_prev = 1.0 / (s[i + 1] ** 2 + 1.0)
        alpha = alpha_bar / alpha_bar_prev
        eps = to_d(x, s[i], denoised)
        x_vp = x * math.sqrt(alpha_bar)
        mean = (x_vp - eps * ((1.0 - alpha) / math.sqrt(1.0 - alpha_bar))) / math.sqrt(alpha)
        if s[i + 1] > 0.0:
            std = math.sqrt((1.0 - alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
            x = (mean + noise(s[i], s[i + 1]) * std) / math.sqrt(alpha_bar_prev)
        else:
            x = mean
    return x


def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: NoiseSampler,
    model_sampling: ModelSampling,
    callback: StepCallback | None = None,
) -> Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023): jump to x0, renoise to the next sigma."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = denoiser(x, s[i])
        report(callback, i, len(s) - 1, x, denoised)
        x = denoised
        if s[i + 1] > 0.0:
            x = model_sampling.noise_scaling(s[i + 1], noise(s[i], s[i + 1]), denoised)
    return x
