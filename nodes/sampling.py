"""Sampling nodes: KSampler, KSamplerAdvanced, ComfyUI's decomposed custom-sampling family, and the step nodes
that let a user build a sampler loop out of nodes.

The decomposed family passes small values between nodes: NOISE (`Noise`), SAMPLER (`Sampler`), GUIDER
(`Guider`) and SIGMAS (a 1-D float32 tensor, descending, usually ending in 0). Every sampler node takes a
LATENT dict, runs the model on the compute device (nodes/runtime.py) in float32 and returns a new LATENT
dict whose `samples` are float32 on the CPU; the other keys (`noise_mask`, `batch_index`, ...) are copied.
`noise_mask` makes the run inpaint and `batch_index` picks each item's noise (diffusion/sampling/sample.py);
on an inpainting checkpoint (9-channel UNet) the noise mask and the latent are also the model's extra input
channels, and without a noise mask it sees an all-ones mask and the checkpoint's grey-image latent
(diffusion/inpaint.py).

A sampler loop out of nodes (our own, category "sampling/custom"): `InitialNoisyLatent` noises a latent to
sigmas[0] exactly as the samplers start (from pure noise the noise is scaled by sqrt(1 + sigma^2), 8.4),
then per step i `UNetDenoiseStep(..., latent=x_i, sigmas, step=i)` gives the denoised estimate D(x_i, sigma_i)
and `EulerStep(x_i, D, sigmas, step=i)` moves x to sigma_{i+1}. Every value stays in LATENT units (raw VAE
latents): the model's latent format is affine and an Euler step is an affine combination of x and D, so a
step in LATENT units equals the step in the denoiser's space. After the last step (sigma 0) x is the image
latent, and N such pairs equal the `euler` sampler. Any other update rule can be built from the same
denoised outputs with ordinary latent math nodes.
"""
from __future__ import annotations

import logging

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from diffusion.inpaint import INPAINT_CONCAT_CHANNELS, inpaint_concat
from diffusion.sampling import (SAMPLER_NAMES, SCHEDULER_NAMES, SampleOutput, SamplingModel, initial_noise,
                                karras_sigmas, ksampler_sigmas, sample, sample_custom)
from diffusion.sampling.denoiser import StepCallback, to_d
from diffusion.sampling.noise import MAX_SEED
from diffusion.sampling.schedulers import (beta_sigmas, exponential_sigmas, laplace_sigmas, polyexponential_sigmas,
                                           sd_turbo_sigmas, vp_sigmas)
from engine import Boolean, Combo, ExecutionContext, Float, Int, RunSettings, Socket, node
from nodes.previews import sampling_progress
from nodes.runtime import compute_device, model_manager
from nodes.values import ModelHandle

Conditioning = Sequence[Sequence[Any]]
Latent = Mapping[str, Any]

SAMPLING = "sampling"
CUSTOM_SAMPLING = "sampling/custom_sampling"
STEP_NODES = "sampling/custom"

# ComfyUI's widget ranges, shared by several nodes.
SEED = Int(0, min=0, max=MAX_SEED, control_after_generate=True)
STEPS = Int(20, min=1, max=10000)
CFG = Float(8.0, min=0.0, max=100.0, step=0.1, round=0.01)
DENOISE = Float(1.0, min=0.0, max=1.0, step=0.01)
SIGMA_MAX = Float(14.614642, min=0.0, max=5000.0, step=0.01)
SIGMA_MIN = Float(0.0291675, min=0.0, max=5000.0, step=0.01)
STEP_INDEX = Int(0, min=0, max=10000)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Noise:
    """NOISE: the starting noise of a run. `seed` also seeds the per-step noise of stochastic samplers;
    disabled noise (DisableNoise) starts from the latent itself, for a second pass over a noisy latent."""

    seed: int = 0
    enabled: bool = True


