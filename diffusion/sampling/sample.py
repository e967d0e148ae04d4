"""The sampling entry points the nodes call: KSampler / KSamplerAdvanced / SamplerCustom semantics.

Everything runs on the latent's device and dtype; noise is always drawn on the CPU (noise.py).
Facts: model-formats.md 8.4 (start noise, denoise, inpainting) and ComfyUI's KSampler behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..latent_format import LatentFormat
from .denoiser import Denoiser, StepCallback, denoise_with_uncond
from .guidance import ApplyModel, CFGDenoiser, CondBatcher, Condition, EncodeY, repeat_to_batch
from .model_sampling import ModelSampling
from .noise import MAX_SEED, initial_noise, to_device
from .registry import get_sampler, run_sampler
from .schedulers import calculate_sigmas

Conditioning = Sequence[Sequence[Any]]  # ComfyUI's CONDITIONING: [[cross_attn, extras], ...]


@dataclass(frozen=True)
class SamplingModel:
    """What sampling needs from a loaded model: the raw network and its parameterisation.

    `concat` [1 or B, C', h, w], in the model's latent space (after LatentFormat.process_in), is appended to
    x's channels in every model call: an inpainting UNet's mask and masked-image latent.
    """

    apply_model: ApplyModel
    model_sampling: ModelSampling
    latent_format: LatentFormat = field(default_factory=LatentFormat)
    encode_y: EncodeY | None = None
    concat: Tensor | None = None


class SampleOutput(NamedTuple):
    samples: Tensor  # the sampler's final x, in LATENT units
    denoised: Tensor  # the last x0 prediction (SamplerCustom's "denoised_output"), in LATENT units


class InpaintDenoiser:
    """Noise-mask inpainting (8.4): outside the mask (mask = 0) the model sees the original latent noised
    to the current sigma with the run's fixed noise, and its prediction there is replaced by the latent."""

    def __init__(self, inner: Denoiser, latent: Tensor, noise: Tensor, mask: Tensor, ms: ModelSampling) -> None:
        self.inner, self.latent, self.noise, self.mask, self.ms = inner, latent, noise, mask, ms

    def _context(self, x: Tensor, sigma: float) -> Tensor:
        noised = self.ms.noise_scaling(sigma, self.noise, self.latent)
        return x * self.mask + noised * (1.0 - self.mask)

    def _keep(self, denoised: Tensor) -> Tensor:
        return denoised * self.mask + self.latent * (1.0 - self.mask)

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        return self._keep(self.inner(self._context(x, sigma), sigma))

    def denoise_with_uncond(self, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        guided, uncond = denoise_with_uncond(self.inner, self._context(x, sigma), sigma)
        return self._keep(guided), self._keep(uncond)


def prepare_noise_mask(mask: Tensor, latent: Tensor) -> Tensor:
    """A MASK ([B, H, W], [H, W] or [B, 1, H, W], any resolution) resized bilinearly to the latent."""
    mask = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    mask = F.interpolate(mask, size=latent.shape[-2:], mode="bilinear", align_corners=False)
    mask = repeat_to_batch(mask.expand(-1, latent.shape[1], -1, -1), latent.shape[0])
    return mask.to(latent.device, latent.dtype)


def ksampler_sigmas(ms: ModelSampling, scheduler: str, sampler_name: str, steps: int, denoise: float = 1.0) -> Tensor:
    """KSampler's schedule: `denoise` < 1 keeps the last steps + 1 sigmas of a longer int(steps / denoise)
    schedule; dpm_2 and uni_pc compute one sigma more and drop the second-to-last."""
    if denoise <= 0.0:
        return torch.zeros(0)
    total = steps if denoise > 0.9999 else int(steps / denoise)
    if get_sampler(sampler_name).discard_penultimate_sigma:
        sigmas = calculate_sigmas(ms, scheduler, total + 1)
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    else:
        sigmas = calculate_sigmas(ms, scheduler, total)
    return sigmas[-(steps + 1) :]


def _conditions(conditioning: Conditioning | None, name: str) -> list[Condition]:
    if conditioning is None:
        return []
    try:
        return [Condition.from_comfy(entry) for entry in conditioning]
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def sample_custom(
    model: SamplingModel,
    positive: Conditioning,
    negative: Conditioning | None,
    latent: Tensor,
    sigmas: Tensor,
    sampler_name: str,
    *,
    seed: int,
    cfg: float,
    add_noise: bool = True,
    noise_mask: Tensor | None = None,
    batch_index: Sequence[int] | None = None,
    callback: StepCallback | None = None,
    guidance_rescale: float = 0.0,
    sampler_options: dict[str, Any] | None = None,
) -> SampleOutput:
    """Sample `latent` down the given sigmas (SamplerCustom): the core every other entry point uses.

    `negative` None (BasicGuider) means no unconditional prompt: use it with cfg = 1. The callback's
    tensors are in the model's latent space (after LatentFormat.process_in), as latent previews expect.
    """
    if sigmas.numel() == 0:
        return SampleOutput(latent, latent)
    ms = model.model_sampling
    spec = get_sampler(sampler_name)
    noise = initial_noise(latent.shape, seed, batch_index) if add_noise else torch.zeros(latent.shape)
    noise = to_device(noise, latent)
    # ComfyUI leaves an all-zero (EmptyLatentImage) latent unshifted (model-formats.md 5); one check per run.
    x_latent = model.latent_format.process_in(latent) if bool(latent.any()) else latent
    batcher = CondBatcher(
        model.apply_model,
        ms,
        [_conditions(positive, "positive"), _conditions(negative, "negative")],
        latent.shape,
        model.encode_y,
        model.concat,
    )
    denoiser: Denoiser = CFGDenoiser(batcher, cfg, guidance_rescale)
    if noise_mask is not None:
        inpaint_noise = noise
        if spec.inpaint_fresh_noise:
            inpaint_noise = to_device(initial_noise(latent.shape, (seed + 1) & MAX_SEED), latent)
        denoiser = InpaintDenoiser(denoiser, x_latent, inpaint_noise, prepare_noise_mask(noise_mask, latent), ms)
    first, last = float(sigmas[0]), float(sigmas[-1])
    if last == 0.0 and spec.final_sigma is not None:
        last = spec.final_sigma
    x = ms.noise_scaling(first, noise, x_latent, ms.is_max_denoise(first))
    last_denoised = [x_latent]

    def on_step(step: int, total: int, x_step: Tensor, denoised: Tensor) -> None:
        last_denoised[0] = denoised
        if callback is not None:
            callback(step, total, x_step, denoised)

    samples = run_sampler(
        sampler_name,
        denoiser,
        x,
        sigmas,
        seed=seed,
        model_sampling=ms,
        callback=on_step,
        batch_index=batch_index,
        **(sampler_options or {}),
    )
    samples = ms.inverse_noise_scaling(last, samples)
    return SampleOutput(model.latent_format.process_out(samples), model.latent_format.process_out(last_denoised[0]))


def sample(
    model: SamplingModel,
    positive: Conditioning,
    negative: Conditioning,
    latent: Tensor,
    *,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    denoise: float = 1.0,
    add_noise: bool = True,
    start_step: int | None = None,
    last_step: int | None = None,
    force_full_denoise: bool = False,
    noise_mask: Tensor | None = None,
    batch_index: Sequence[int] | None = None,
    callback: StepCallback | None = None,
    guidance_rescale: float = 0.0,
) -> Tensor:
    """KSampler (defaults) and KSamplerAdvanced (add_noise, start/last step, force_full_denoise =
    not return_with_leftover_noise) in one call; returns the sampled LATENT samples."""
    sigmas = ksampler_sigmas(model.model_sampling, scheduler, sampler_name, steps, denoise)
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0.0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return latent
        sigmas = sigmas[start_step:]
    result = sample_custom(
        model,
        positive,
        negative,
        latent,
        sigmas,
        sampler_name,
        seed=seed,
        cfg=cfg,
        add_noise=add_noise,
        noise_mask=noise_mask,
        batch_index=batch_index,
        callback=callback,
        guidance_rescale=guidance_rescale,
    )
    return result.samples
