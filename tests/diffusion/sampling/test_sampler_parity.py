"""Parity with diffusers' schedulers on identical sigmas (model-formats.md 9.3), driven by hand with the
exact Gaussian denoiser turned into the eps each scheduler expects. Tolerance 1e-5 in float32."""
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from gaussian_oracle import GaussianData

from diffusion.sampling.model_sampling import LCMModelSampling
from diffusion.sampling.noise import GaussianNoiseSampler
from diffusion.sampling.registry import run_sampler
from diffusion.sampling.samplers import sample_lcm
from diffusion.sampling.schedulers import calculate_sigmas, karras_sigmas

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _latent(sigma: float, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return 0.5 + torch.randn(batch, 4, 8, 8, generator=generator) * math.hypot(0.3, sigma)


def _drive_ve(scheduler, x: torch.Tensor, data: GaussianData, **step_kwargs) -> torch.Tensor:
    """Step a VE-space diffusers scheduler whose sigma table has been replaced by ours."""
    sample = x.clone()
    for t in scheduler.timesteps:
        scheduler.scale_model_input(sample, t)  # also sets step_index, which picks the sigma
        sigma = float(scheduler.sigmas[scheduler.step_index])
        sample = scheduler.step(data.eps(sample, sigma), t, sample, **step_kwargs).prev_sample
    return sample


def _own_sigmas(scheduler, sigmas: torch.Tensor) -> None:
    assert scheduler.sigmas.shape == sigmas.shape
    scheduler.sigmas = sigmas.clone()


def test_euler_matches_euler_discrete(sd_sampling, gaussian):
    sigmas = calculate_sigmas(sd_sampling, "normal", 10)
    scheduler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    scheduler.set_timesteps(10)
    torch.testing.assert_close(scheduler.sigmas, sigmas, rtol=3e-5, atol=0)
    _own_sigmas(scheduler, sigmas)
    x = _latent(float(sigmas[0]))
    ours = run_sampler("euler", gaussian, x.clone(), sigmas, seed=0)
    torch.testing.assert_close(ours, _drive_ve(scheduler, x, gaussian), **TOLERANCE)


def test_euler_ancestral_matches_with_the_same_noise(sd_sampling, gaussian):
    sigmas = calculate_sigmas(sd_sampling, "normal", 10)
    scheduler = EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace")
    scheduler.set_timesteps(10)
    _own_sigmas(scheduler, sigmas)
    x = _latent(float(sigmas[0]), batch=1)  # batch position 0's step noise is the plain seeded stream
    ours = run_sampler("euler_ancestral", gaussian, x.clone(), sigmas, seed=7)
    theirs = _drive_ve(scheduler, x, gaussian, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


def test_heun_matches_heun_discrete(sd_sampling, gaussian):
    sigmas = calculate_sigmas(sd_sampling, "normal", 10)
    scheduler = HeunDiscreteScheduler(**SD, timestep_spacing="linspace")
    scheduler.set_timesteps(10)
    _own_sigmas(scheduler, torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]))
    x = _latent(float(sigmas[0]))
    ours = run_sampler("heun", gaussian, x.clone(), sigmas, seed=0)
    torch.testing.assert_close(ours, _drive_ve(scheduler, x, gaussian), **TOLERANCE)


def test_lms_matches_lms_discrete_before_the_final_jump(sd_sampling, gaussian):
    # diffusers integrates the last interval to 0 where ComfyUI jumps to D: compare down to sigma_min.
    sigmas = karras_sigmas(12, sd_sampling.sigma_min, sd_sampling.sigma_max)[:-1]
    scheduler = LMSDiscreteScheduler(**SD)
    scheduler.set_timesteps(11)
    _own_sigmas(scheduler, sigmas)
    x = _latent(float(sigmas[0]))
    ours = run_sampler("lms", gaussian, x.clone(), sigmas, seed=0)
    torch.testing.assert_close(ours, _drive_ve(scheduler, x, gaussian), **TOLERANCE)


def _drive_vp(scheduler, sigmas: torch.Tensor, x: torch.Tensor, data: GaussianData) -> torch.Tensor:
    """Step a VP-space scheduler: its sample is x / sqrt(1 + sigma^2); return the result in VE units."""
    sample = x / math.sqrt(1.0 + float(sigmas[0]) ** 2)
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(sigmas[i])
        x_ve = sample * math.sqrt(1.0 + sigma**2)
        sample = scheduler.step(data.eps(x_ve, sigma), t, sample).prev_sample
    return sample * math.sqrt(1.0 + float(sigmas[-1]) ** 2)


