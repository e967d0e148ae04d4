"""Stochastic samplers on the exact Gaussian denoiser: the samples they produce have the data's mean and
std, runs are reproducible, and the SDE samplers' Brownian noise belongs to sigma intervals."""
import math

import pytest
import torch
from gaussian_oracle import SD_SIGMA_MAX, SD_SIGMA_MIN, GaussianData

from diffusion.sampling.model_sampling import FlowModelSampling
from diffusion.sampling.registry import SAMPLERS, run_sampler
from diffusion.sampling.noise import GaussianNoiseSampler
from diffusion.sampling.samplers import sample_lcm
from diffusion.sampling.schedulers import karras_sigmas

STOCHASTIC = [name for name, spec in SAMPLERS.items() if spec.noise != "none" and name != "lcm"]
ELEMENTS = 4 * 4096
STEPS = 100
# Karras steps to sigma_min, then 0. Sampling error = 4 standard errors (s/sqrt(N) for the mean,
# s/sqrt(2N) for the std) plus the sampler's discretisation bias at 100 steps, measured on other seeds:
# the 1st-order ancestral samplers (Euler a and its equivalents) shrink the std by about 0.012, the rest by
# at most 0.002.
FIRST_ORDER = {"euler_ancestral", "euler_ancestral_cfg_pp", "ddpm"}


def _pure_noise_start(data: GaussianData, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Four batch items of 4096 elements: per-step noise comes from one generator per batch item.
    return data.mu + torch.randn(4, ELEMENTS // 4, generator=generator) * math.hypot(data.s, SD_SIGMA_MAX)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_reproduces_the_data_distribution(gaussian, sd_sampling, name):
    sigmas = karras_sigmas(STEPS, SD_SIGMA_MIN, SD_SIGMA_MAX)
    out = run_sampler(name, gaussian, _pure_noise_start(gaussian), sigmas, seed=5, model_sampling=sd_sampling)
    bias = 0.015 if name in FIRST_ORDER else 0.003
    assert abs(out.mean().item() - gaussian.mu) < 4 * gaussian.s / math.sqrt(ELEMENTS)
    assert abs(out.std().item() - gaussian.s) < 4 * gaussian.s / math.sqrt(2 * ELEMENTS) + bias


def test_lcm_with_the_exact_consistency_function_samples_the_data_exactly(gaussian, sd_sampling):
    # LCM assumes a consistency model f(x, sigma) = ODE solution at sigma = 0; for Gaussian data that is
    # mu + (x - mu) s / sqrt(s^2 + sigma^2), and renoising then gives the exact marginal at every step.
    def consistency(x, sigma):
        return gaussian.mu + (x - gaussian.mu) * gaussian.s / math.hypot(gaussian.s, sigma)

    x = _pure_noise_start(gaussian)
    sigmas = karras_sigmas(4, SD_SIGMA_MIN, SD_SIGMA_MAX)
    out = sample_lcm(consistency, x, sigmas, noise=GaussianNoiseSampler(x, 5), model_sampling=sd_sampling)
    assert abs(out.mean().item() - gaussian.mu) < 4 * gaussian.s / math.sqrt(ELEMENTS)
    assert abs(out.std().item() - gaussian.s) < 4 * gaussian.s / math.sqrt(2 * ELEMENTS)


def test_ddpm_is_euler_ancestral_written_in_vp_units(gaussian):
    # With eta = 1 the ancestral step's sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 is the
    # DDPM posterior variance in VE units, and the posterior means agree too.
    sigmas = karras_sigmas(20, SD_SIGMA_MIN, SD_SIGMA_MAX).double()
    x = _pure_noise_start(gaussian).double()
    ddpm = run_sampler("ddpm", gaussian, x.clone(), sigmas, seed=3)
    ancestral = run_sampler("euler_ancestral", gaussian, x.clone(), sigmas, seed=3)
    torch.testing.assert_close(ddpm, ancestral, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_seed_gives_bit_identical_samples(gaussian, sd_sampling, name):
    sigmas = karras_sigmas(6, SD_SIGMA_MIN, SD_SIGMA_MAX)
    x = _pure_noise_start(gaussian)[:1, :256]
    first = run_sampler(name, gaussian, x.clone(), sigmas, seed=11, model_sampling=sd_sampling)
    second = run_sampler(name, gaussian, x.clone(), sigmas, seed=11, model_sampling=sd_sampling)
    other = run_sampler(name, gaussian, x.clone(), sigmas, seed=12, model_sampling=sd_sampling)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_sde_samples_follow_one_brownian_path_at_any_step_count(gaussian, name):
    x = _pure_noise_start(gaussian)[:1]
    coarse = run_sampler(name, gaussian, x.clone(), karras_sigmas(50, SD_SIGMA_MIN, SD_SIGMA_MAX), seed=5)
    fine = run_sampler(name, gaussian, x.clone(), karras_sigmas(100, SD_SIGMA_MIN, SD_SIGMA_MAX), seed=5)
    reseeded = run_sampler(name, gaussian, x.clone(), karras_sigmas(100, SD_SIGMA_MIN, SD_SIGMA_MAX), seed=6)
    # Measured mean |difference|: 0.009-0.024 across step counts against 0.34 across seeds.
    assert (coarse - fine).abs().mean() < 0.1 * (fine - reseeded).abs().mean()


def test_per_step_noise_samplers_depend_on_the_step_count(gaussian):
    x = _pure_noise_start(gaussian)[:1]
    coarse = run_sampler("euler_ancestral", gaussian, x.clone(), karras_sigmas(50, SD_SIGMA_MIN, SD_SIGMA_MAX), seed=5)
    fine = run_sampler("euler_ancestral", gaussian, x.clone(), karras_sigmas(100, SD_SIGMA_MIN, SD_SIGMA_MAX), seed=5)
    assert (coarse - fine).abs().mean() > 0.2


def test_flow_models_refuse_ve_only_ancestral_samplers(gaussian):
    with pytest.raises(ValueError, match="dpm_2_ancestral.*flow"):
        run_sampler("dpm_2_ancestral", gaussian, torch.zeros(4), torch.tensor([1.0, 0.0]), seed=0,
                    model_sampling=FlowModelSampling())


@pytest.mark.parametrize("name", [n for n, spec in SAMPLERS.items() if spec.noise.startswith("brownian")])
def test_sde_samplers_take_a_single_step_straight_to_the_denoised_sample(gaussian, sd_sampling, name):
    # One step [sigma_max, 0] leaves a single positive sigma: no Brownian interval to span, and none needed.
    x = _pure_noise_start(gaussian)
    sigmas = torch.tensor([SD_SIGMA_MAX, 0.0])
    out = run_sampler(name, gaussian, x, sigmas, seed=5, model_sampling=sd_sampling)
    torch.testing.assert_close(out, gaussian.denoise(x, float(sigmas[0])))