@dataclass(frozen=True)
class Sampler:
    """SAMPLER: a sampler by its ComfyUI name (diffusion.sampling.SAMPLER_NAMES) and keyword options for its
    function (eta, s_noise, ...) set by the parameterised sampler nodes."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, eq=False)
class Guider:
    """GUIDER: what the denoiser is at each step: the model, its prompts and the CFG scale. A BasicGuider has
    no negative prompt and runs at cfg 1 (one model call per step)."""

    model: ModelHandle
    positive: Conditioning
    negative: Conditioning | None
    cfg: float


# --- checks and the shared run -----------------------------------------------------------------------------


def _require(value: Any, kind: type, node_name: str, input_name: str, type_name: str) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"{node_name}: {input_name} must be a {type_name} value, got {type(value).__name__}")


def _latent_samples(node_name: str, input_name: str, latent: Latent, model: ModelHandle | None) -> Tensor:
    if not isinstance(latent, Mapping) or not isinstance(latent.get("samples"), Tensor):
        raise ValueError(f"{node_name}: {input_name} must be a LATENT dict with a 'samples' tensor")
    samples = latent["samples"]
    if samples.dim() != 4:
        raise ValueError(f"{node_name}: {input_name} samples must be [B, C, H, W], got shape {list(samples.shape)}")
    channels = getattr(getattr(model.unet, "config", None), "in_channels", None) if model is not None else None
    if channels is not None:
        channels -= model.concat_channels  # an inpainting UNet's mask and masked-image channels
    if channels is not None and samples.shape[1] != channels:
        raise ValueError(f"{node_name}: {input_name} has {samples.shape[1]} latent channels but the model takes "
                         f"{channels} (a latent made for another model family?)")
    return samples


def _checked_sigmas(node_name: str, sigmas: Any, input_name: str = "sigmas", *, allow_empty: bool = False) -> Tensor:
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1:
        raise ValueError(f"{node_name}: {input_name} must be a 1-D SIGMAS tensor")
    if sigmas.numel() == 0 and not allow_empty:
        raise ValueError(f"{node_name}: {input_name} is empty: there is no noise level to sample from "
                         "(BasicScheduler at denoise 0, or SplitSigmas past the last step?)")
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        raise ValueError(f"{node_name}: {input_name} must be finite and non-negative, got {sigmas.tolist()}")
    return sigmas.detach().float().cpu()


def _require_positive(node_name: str, why: str = "", **values: float) -> None:
    for name, value in values.items():
        if value <= 0.0:
            reason = f" ({why})" if why else ""
            raise ValueError(f"{node_name}: {name} must be positive{reason}, got {value}")


def _checked_sampler(node_name: str, sampler: Any) -> Sampler:
    _require(sampler, Sampler, node_name, "sampler", "SAMPLER")
    if sampler.name not in SAMPLER_NAMES:
        raise ValueError(f"{node_name}: sampler {sampler.name!r} is not available; known: {', '.join(SAMPLER_NAMES)}")
    return sampler


def _with_samples(latent: Latent, samples: Tensor) -> dict[str, Any]:
    """A new LATENT with `samples` replaced (CPU float32) and every other key kept."""
    return {**latent, "samples": samples.to("cpu", torch.float32)}


def _settings(context: ExecutionContext | None) -> RunSettings:
    return context.settings if context is not None else RunSettings()


# run(sampling model, samples on the device, noise_mask, batch_index, step callback) -> SampleOutput
SamplingRun = Callable[[SamplingModel, Tensor, "Tensor | None", "list[int] | None", "StepCallback | None"],
                       SampleOutput]


def run_sampling(node_name: str, model: ModelHandle, latent: Latent, context: ExecutionContext | None,
                 run: SamplingRun, input_name: str = "latent_image") -> tuple[dict[str, Any], dict[str, Any]]:
    """(output, denoised_output) LATENTs of one sampler run of `model` on `latent`, on the compute device."""
    samples = _latent_samples(node_name, input_name, latent, model)
    settings = _settings(context)
    device = compute_device(settings)
    batch_index = latent.get("batch_index")
    samples = samples.to(device, torch.float32)
    concat = _concat_conditioning(node_name, input_name, model, samples, latent.get("noise_mask"))
    with model.sampling_model(model_manager(settings)) as sampling_model, torch.no_grad():
        sampling_model = replace(sampling_model, concat=concat)
        result = run(sampling_model, samples, latent.get("noise_mask"),
                     list(batch_index) if batch_index is not None else None, sampling_progress(context, model))
    return _with_samples(latent, result.samples), _with_samples(latent, result.denoised)


def _concat_conditioning(node_name: str, input_name: str, model: ModelHandle, samples: Tensor,
                         noise_mask: Tensor | None) -> Tensor | None:
    """An inpainting model's extra input (mask + masked-image latent) from the LATENT, else None."""
    if model.concat_channels == 0:
        return None
    if model.concat_channels != INPAINT_CONCAT_CHANNELS:
        raise ValueError(f"{node_name}: the model takes {model.concat_channels} input channels beyond the latent's; "
                         f"only inpainting models ({INPAINT_CONCAT_CHANNELS}: mask + masked image) are supported")
    try:
        return inpaint_concat(samples, noise_mask, model.latent_format, model.inpaint_blank_latent)
    except ValueError as error:
        raise ValueError(f"{node_name}: {input_name}: {error}") from None


