"""Noise schedules under ComfyUI's scheduler names (model-formats.md 9.1).

Every scheduler returns a 1-D float32 tensor of descending sigmas ending in 0. Most return `n + 1` values;
`ddim_uniform` and `beta` may return a different count, exactly as ComfyUI does.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .model_sampling import ModelSampling


def _with_zero(sigmas: list[float]) -> Tensor:
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return _with_zero(sigmas.tolist())


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in log sigma."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return _with_zero(sigmas.tolist())


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Sabour et al. 2024 (Align Your Steps), eq. 9: evenly spaced in atan(sigma).

    ComfyUI divides 0 by 0 at n = 1; a single step goes straight from sigma_max to 0 instead.
    """
    if n == 1:
        return _with_zero([sigma_max])
    frac = torch.arange(n, dtype=torch.float64) / (n - 1)
    sigmas = (frac * math.atan(sigma_min) + (1.0 - frac) * math.atan(sigma_max)).tan()
    return _with_zero(sigmas.tolist())


def normal_sigmas(ms: ModelSampling, n: int, sgm: bool = False) -> Tensor:
    """Evenly spaced timesteps from t(sigma_max) to t(sigma_min); `sgm` drops the endpoint (sgm_uniform)."""
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, n + 1)[:-1]
    else:
        # A table whose lowest sigma is already 0 supplies the final 0 itself.
        if math.isclose(ms.sigma(end), 0.0, abs_tol=1e-5):
            n += 1
            append_zero = False
        timesteps = torch.linspace(start, end, n)
    sigmas = [ms.sigma(float(t)) for t in timesteps]
    return _with_zero(sigmas) if append_zero else torch.tensor(sigmas, dtype=torch.float32)


def simple_sigmas(ms: ModelSampling, n: int) -> Tensor:
    """Every (len/n)-th entry of the sigma table, counted down from the top."""
    table = ms.sigmas.tolist()
    stride = len(table) / n
    return _with_zero([table[-(1 + int(i * stride))] for i in range(n)])


