"""Rectified-flow (SD3) sampling on the exact flow Gaussian denoiser (model-formats.md 8.6, 10.5)."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from gaussian_oracle import FlowGaussianData

from diffusion.sampling.model_sampling import FlowModelSampling
from diffusion.sampling.registry import run_sampler
from diffusion.sampling.sample import SamplingModel, sample_custom
from diffusion.sampling.schedulers import calculate_sigmas

FLOW = FlowModelSampling()


def _noise(shape=(1, 4, 8, 8), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_flow_euler_equals_diffusers_flow_match_euler():
    data = FlowGaussianData()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(20)
    sigmas = calculate_sigmas(FLOW, "normal", 20)
    x = _noise()
    ours = run_sampler("euler", data, x.clone(), sigmas, seed=0, model_sampling=FLOW)
    sample = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(data.velocity(sample, float(scheduler.sigmas[i])), t, sample).prev_sample
    torch.testing.assert_close(ours, sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "order"), [("euler", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_flow_ode_samplers_converge_at_their_order(name, order):
    data = FlowGaussianData()
    x = _noise((64,)).double()
    errors = []
    for n in (64, 128):
        sigmas = torch.tensor(calculate_sigmas(FLOW, "normal", n).tolist()[:-1], dtype=torch.float64)
        out = run_sampler(name, data, x.clone(), sigmas, seed=0, model_sampling=FLOW)
        errors.append((out - data.ode_solution(x, float(sigmas[0]), float(sigmas[-1]))).abs().max().item())
    assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.15)


@pytest.mark.parametrize(
    ("name", "steps", "bias"),
    # The std's discretisation bias, measured on other seeds: euler_ancestral -0.028, -0.014, -0.0077 at
    # 100, 200, 400 steps (1st order); dpmpp_2s_ancestral -0.015, -0.0047, 0.0000 at 50, 100, 200;
    # dpmpp_2m_sde +0.029, +0.0075, +0.0015 and its Heun form +0.052, +0.012, +0.0022 at 100, 200, 400;
    # dpmpp_3m_sde +0.052, +0.0042, -0.0001 (it overshoots at few steps on "normal" schedules in VE too).
    [
        ("euler_ancestral", 400, 0.012),
        ("dpmpp_2s_ancestral", 200, 0.003),
        ("dpmpp_2m_sde", 400, 0.004),
        ("dpmpp_2m_sde_heun", 400, 0.005),
        ("dpmpp_3m_sde", 400, 0.004),
    ],
)
def test_flow_stochastic_samplers_sample_the_data_distribution(name, steps, bias):
    data = FlowGaussianData()
    x = _noise((4, 4096), seed=1)
    out = run_sampler(name, data, x, calculate_sigmas(FLOW, "normal", steps), seed=2, model_sampling=FLOW)
    elements = x.numel()
    assert abs(out.mean().item() - data.mu) < 4 * data.s / math.sqrt(elements)
    assert abs(out.std().item() - data.s) < 4 * data.s / math.sqrt(2 * elements) + bias


def test_flow_sampling_starts_by_interpolating_noise_and_latent():
    data = FlowGaussianData()

    def network(x_in, timestep, context, y=None):
        sigma = float(timestep[0]) / 1000.0
        return data.velocity(x_in, sigma)

    latent = torch.full((1, 4, 8, 8), 0.2)
    seen = []
    sigmas = torch.tensor([0.75, 0.5])
    model = SamplingModel(network, FLOW)
    cond = [[torch.zeros(1, 4, 8), {}]]
    result = sample_custom(
        model, cond, cond, latent, sigmas, "euler", seed=4, cfg=1.0, callback=lambda i, n, x, d: seen.append(x)
    )
    noise = _noise(seed=4)
    torch.testing.assert_close(seen[0], 0.75 * noise + 0.25 * latent)
    # Sampling stopped at sigma 0.5: the result is the Euler step divided by (1 - 0.5).
    step = seen[0] + data.velocity(seen[0], 0.75) * (0.5 - 0.75)
    torch.testing.assert_close(result.samples, step / 0.5)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_flow_sde_samplers_start_at_the_sigma_of_percent_1e_4(name):
    # log-SNR is infinite at sigma 1; ComfyUI moves the first sigma to percent_to_sigma(1e-4)
    # (0.99996667 at shift 3), while the Brownian tree still spans up to 1.
    data = FlowGaussianData()
    seen = []

    def denoiser(x, sigma):
        seen.append(sigma)
        return data.denoise(x, sigma)

    run_sampler(name, denoiser, _noise(), calculate_sigmas(FLOW, "normal", 4), seed=2, model_sampling=FLOW)
    # The schedule is float32, as ComfyUI's is.
    assert seen[0] == pytest.approx(FLOW.percent_to_sigma(1e-4), rel=1e-7)
    assert seen[0] == pytest.approx(2.9997 / 2.9998, rel=1e-7)


def test_uni_pc_result_is_unscaled_at_the_sigma_it_stops_at():
    # uni_pc ends at sigma 0.001, not 0; like ComfyUI, the flow result is divided by (1 - 0.001) there.
    data = FlowGaussianData()

    def network(x_in, timestep, context, y=None):
        return data.velocity(x_in, float(timestep[0]) / 1000.0)

    sigmas = calculate_sigmas(FLOW, "normal", 6)
    cond = [[torch.zeros(1, 4, 8), {}]]
    result = sample_custom(SamplingModel(network, FLOW), cond, cond, torch.zeros(1, 4, 8, 8), sigmas, "uni_pc",
                           seed=4, cfg=1.0)
    raw = run_sampler("uni_pc", data, _noise(seed=4), sigmas, seed=4, model_sampling=FLOW)
    torch.testing.assert_close(result.samples, raw / (1.0 - 0.001))