def _run_custom(node_name: str, guider: Guider, sampler: Sampler, sigmas: Tensor, noise: Noise, latent: Latent,
                context: ExecutionContext | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if sigmas.numel() == 0:
        # As ComfyUI: an empty schedule (SplitSigmas at the last step, a denoise of 0) samples nothing and
        # passes the latent through, which two-stage workflows rely on to switch a stage off.
        log.warning("%s: sigmas is empty, so the latent passes through unsampled", node_name)
        samples = _latent_samples(node_name, "latent_image", latent, guider.model)
        return _with_samples(latent, samples), _with_samples(latent, samples)
    def run(model: SamplingModel, samples: Tensor, noise_mask: Tensor | None, batch_index: list[int] | None,
            callback: StepCallback | None) -> SampleOutput:
        return sample_custom(model, guider.positive, guider.negative, samples, sigmas, sampler.name,
                             seed=noise.seed, cfg=guider.cfg, add_noise=noise.enabled, noise_mask=noise_mask,
                             batch_index=batch_index, callback=callback, sampler_options=dict(sampler.options))

    return run_sampling(node_name, guider.model, latent, context, run)


# --- KSampler ----------------------------------------------------------------------------------------------


def _ksample(node_name: str, model: ModelHandle, latent: Latent, context: ExecutionContext | None,
             **options: Any) -> dict[str, Any]:
    def run(sampling_model: SamplingModel, samples: Tensor, noise_mask: Tensor | None,
            batch_index: list[int] | None, callback: StepCallback | None) -> SampleOutput:
        result = sample(sampling_model, latent=samples, noise_mask=noise_mask, batch_index=batch_index,
                        callback=callback, **options)
        return SampleOutput(result, result)

    return run_sampling(node_name, model, latent, context, run)[0]


@node(category=SAMPLING, outputs=[("LATENT", "LATENT")],
      description="Denoises a latent with a named sampler and scheduler; denoise < 1 keeps part of the input.")
def KSampler(model: Socket("MODEL"), seed: SEED, steps: STEPS, cfg: CFG,
             sampler_name: Combo(SAMPLER_NAMES), scheduler: Combo(SCHEDULER_NAMES),
             positive: Socket("CONDITIONING"), negative: Socket("CONDITIONING"),
             latent_image: Socket("LATENT"), denoise: DENOISE, *,
             context: ExecutionContext | None = None) -> tuple:
    return (_ksample("KSampler", model, latent_image, context, positive=positive, negative=negative, seed=seed,
                     steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, denoise=denoise),)


@node(category=SAMPLING, outputs=[("LATENT", "LATENT")],
      description="KSampler over a window [start_at_step, end_at_step) of the schedule, with or without adding "
                  "noise and with or without the leftover noise: chain two for a two-stage run.")
def KSamplerAdvanced(model: Socket("MODEL"), add_noise: Combo(["enable", "disable"]), noise_seed: SEED,
                     steps: STEPS, cfg: CFG, sampler_name: Combo(SAMPLER_NAMES),
                     scheduler: Combo(SCHEDULER_NAMES), positive: Socket("CONDITIONING"),
                     negative: Socket("CONDITIONING"), latent_image: Socket("LATENT"),
                     start_at_step: Int(0, min=0, max=10000), end_at_step: Int(10000, min=0, max=10000),
                     return_with_leftover_noise: Combo(["disable", "enable"]), *,
                     context: ExecutionContext | None = None) -> tuple:
    return (_ksample("KSamplerAdvanced", model, latent_image, context, positive=positive, negative=negative,
                     seed=noise_seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                     add_noise=add_noise == "enable", start_step=start_at_step, last_step=end_at_step,
                     force_full_denoise=return_with_leftover_noise == "disable"),)


# --- the decomposed family: noise, sampler, guider, schedules ----------------------------------------------


@node(category=f"{CUSTOM_SAMPLING}/noise", outputs=[("NOISE", "NOISE")])
def RandomNoise(noise_seed: SEED) -> tuple:
    """Gaussian starting noise from a seed (ComfyUI's CPU seeding, so seeds reproduce its images)."""
    return (Noise(noise_seed),)


@node(category=f"{CUSTOM_SAMPLING}/noise", outputs=[("NOISE", "NOISE")])
def DisableNoise() -> tuple:
    """No starting noise: sample the latent as it is (its own noise left by an earlier pass)."""
    return (Noise(0, enabled=False),)


@node(category=f"{CUSTOM_SAMPLING}/samplers", outputs=[("SAMPLER", "SAMPLER")])
def KSamplerSelect(sampler_name: Combo(SAMPLER_NAMES)) -> tuple:
    """A sampler by name, for SamplerCustom and SamplerCustomAdvanced."""
    return (Sampler(sampler_name),)


# The stochastic samplers' own nodes: eta scales the fresh noise of each step (0 makes them deterministic),
# s_noise its amount; noise_device "gpu" draws the Brownian tree on the sampling device, as ComfyUI does.
ETA = Float(1.0, min=0.0, max=100.0, step=0.01)
S_NOISE = Float(1.0, min=0.0, max=100.0, step=0.01)
NOISE_DEVICE = Combo(["gpu", "cpu"])


def _on_device(name: str, noise_device: str) -> str:
    return f"{name}_gpu" if noise_device == "gpu" else name


@node(category=f"{CUSTOM_SAMPLING}/samplers", outputs=[("SAMPLER", "SAMPLER")])
def SamplerEulerAncestral(eta: ETA, s_noise: S_NOISE) -> tuple:
    """euler_ancestral with its noise options."""
    return (Sampler("euler_ancestral", (("eta", eta), ("s_noise", s_noise))),)


@node(category=f"{CUSTOM_SAMPLING}/samplers", outputs=[("SAMPLER", "SAMPLER")])
def SamplerEulerAncestralCFGPP(eta: Float(1.0, min=0.0, max=1.0, step=0.01),
                               s_noise: Float(1.0, min=0.0, max=10.0, step=0.01)) -> tuple:
    """euler_ancestral_cfg_pp with its noise options."""
    return (Sampler("euler_ancestral_cfg_pp", (("eta", eta), ("s_noise", s_noise))),)


@node(category=f"{CUSTOM_SAMPLING}/samplers", outputs=[("SAMPLER", "SAMPLER")])
def SamplerDPMPP_2S_Ancestral(eta: ETA, s_noise: S_NOISE) -> tuple:
    """dpmpp_2s_ancestral with its noise options."""
    return (Sampler("dpmpp_2s_ancestral", (("eta", eta), ("s_noise", s_noise))),)


@node(category=f"{CUSTOM_SAMPLING}/samplers", outputs=[("SAMPLER", "SAMPLER")])
def SamplerDPMPP_SDE(eta: ETA, s_noise: S_NOISE, r: Float(0.5, min=0.0, max=100.0, step=0.01),
                     noise_device: NOISE_DEVICE) -> tuple:
    """dpmpp_sde with its noise options and the position r of its intermediate step."""
    return (Sampler(_on_device("dpmpp_sde", noise_device), (("eta", eta), ("s_noise", s_noise), ("r", r))),)


@node(category=f"{CUSTOM_SAMPLING}/samplers", outputs=[("SAMPLER", "SAMPLER")])
def SamplerDPMPP_2M_SDE(solver_type: Combo(["midpoint", "heun"]), eta: ETA, s_noise: S_NOISE,
                        noise_device: NOISE_DEVICE) -> tuple:
    """dpmpp_2m_sde with its second-order correction (midpoint or heun) and noise options."""
    options = (("solver_type", solver_type), ("eta", eta), ("s_noise", s_noise))
    return (Sampler(_on_device("dpmpp_2m_sde", noise_device), options),)


@node(category=f"{CUSTOM_SAMPLING}/samplers", outputs=[("SAMPLER", "SAMPLER")])
def SamplerDPMPP_3M_SDE(eta: ETA, s_noise: S_NOISE, noise_device: NOISE_DEVICE) -> tuple:
    """dpmpp_3m_sde with its noise options."""
    return (Sampler(_on_device("dpmpp_3m_sde", noise_device), (("eta", eta), ("s_noise", s_noise))),)


@node(category=f"{CUSTOM_SAMPLING}/samplers", outputs=[("SAMPLER", "SAMPLER")])
def SamplerLMS(order: Int(4, min=1, max=100)) -> tuple:
    """lms with the number of past slopes it combines."""
    return (Sampler("lms", (("order", order),)),)


@node(category=f"{CUSTOM_SAMPLING}/guiders", outputs=[("GUIDER", "GUIDER")])
def CFGGuider(model: Socket("MODEL"), positive: Socket("CONDITIONING"), negative: Socket("CONDITIONING"),
              cfg: CFG) -> tuple:
    """Classifier-free guidance: D = D_uncond + cfg * (D_cond - D_uncond)."""
    return (Guider(model, positive, negative, cfg),)


@node(category=f"{CUSTOM_SAMPLING}/guiders", outputs=[("GUIDER", "GUIDER")])
def BasicGuider(model: Socket("MODEL"), conditioning: Socket("CONDITIONING")) -> tuple:
    """The conditional prediction alone (no negative prompt, one model call per step): for distilled models."""
    return (Guider(model, conditioning, None, 1.0),)


@node(category=f"{CUSTOM_SAMPLING}/schedulers", outputs=[("SIGMAS", "SIGMAS")])
def BasicScheduler(model: Socket("MODEL"), scheduler: Combo(SCHEDULER_NAMES), steps: STEPS,
                   denoise: DENOISE) -> tuple:
    """A named schedule on the model's noise levels; denoise d < 1 keeps the last steps of int(steps / d)."""
    # KSampler's schedule minus its dpm_2/uni_pc extra sigma, which "euler" never asks for.
    return (ksampler_sigmas(model.model_sampling, scheduler, "euler", steps, denoise),)


@node(category=f"{CUSTOM_SAMPLING}/schedulers", outputs=[("SIGMAS", "SIGMAS")])
def BetaSamplingScheduler(model: Socket("MODEL"), steps: STEPS, alpha: Float(0.6, min=0.0, max=50.0, step=0.01),
                          beta: Float(0.6, min=0.0, max=50.0, step=0.01)) -> tuple:
    """Timesteps at Beta(alpha, beta) quantiles (Lee et al. 2024); the "beta" scheduler at 0.6, 0.6."""
    _require_positive("BetaSamplingScheduler", alpha=alpha, beta=beta)
    return (beta_sigmas(model.model_sampling, steps, alpha, beta),)


@node(category=f"{CUSTOM_SAMPLING}/schedulers", outputs=[("SIGMAS", "SIGMAS")])
def KarrasScheduler(steps: STEPS, sigma_max: SIGMA_MAX, sigma_min: SIGMA_MIN,
                    rho: Float(7.0, min=0.0, max=100.0, step=0.01)) -> tuple:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho)."""
    _require_positive("KarrasScheduler", rho=rho)
    return (karras_sigmas(steps, sigma_min, sigma_max, rho),)


def _positive_sigma_range(node_name: str, sigma_max: float, sigma_min: float) -> None:
    _require_positive(node_name, "the schedule is spaced in log sigma", sigma_max=sigma_max, sigma_min=sigma_min)


@node(category=f"{CUSTOM_SAMPLING}/schedulers", outputs=[("SIGMAS", "SIGMAS")])
def ExponentialScheduler(steps: STEPS, sigma_max: SIGMA_MAX, sigma_min: SIGMA_MIN) -> tuple:
    """Evenly spaced in log sigma."""
    _positive_sigma_range("ExponentialScheduler", sigma_max, sigma_min)
    return (exponential_sigmas(steps, sigma_min, sigma_max),)


@node(category=f"{CUSTOM_SAMPLING}/schedulers", outputs=[("SIGMAS", "SIGMAS")])
def PolyexponentialScheduler(steps: STEPS, sigma_max: SIGMA_MAX, sigma_min: SIGMA_MIN,
                             rho: Float(1.0, min=0.0, max=100.0, step=0.01)) -> tuple:
    """k-diffusion's polyexponential schedule: log sigma falls as (1 - i/(n-1))^rho; rho 1 is exponential."""
    _positive_sigma_range("PolyexponentialScheduler", sigma_max, sigma_min)
    return (polyexponential_sigmas(steps, sigma_min, sigma_max, rho),)


