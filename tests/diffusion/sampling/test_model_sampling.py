"""The discrete SD table, sigma <-> timestep, parameterisations and noise scaling (model-formats.md 8)."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffusion.sampling.model_sampling import (
    DiscreteConfig,
    DiscreteModelSampling,
    FlowModelSampling,
    LCMModelSampling,
    scaled_linear_betas,
)


def test_sd_table_ends_match_the_documented_values(sd_sampling):
    assert sd_sampling.sigma_min == pytest.approx(0.0291675, rel=3e-5)
    assert sd_sampling.sigma_max == pytest.approx(14.614642, rel=1e-6)
    alphas_cumprod = torch.cumprod(1 - scaled_linear_betas(), 0)
    assert float(alphas_cumprod[0]) == pytest.approx(0.99915, abs=1e-12)
    assert float(alphas_cumprod[-1]) == pytest.approx(0.0046601, rel=1e-4)


def test_sd_table_agrees_with_diffusers_to_float32_construction_error(sd_sampling):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    reference = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()
    torch.testing.assert_close(sd_sampling.sigmas, reference.float(), rtol=3e-5, atol=0)


def test_timestep_is_the_nearest_table_index_in_log_sigma(sd_sampling):
    table = sd_sampling.sigmas.double()
    assert sd_sampling.timestep(float(table[999])) == 999.0
    assert sd_sampling.timestep(float(table[0])) == 0.0
    just_above_midpoint = math.exp((math.log(table[400]) + math.log(table[401])) / 2 + 1e-9)
    assert sd_sampling.timestep(just_above_midpoint) == 401.0
    assert sd_sampling.timestep(100.0) == 999.0


def test_sigma_interpolates_log_sigma_between_integer_timesteps(sd_sampling):
    table = sd_sampling.sigmas.double()
    expected = math.exp(0.25 * math.log(table[500]) + 0.75 * math.log(table[501]))
    assert sd_sampling.sigma(500.75) == pytest.approx(expected, rel=1e-12)
    assert sd_sampling.sigma(0) == pytest.approx(float(table[0]), rel=1e-7)


def test_percent_to_sigma_maps_ends_to_infinity_and_zero(sd_sampling):
    assert sd_sampling.percent_to_sigma(0.0) > 1e8
    assert sd_sampling.percent_to_sigma(1.0) == 0.0
    assert sd_sampling.percent_to_sigma(0.5) == pytest.approx(sd_sampling.sigma(499.5), rel=1e-12)


def test_eps_denoised_is_x_minus_sigma_eps(sd_sampling):
    x, out = torch.tensor([2.0]), torch.tensor([0.5])
    assert sd_sampling.calculate_denoised(3.0, out, x).item() == pytest.approx(2.0 - 1.5)
    assert sd_sampling.c_in(3.0) == pytest.approx(1 / math.sqrt(10))


def test_v_prediction_inverts_the_v_target(gaussian):
    ms = DiscreteModelSampling(DiscreteConfig(prediction="v_prediction"))
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    for sigma in (0.05, 1.0, 14.0):
        torch.testing.assert_close(ms.calculate_denoised(sigma, gaussian.v(x, sigma), x), gaussian.denoise(x, sigma))


def test_noise_scaling_uses_sqrt_one_plus_sigma_squared_only_from_pure_noise(sd_sampling):
    latent, noise = torch.tensor([1.0]), torch.tensor([2.0])
    top = sd_sampling.sigma_max
    assert sd_sampling.is_max_denoise(top * (1 - 5e-6))
    assert not sd_sampling.is_max_denoise(8.0)
    full = sd_sampling.noise_scaling(top, noise, latent, max_denoise=True)
    assert full.item() == pytest.approx(1.0 + 2.0 * math.sqrt(1 + top**2))
    assert sd_sampling.noise_scaling(8.0, noise, latent).item() == pytest.approx(17.0)


def test_zero_terminal_snr_gives_comfyui_sigma_max():
    ms = DiscreteModelSampling(DiscreteConfig(zero_terminal_snr=True))
    assert ms.sigma_max == pytest.approx(4518.76, rel=1e-5)
    assert ms.sigma_min == pytest.approx(0.0291675, rel=1e-3)


def test_lcm_table_keeps_every_twentieth_timestep_and_applies_the_boundary_condition(sd_sampling):
    ms = LCMModelSampling()
    assert len(ms.sigmas) == 50
    assert ms.timestep(ms.sigma_max) == 999.0 and ms.timestep(ms.sigma_min) == 19.0
    assert ms.sigma_min == pytest.approx(float(sd_sampling.sigmas[19]), rel=1e-7)
    x, eps = torch.tensor([1.0]), torch.tensor([0.2])
    sigma = float(sd_sampling.sigmas[259])
    t = 2590.0
    c_skip, c_out = 0.25 / (t * t + 0.25), t / math.sqrt(t * t + 0.25)
    expected = c_out * (1.0 - sigma * 0.2) + c_skip * 1.0
    assert ms.calculate_denoised(sigma, eps, x).item() == pytest.approx(expected, rel=1e-6)


def test_lcm_sampling_reads_the_output_as_eps_whatever_the_base_prediction(sd_sampling):
    # ComfyUI's ModelSamplingDiscrete "lcm" replaces the prediction type: its LCM class is an eps one.
    v_based = LCMModelSampling(DiscreteConfig(prediction="v_prediction"))
    x, output = torch.tensor([1.0]), torch.tensor([0.2])
    sigma = float(sd_sampling.sigmas[259])
    assert v_based.calculate_denoised(sigma, output, x).item() == LCMModelSampling().calculate_denoised(
        sigma, output, x
    ).item()


def test_flow_table_and_scaling_follow_sd3():
    ms = FlowModelSampling()
    assert ms.sigma_min == pytest.approx(0.002994, rel=1e-3)
    assert ms.sigma_max == 1.0
    assert ms.timestep(0.25) == 250.0
    assert ms.percent_to_sigma(0.5) == pytest.approx(0.75)
    latent, noise = torch.tensor([1.0]), torch.tensor([3.0])
    noised = ms.noise_scaling(0.2, noise, latent)
    assert noised.item() == pytest.approx(0.2 * 3.0 + 0.8 * 1.0)
    assert ms.inverse_noise_scaling(0.2, torch.tensor([0.8])).item() == pytest.approx(1.0)