def ddim_uniform_sigmas(ms: ModelSampling, n: int) -> Tensor:
    """Table entries 1, 1 + c, 1 + 2c, ... (c = len // n), reversed: DDIM's "leading" spacing.

    Matches ComfyUI: it can yield more than n steps and starts below sigma_max.
    """
    table = ms.sigmas.tolist()
    index = 1
    sigmas: list[float] = []
    if not math.isclose(table[index], 0.0, abs_tol=1e-5):
        sigmas = [0.0]
    stride = max(len(table) // n, 1)
    while index < len(table):
        sigmas.append(table[index])
        index += stride
    return torch.tensor(sigmas[::-1], dtype=torch.float32)


def _incomplete_beta_fraction(x: float, a: float, b: float) -> float:
    """Continued fraction for the regularised incomplete beta (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the Beta(a, b) cumulative distribution function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast only on one side of the mean; use the symmetry I_x(a,b) = 1 - I_(1-x)(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(1.0 - x, b, a) / b


def beta_quantile(p: float, a: float, b: float) -> float:
    """Inverse of I_x(a, b) by bisection (the CDF is monotone; 60 halvings reach double precision)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if regularized_incomplete_beta(mid, a, b) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def beta_sigmas(ms: ModelSampling, n: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Lee et al. 2024, "Beta sampling is all you need": timesteps at Beta(0.6, 0.6) quantiles."""
    table = ms.sigmas.tolist()
    last_index = len(table) - 1
    sigmas: list[float] = []
    previous = -1
    for i in range(n):
        t = round(beta_quantile(1.0 - i / n, alpha, beta) * last_index)
        if t != previous:
            sigmas.append(table[t])
        previous = t
    return _with_zero(sigmas)


def linear_quadratic_sigmas(ms: ModelSampling, n: int, threshold: float = 0.025) -> Tensor:
    """Mochi's schedule: linear in the first half up to `threshold`, then quadratic to 1 (9.1)."""
    if n == 1:
        fractions = [0.0, 1.0]
    else:
        m = n // 2
        gap = m - threshold * n
        quadratic = gap / (m * (n - m) ** 2)
        linear = threshold / m - 2.0 * gap / (n - m) ** 2
        const = quadratic * m * m
        fractions = [i * threshold / m for i in range(m)]
        fractions += [quadratic * i * i + linear * i + const for i in range(m, n)]
        fractions.append(1.0)
    return torch.tensor([(1.0 - u) * ms.sigma_max for u in fractions], dtype=torch.float32)


SchedulerFn = Callable[[ModelSampling, int], Tensor]

# ComfyUI's KSampler COMBO order.
SCHEDULERS: dict[str, SchedulerFn] = {
    "simple": simple_sigmas,
    "sgm_uniform": lambda ms, n: normal_sigmas(ms, n, sgm=True),
    "karras": lambda ms, n: karras_sigmas(n, ms.sigma_min, ms.sigma_max),
    "exponential": lambda ms, n: exponential_sigmas(n, ms.sigma_min, ms.sigma_max),
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "normal": normal_sigmas,
    "linear_quadratic": linear_quadratic_sigmas,
    "kl_optimal": lambda ms, n: kl_optimal_sigmas(n, ms.sigma_min, ms.sigma_max),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """k-diffusion's polyexponential schedule: log sigma falls as (1 - i/(n-1))^rho; rho 1 is exponential."""
    ramp = torch.linspace(1.0, 0.0, n, dtype=torch.float64) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return torch.cat([(ramp * (log_max - log_min) + log_min).exp().float(), torch.zeros(1)])


def vp_sigmas(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> Tensor:
    """The variance-preserving SDE's noise levels at t = 1 .. eps_s (Song et al. 2021, VP-SDE):
    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = torch.linspace(1.0, eps_s, n, dtype=torch.float64)
    return torch.cat([(torch.exp(beta_d * t**2 / 2.0 + beta_min * t) - 1.0).sqrt().float(), torch.zeros(1)])


def laplace_sigmas(n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5) -> Tensor:
    """log sigma at the quantiles of a Laplace(mu, beta) distribution, clamped to [sigma_min, sigma_max]: steps
    crowd around sigma = e^mu (Hang et al. 2024, "Improved noise schedule for diffusion training")."""
    position = 0.5 - torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    # The 1e-5 keeps the log finite at both ends, where the clamp takes over anyway.
    log_sigmas = mu - beta * position.sign() * torch.log(1.0 - 2.0 * position.abs() + 1e-5)
    return torch.cat([log_sigmas.clamp(math.log(sigma_min), math.log(sigma_max)).exp().float(), torch.zeros(1)])


# SD Turbo was distilled on these ten timesteps (ComfyUI's SDTurboScheduler): 999, 899, ..., 99.
SD_TURBO_TIMESTEPS = tuple(range(999, 0, -100))


def sd_turbo_sigmas(ms: ModelSampling, n: int, denoise: float = 1.0) -> Tensor:
    """The sigmas of SD Turbo's timesteps 999, 899, ...; denoise d starts 10 - int(10 d) timesteps in."""
    start = len(SD_TURBO_TIMESTEPS) - int(len(SD_TURBO_TIMESTEPS) * denoise)
    sigmas = [ms.sigma(float(t)) for t in SD_TURBO_TIMESTEPS[start:start + n]]
    return torch.tensor([*sigmas, 0.0], dtype=torch.float32)


def calculate_sigmas(ms: ModelSampling, scheduler: str, steps: int) -> Tensor:
    """The sigmas of `scheduler` for `steps` steps on the model's table."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULER_NAMES)}")
    if steps < 1:
        raise ValueError(f"scheduler {scheduler!r} needs at least 1 step, got {steps}")
    return SCHEDULERS[scheduler](ms, steps)