@node(category=f"{CUSTOM_SAMPLING}/schedulers", outputs=[("SIGMAS", "SIGMAS")])
def VPScheduler(steps: STEPS, beta_d: Float(19.9, min=0.0, max=5000.0, step=0.01),
                beta_min: Float(0.1, min=0.0, max=5000.0, step=0.01),
                eps_s: Float(0.001, min=0.0, max=1.0, step=0.0001)) -> tuple:
    """The variance-preserving SDE's noise levels at t = 1 .. eps_s (Song et al. 2021)."""
    return (vp_sigmas(steps, beta_d, beta_min, eps_s),)


@node(category=f"{CUSTOM_SAMPLING}/schedulers", outputs=[("SIGMAS", "SIGMAS")])
def LaplaceScheduler(steps: STEPS, sigma_max: SIGMA_MAX, sigma_min: SIGMA_MIN,
                     mu: Float(0.0, min=-10.0, max=10.0, step=0.1),
                     beta: Float(0.5, min=0.0, max=10.0, step=0.1)) -> tuple:
    """log sigma at the quantiles of a Laplace(mu, beta) distribution: steps crowd around sigma = e^mu."""
    _positive_sigma_range("LaplaceScheduler", sigma_max, sigma_min)
    return (laplace_sigmas(steps, sigma_min, sigma_max, mu, beta),)


