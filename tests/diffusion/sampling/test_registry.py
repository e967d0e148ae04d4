"""The sampler registry: ComfyUI's names in its COMBO order, each running through the KSampler path."""
import math

import pytest
import torch
from gaussian_oracle import GaussianData, GaussianEpsNetwork

from diffusion.sampling import SAMPLER_NAMES
from diffusion.sampling.model_sampling import DiscreteConfig, DiscreteModelSampling
from diffusion.sampling.registry import get_sampler, run_sampler
from diffusion.sampling.sample import SamplingModel, sample

# ComfyUI's KSampler list (model-formats.md 9.2), then plms, which only diffusers has.
EXPECTED_NAMES = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2", "plms",
)


def test_sampler_names_follow_comfyui_combo_order():
    assert SAMPLER_NAMES == EXPECTED_NAMES


def test_unknown_sampler_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown sampler 'eulr'; expected one of euler, euler_cfg_pp"):
        get_sampler("eulr")


# lcm assumes a consistency model, not a plain denoiser; test_stochastic_samplers covers it with one.
@pytest.mark.parametrize("name", [name for name in SAMPLER_NAMES if name != "lcm"])
def test_every_sampler_turns_pure_noise_into_the_data_distribution(sd_sampling, name):
    data = GaussianData()
    network = GaussianEpsNetwork(data, sd_sampling)
    model = SamplingModel(network, sd_sampling)
    cond = [[torch.zeros(1, 77, 16), {}]]
    latent = torch.zeros(4, 4, 16, 16)
    out = sample(model, cond, cond, latent, seed=1, steps=24, cfg=1.0, sampler_name=name, scheduler="karras")
    elements = out.numel()
    # 4 standard errors of the mean, and a 0.05 allowance on the std for 24-step discretisation and the
    # integer timesteps the stand-in network is fed (as a real UNet is).
    assert abs(out.mean().item() - data.mu) < 4 * data.s / math.sqrt(elements) + 0.005
    assert abs(out.std().item() - data.s) < 0.05


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_v_prediction_model_samples_like_the_equivalent_eps_model(sd_sampling, name):
    data = GaussianData()
    v_sampling = DiscreteModelSampling(DiscreteConfig(prediction="v_prediction"))

    def v_network(x_in, timestep, context, y=None):
        sigma = v_sampling.sigma(float(timestep[0]))
        return data.v(x_in / v_sampling.c_in(sigma), sigma)

    cond = [[torch.zeros(1, 77, 16), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    options = dict(seed=2, steps=10, cfg=1.0, sampler_name=name, scheduler="normal")
    eps_out = sample(SamplingModel(GaussianEpsNetwork(data, sd_sampling), sd_sampling), cond, cond, latent, **options)
    v_out = sample(SamplingModel(v_network, v_sampling), cond, cond, latent, **options)
    torch.testing.assert_close(v_out, eps_out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_a_single_sigma_leaves_the_sample_untouched_without_model_calls(sd_sampling, name):
    # A one-entry schedule (e.g. SplitSigmas at the last step) has no step to take, as in ComfyUI.
    calls = []

    def denoiser(x, sigma):
        calls.append(sigma)
        return x

    x = torch.randn(1, 4, 8, 8)
    for sigmas in (torch.tensor([3.0]), torch.tensor([0.0])):
        assert run_sampler(name, denoiser, x, sigmas, seed=1, model_sampling=sd_sampling) is x
    assert calls == []


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_dpm_solver_samplers_name_their_two_step_minimum(sd_sampling, name):
    # They integrate from sigmas[0] to the last nonzero sigma: one step [sigma_max, 0] is an empty range.
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=f"{name} needs at least 2 steps"):
        run_sampler(name, GaussianData(), x, torch.tensor([14.6, 0.0]), seed=1, model_sampling=sd_sampling)