def test_dpmpp_2m_matches_dpm_solver_multistep(sd_sampling, gaussian):
    sigmas = calculate_sigmas(sd_sampling, "karras", 12)
    scheduler = DPMSolverMultistepScheduler(
        **SD, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", use_karras_sigmas=True,
        final_sigmas_type="zero", lower_order_final=True,
    )
    scheduler.set_timesteps(12)
    torch.testing.assert_close(scheduler.sigmas, sigmas, rtol=3e-5, atol=0)
    _own_sigmas(scheduler, sigmas)
    x = _latent(float(sigmas[0]))
    ours = run_sampler("dpmpp_2m", gaussian, x.clone(), sigmas, seed=0)
    torch.testing.assert_close(ours, _drive_vp(scheduler, sigmas, x, gaussian), **TOLERANCE)


@pytest.mark.parametrize(("name", "solver_type"), [("uni_pc", "bh1"), ("uni_pc_bh2", "bh2")])
def test_uni_pc_matches_unipc_multistep(sd_sampling, gaussian, name, solver_type):
    sigmas = calculate_sigmas(sd_sampling, "karras", 10)
    sigmas[-1] = 0.001  # ComfyUI's uni_pc ends there; give diffusers the same last sigma
    scheduler = UniPCMultistepScheduler(
        **SD, solver_order=3, solver_type=solver_type, predict_x0=True, lower_order_final=True,
        use_karras_sigmas=True,
    )
    scheduler.set_timesteps(10)
    _own_sigmas(scheduler, sigmas)
    x = _latent(float(sigmas[0]))
    ours = run_sampler(name, gaussian, x.clone(), sigmas, seed=0)
    torch.testing.assert_close(ours, _drive_vp(scheduler, sigmas, x, gaussian), **TOLERANCE)


def _table_alphas_cumprod(sd_sampling) -> torch.Tensor:
    return 1.0 / (sd_sampling.sigmas.double() ** 2 + 1.0)


def test_ddim_matches_ddim_scheduler_with_alpha_one_at_the_end(sd_sampling, gaussian):
    sigmas = calculate_sigmas(sd_sampling, "ddim_uniform", 10)
    scheduler = DDIMScheduler(
        **SD, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True, clip_sample=False
    )
    scheduler.alphas_cumprod = _table_alphas_cumprod(sd_sampling).float()
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == list(range(901, 0, -100))
    x = _latent(float(sigmas[0]))
    ours = run_sampler("ddim", gaussian, x.clone(), sigmas, seed=0)
    torch.testing.assert_close(ours, _drive_vp(scheduler, sigmas, x, gaussian), **TOLERANCE)


def test_lcm_matches_lcm_scheduler_with_the_same_noise(sd_sampling, gaussian):
    ms = LCMModelSampling()
    scheduler = LCMScheduler(**SD)
    scheduler.alphas_cumprod = _table_alphas_cumprod(sd_sampling).float()
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == [999, 759, 499, 259]
    sigmas = torch.tensor([float(sd_sampling.sigmas[t]) for t in timesteps] + [0.0])
    x = _latent(float(sigmas[0]), batch=1)

    def lcm_denoiser(x_ve, sigma):
        return ms.calculate_denoised(sigma, gaussian.eps(x_ve, sigma), x_ve)

    ours = sample_lcm(lcm_denoiser, x.clone(), sigmas, noise=GaussianNoiseSampler(x, 3), model_sampling=ms)
    generator = torch.Generator().manual_seed(3)
    sample = x / math.sqrt(1.0 + float(sigmas[0]) ** 2)
    for i, t in enumerate(timesteps):
        sigma = float(sigmas[i])
        eps = gaussian.eps(sample * math.sqrt(1.0 + sigma**2), sigma)
        sample = scheduler.step(eps, t, sample, generator=generator).prev_sample
    torch.testing.assert_close(ours, sample, **TOLERANCE)


def test_plms_matches_pndm_without_runge_kutta_steps(sd_sampling, gaussian):
    # SD1's folder default: PNDM with skip_prk_steps, which repeats its second timestep (the first step
    # evaluates twice, Heun-like); the table sigmas of its distinct timesteps, then 0 (set_alpha_to_one).
    scheduler = PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1)
    scheduler.alphas_cumprod = _table_alphas_cumprod(sd_sampling).float()
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps[:3] == [901, 801, 801]
    distinct = [t for i, t in enumerate(timesteps) if i == 0 or t != timesteps[i - 1]]
    sigmas = torch.tensor([float(sd_sampling.sigmas[t]) for t in distinct] + [0.0])
    x = _latent(float(sigmas[0]))
    ours = run_sampler("plms", gaussian, x.clone(), sigmas, seed=0)
    sample = x / math.sqrt(1.0 + float(sigmas[0]) ** 2)
    for t in timesteps:
        sigma = float(sd_sampling.sigmas[t])
        eps = gaussian.eps(sample * math.sqrt(1.0 + sigma**2), sigma)
        sample = scheduler.step(eps, t, sample).prev_sample
    torch.testing.assert_close(ours, sample, **TOLERANCE)