@node(category=f"{CUSTOM_SAMPLING}/schedulers", outputs=[("SIGMAS", "SIGMAS")])
def SDTurboScheduler(model: Socket("MODEL"), steps: Int(1, min=1, max=10), denoise: DENOISE) -> tuple:
    """The sigmas of SD Turbo's timesteps 999, 899, ...; denoise d starts 10 - int(10 d) timesteps in."""
    return (sd_turbo_sigmas(model.model_sampling, steps, denoise),)


@node(category=f"{CUSTOM_SAMPLING}/sigmas", outputs=[("SIGMAS", "high_sigmas"), ("SIGMAS", "low_sigmas")])
def SplitSigmas(sigmas: Socket("SIGMAS"), step: STEP_INDEX) -> tuple:
    """Splits at `step`: high_sigmas = sigmas[0..step], low_sigmas = sigmas[step..]; both hold sigmas[step],
    so the low part continues where the high part stopped."""
    sigmas = _checked_sigmas("SplitSigmas", sigmas, allow_empty=True)
    return (sigmas[:step + 1], sigmas[step:])


@node(category=f"{CUSTOM_SAMPLING}/sigmas", outputs=[("SIGMAS", "high_sigmas"), ("SIGMAS", "low_sigmas")])
def SplitSigmasDenoise(sigmas: Socket("SIGMAS"), denoise: DENOISE) -> tuple:
    """Splits so that low_sigmas holds the last round(steps * denoise) steps (a "denoise" for the low part)."""
    sigmas = _checked_sigmas("SplitSigmasDenoise", sigmas, allow_empty=True)
    if sigmas.numel() == 0:
        return (sigmas, sigmas)  # as ComfyUI: nothing to split, both parts empty
    steps = len(sigmas) - 1
    # At a denoise that rounds to 0 steps ComfyUI returns an empty high part; we keep the whole schedule there.
    split = steps - round(steps * denoise)
    return (sigmas[:split + 1], sigmas[split:])


@node(category=f"{CUSTOM_SAMPLING}/sigmas", outputs=[("SIGMAS", "SIGMAS")])
def FlipSigmas(sigmas: Socket("SIGMAS")) -> tuple:
    """The schedule reversed, from clean to noisy: sampling with it "unsamples" an image back to its noise."""
    flipped = _checked_sigmas("FlipSigmas", sigmas, allow_empty=True).flip(0)
    if flipped.numel() and flipped[0] == 0.0:
        # A step from sigma 0 would divide by zero; ComfyUI starts at 1e-4 instead.
        flipped[0] = 1e-4
    return (flipped,)


@node(category=f"{CUSTOM_SAMPLING}/sigmas", outputs=[("SIGMAS", "SIGMAS")])
def SetFirstSigma(sigmas: Socket("SIGMAS"), sigma: Float(136.0, min=0.0, max=20000.0, step=0.001)) -> tuple:
    """The schedule with its first sigma replaced (e.g. a higher start for more initial noise)."""
    changed = _checked_sigmas("SetFirstSigma", sigmas).clone()
    changed[0] = sigma
    return (changed,)


@node(category=CUSTOM_SAMPLING, outputs=[("LATENT", "output"), ("LATENT", "denoised_output")])
def SamplerCustom(model: Socket("MODEL"), add_noise: Boolean(True), noise_seed: SEED, cfg: CFG,
                  positive: Socket("CONDITIONING"), negative: Socket("CONDITIONING"), sampler: Socket("SAMPLER"),
                  sigmas: Socket("SIGMAS"), latent_image: Socket("LATENT"), *,
                  context: ExecutionContext | None = None) -> tuple:
    """Samples down the given sigmas with a chosen sampler; denoised_output is the last x0 estimate."""
    checked_sampler = _checked_sampler("SamplerCustom", sampler)
    checked = _checked_sigmas("SamplerCustom", sigmas, allow_empty=True)
    return _run_custom("SamplerCustom", Guider(model, positive, negative, cfg), checked_sampler, checked,
                       Noise(noise_seed, enabled=add_noise), latent_image, context)


@node(category=CUSTOM_SAMPLING, outputs=[("LATENT", "output"), ("LATENT", "denoised_output")])
def SamplerCustomAdvanced(noise: Socket("NOISE"), guider: Socket("GUIDER"), sampler: Socket("SAMPLER"),
                          sigmas: Socket("SIGMAS"), latent_image: Socket("LATENT"), *,
                          context: ExecutionContext | None = None) -> tuple:
    """SamplerCustom with the noise and the guidance as inputs of their own."""
    _require(noise, Noise, "SamplerCustomAdvanced", "noise", "NOISE")
    _require(guider, Guider, "SamplerCustomAdvanced", "guider", "GUIDER")
    checked_sampler = _checked_sampler("SamplerCustomAdvanced", sampler)
    checked = _checked_sigmas("SamplerCustomAdvanced", sigmas, allow_empty=True)
    return _run_custom("SamplerCustomAdvanced", guider, checked_sampler, checked, noise, latent_image, context)


# --- a sampler loop out of nodes (the module docstring) ----------------------------------------------------


def _sigma_at(node_name: str, sigmas: Tensor, step: int, *, needs_next: bool) -> tuple[float, float | None]:
    last = len(sigmas) - (2 if needs_next else 1)
    if step > last:
        what = "a step from sigmas[step] to sigmas[step + 1]" if needs_next else "sigmas[step]"
        raise ValueError(f"{node_name}: step {step} is out of range for {len(sigmas)} sigmas ({what} needs "
                         f"step <= {max(last, 0)})")
    return float(sigmas[step]), float(sigmas[step + 1]) if needs_next else None


def _no_noise_mask(node_name: str, input_name: str, latent: Latent) -> None:
    if latent.get("noise_mask") is not None:
        raise ValueError(f"{node_name}: {input_name} has a noise_mask; the step nodes do not inpaint (use KSampler "
                         "or SamplerCustom, which keep the unmasked area), or drop the mask")


@node(category=STEP_NODES, outputs=[("LATENT", "noisy_latent")])
def InitialNoisyLatent(model: Socket("MODEL"), noise: Socket("NOISE"), sigmas: Socket("SIGMAS"),
                       latent_image: Socket("LATENT")) -> tuple:
    """The latent noised to sigmas[0] as every sampler starts: from pure noise (sigmas[0] at the model's
    largest sigma) the noise is scaled by sqrt(1 + sigma^2), else by sigma; an all-zero latent stays unshifted.
    The first input of a UNetDenoiseStep / EulerStep loop."""
    sigma = float(_checked_sigmas("InitialNoisyLatent", sigmas)[0])
    from_pure_noise = model.model_sampling.is_max_denoise(sigma)
    return (_noised("InitialNoisyLatent", model, noise, latent_image, sigma, from_pure_noise),)


def _noised(node_name: str, model: ModelHandle, noise: Noise, latent: Latent, sigma: float,
            max_denoise: bool) -> dict[str, Any]:
    """`latent` noised to `sigma` as sample_custom noises it, in the denoiser's space, back in LATENT units."""
    _require(noise, Noise, node_name, "noise", "NOISE")
    samples = _latent_samples(node_name, "latent_image", latent, model).float()
    ms, latent_format = model.model_sampling, model.latent_format
    unit = initial_noise(samples.shape, noise.seed, latent.get("batch_index")) if noise.enabled \
        else torch.zeros(samples.shape)
    # ComfyUI leaves an all-zero (EmptyLatentImage) latent unshifted, as sample_custom does.
    start = latent_format.process_in(samples) if bool(samples.any()) else samples
    return _with_samples(latent, latent_format.process_out(ms.noise_scaling(sigma, unit, start, max_denoise)))


@node(category="_for_testing/custom_sampling/noise", outputs=[("LATENT", "LATENT")])
def AddNoise(model: Socket("MODEL"), noise: Socket("NOISE"), sigmas: Socket("SIGMAS"),
             latent_image: Socket("LATENT")) -> tuple:
    """ComfyUI's AddNoise: the latent plus noise of std |sigmas[0] - sigmas[-1]| (never the pure-noise
    sqrt(1 + sigma^2) start; InitialNoisyLatent gives that); an empty schedule adds nothing."""
    if isinstance(sigmas, Tensor) and sigmas.dim() == 1 and sigmas.numel() == 0:
        return (dict(latent_image),)
    checked = _checked_sigmas("AddNoise", sigmas)
    scale = abs(float(checked[0]) - float(checked[-1])) if len(checked) > 1 else float(checked[0])
    return (_noised("AddNoise", model, noise, latent_image, scale, False),)


@node(category=STEP_NODES, outputs=[("LATENT", "denoised")])
def UNetDenoiseStep(model: Socket("MODEL"), positive: Socket("CONDITIONING"), negative: Socket("CONDITIONING"),
                    cfg: CFG, latent: Socket("LATENT"), sigmas: Socket("SIGMAS"), step: STEP_INDEX, *,
                    context: ExecutionContext | None = None) -> tuple:
    """One guided model evaluation: the denoised estimate D(x, sigmas[step]) of the noisy latent x (LATENT
    units, noised to sigmas[step]), with classifier-free guidance at `cfg`."""
    checked = _checked_sigmas("UNetDenoiseStep", sigmas)
    sigma, _ = _sigma_at("UNetDenoiseStep", checked, step, needs_next=False)
    _no_noise_mask("UNetDenoiseStep", "latent", latent)
    if sigma == 0.0:  # a clean latent is its own denoised estimate (and the Euler step below would divide by 0)
        return (_with_samples(latent, _latent_samples("UNetDenoiseStep", "latent", latent, model)),)

    def run(sampling_model: SamplingModel, samples: Tensor, noise_mask: Tensor | None,
            batch_index: list[int] | None, callback: StepCallback | None) -> SampleOutput:
        # One Euler step from sigma to 0 without added noise makes exactly one model call, and its
        # denoised output is D(x, sigma) with every guidance feature sample_custom has.
        return sample_custom(sampling_model, positive, negative, samples, torch.tensor([sigma, 0.0]), "euler",
                             seed=0, cfg=cfg, add_noise=False, batch_index=batch_index)

    denoised = run_sampling("UNetDenoiseStep", model, latent, context, run, input_name="latent")[1]
    if context is not None:
        context.progress(step + 1, max(len(checked) - 1, step + 1))
    return (denoised,)


@node(category=STEP_NODES, outputs=[("LATENT", "latent")])
def EulerStep(latent: Socket("LATENT"), denoised: Socket("LATENT"), sigmas: Socket("SIGMAS"),
              step: STEP_INDEX) -> tuple:
    """x + (x - D) / sigma * (sigma_next - sigma): the Euler step of the probability-flow ODE from
    sigmas[step] to sigmas[step + 1] (Karras et al. 2022, Alg. 2 without churn)."""
    x = _latent_samples("EulerStep", "latent", latent, None).float()
    estimate = _latent_samples("EulerStep", "denoised", denoised, None).float()
    if estimate.shape != x.shape:
        raise ValueError(f"EulerStep: denoised has shape {list(estimate.shape)}, latent {list(x.shape)}")
    sigma, sigma_next = _sigma_at("EulerStep", _checked_sigmas("EulerStep", sigmas), step, needs_next=True)
    if sigma == 0.0:
        raise ValueError(f"EulerStep: sigmas[{step}] is 0: the latent is already clean, there is no step to take")
    return (_with_samples(latent, x + to_d(x, sigma, estimate) * (sigma_next - sigma)),)
