"""Inpainting checkpoints (UNet in_channels 9) sample as diffusers' StableDiffusionInpaintPipeline does.

The checkpoint is a tiny random-weight SD1 inpainting diffusers folder in models/checkpoints, loaded by
CheckpointLoaderSimple; diffusers loads the very same folder. The two sides are given alike:
- start noise and sigmas as in test_end_to_end_parity: euler + normal at 10 steps is timesteps 999 ... 0 on
  both sides, and diffusers gets our `initial_noise` pre-scaled from sqrt(1 + sigma_max^2) to sigma_max.
  ComfyUI starts even a denoise-1 run at noise * sqrt(1 + sigma_max^2) + the input latent (8.4), diffusers'
  inpainting at the noise alone, so the reference's start latents get the input latent added;
- the masked-image latent: diffusers greys the repaint area as init_image * (mask < 0.5) but then *samples*
  the VAE posterior, while ComfyUI's VAEEncodeForInpaint takes its mean; the reference is handed the mean
  latent of its own greyed image (`masked_image_latents`), and mask_image is the same 0/1 mask;
- the mask lies on the 8-pixel latent grid and grow_mask_by is 0, so diffusers' nearest resize of the
  binarised mask and ComfyUI's bilinear resize rounded are the same latent mask.
One difference is by design: ComfyUI also applies the noise mask to a 9-channel model (the unmasked area is
kept from the input latent at every step), diffusers does not. So the whole node chain is compared with a
mask over the whole image (where keeping nothing is the same), the UNet's input at the first call with a
partial mask, and a partial mask's full sampling loop at the sampler level (no noise mask, our concat).
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from diffusion.inpaint import grey_image_latent, inpaint_concat
from diffusion.sampling import sample_custom
from diffusion.sampling.noise import initial_noise
from diffusion.tiny_models import write_tiny_checkpoint, write_tiny_diffusers_folder
from engine import RunSettings
from nodes.conditioning import CLIPTextEncode
from nodes.latent import EmptyLatentImage
from nodes.loaders import CheckpointLoaderSimple
from nodes.sampling import KSampler
from nodes.vae import VAEDecode, VAEEncodeForInpaint

FOLDER = "tiny-sd1-inpainting"
PROMPT, NEGATIVE = "a red barn in a snowy field", ""
STEPS, CFG_SCALE, SEED, SIZE = 10, 7.0, 7, 64
ONE_LEVEL = 1.0 / 255.0


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> RunSettings:
    """A tree of this module's own, so the shared node tree's checkpoint list stays as other tests expect."""
    base = tmp_path_factory.mktemp("inpaint_tree")
    folders = {name: base / name for name in ("models", "input", "output", "temp")}
    for folder in folders.values():
        folder.mkdir()
    write_tiny_diffusers_folder(folders["models"] / "checkpoints" / FOLDER, "sd1", seed=5, inpaint=True)
    return RunSettings(models_dir=folders["models"], input_dir=folders["input"], output_dir=folders["output"],
                       temp_dir=folders["temp"], device="cpu")


@pytest.fixture(scope="module")
def handles(settings, make_context):
    return CheckpointLoaderSimple(FOLDER, context=make_context(settings))


def picture() -> torch.Tensor:
    """A smooth colourful IMAGE [1, SIZE, SIZE, 3], as LoadImage gives."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    return torch.stack([xs, ys, 0.5 + 0.4 * torch.sin(6.0 * xs * ys)], dim=-1).clamp(0, 1)[None]


def square_mask(top: int, bottom: int) -> torch.Tensor:
    """MASK [1, SIZE, SIZE]: 1 (repaint) on rows and columns top..bottom-1, on the 8-pixel latent grid."""
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, top:bottom, top:bottom] = 1.0
    return mask


def prompts(settings, clip, make_context):
    (positive,) = CLIPTextEncode(PROMPT, clip, context=make_context(settings))
    (negative,) = CLIPTextEncode(NEGATIVE, clip, context=make_context(settings))
    return positive, negative


class UNetInputs:
    """Records the first positional input of every forward call of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(lambda _, args: self.calls.append(args[0].detach().clone()))

    def __enter__(self) -> UNetInputs:
        return self

    def __exit__(self, *_) -> None:
        self.handle.remove()


def ours(settings, handles, make_context, mask: torch.Tensor,
         steps: int = STEPS) -> tuple[torch.Tensor, list, torch.Tensor]:
    """IMAGE + MASK -> VAEEncodeForInpaint (grow 0) -> KSampler euler normal -> VAEDecode: ([1, 3, H, W],
    the UNet inputs of the run, the encoded latent in the model's space)."""
    model, clip, vae = handles
    positive, negative = prompts(settings, clip, make_context)
    (latent,) = VAEEncodeForInpaint(picture(), vae, mask, 0, context=make_context(settings))
    with UNetInputs(model.unet) as recorded:
        (sampled,) = KSampler(model, SEED, steps, CFG_SCALE, "euler", "normal", positive, negative, latent, 1.0,
                              context=make_context(settings))
    (image,) = VAEDecode(sampled, vae, context=make_context(settings))
    return image.permute(0, 3, 1, 2), recorded.calls, model.latent_format.process_in(latent["samples"])


def inpaint_pipeline(folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    # The folder's model_index names StableDiffusionPipeline; the inpainting pipeline takes its components.
    components = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                         feature_extractor=None,
                                                         requires_safety_checker=False).components
    components["unet"].register_to_config(sample_size=SIZE // 8)
    pipe = StableDiffusionInpaintPipeline(**components)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(folder, mask: torch.Tensor, start: torch.Tensor, steps: int = STEPS,
              masked_image_latents: torch.Tensor | None = None):
    """The pipeline on picture() and `mask`, starting where we start from `start` (the input latent in the
    model's space): ([1, 3, H, W], its UNet inputs)."""
    pipe = inpaint_pipeline(folder)
    pipe.scheduler.set_timesteps(steps)
    sigma_max = float(pipe.scheduler.sigmas[0])
    noise = initial_noise((1, 4, SIZE // 8, SIZE // 8), SEED)
    # The inpainting pipeline multiplies given latents by init_noise_sigma.
    latents = (noise * math.sqrt(1.0 + sigma_max**2) + start) / float(pipe.scheduler.init_noise_sigma)
    image = picture().permute(0, 3, 1, 2)
    with torch.inference_mode():
        if masked_image_latents is None:
            greyed = (image * 2.0 - 1.0) * (mask[:, None] < 0.5)
            masked_image_latents = pipe.vae.encode(greyed).latent_dist.mode() * pipe.vae.config.scaling_factor
        with UNetInputs(pipe.unet) as recorded:
            result = pipe(PROMPT, image=image, mask_image=mask[:, None], masked_image_latents=masked_image_latents,
                          negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
                          guidance_scale=CFG_SCALE, latents=latents, output_type="pt").images
    return result, recorded.calls


def pixel_agreement(image: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, fraction of values within one 8-bit level)."""
    difference = (image - expected).abs()
    return float(difference.max()), float((difference <= ONE_LEVEL).float().mean())


def test_an_inpainting_checkpoint_gives_a_model_with_five_concat_channels_and_its_vaes_grey_latent(handles):
    model, _, vae = handles
    assert model.concat_channels == 5
    grey = vae.vae.encode(torch.zeros(1, 3, SIZE, SIZE)).mean(dim=(0, 2, 3))
    assert torch.allclose(model.inpaint_blank_latent, grey, atol=1e-6)


def test_the_grey_latent_comes_from_the_checkpoints_own_vae(fresh_settings, make_context):
    checkpoints = fresh_settings.models_dir / "checkpoints"
    checkpoints.mkdir()
    blanks = []
    for seed in (1, 2):
        name = f"tiny-inpaint-seed{seed}.safetensors"
        write_tiny_checkpoint(checkpoints / name, "sd1", seed=seed, inpaint=True)
        model, _, vae = CheckpointLoaderSimple(name, context=make_context(fresh_settings))
        assert torch.allclose(model.inpaint_blank_latent, grey_image_latent(vae.vae))
        blanks.append(model.inpaint_blank_latent)
    assert (blanks[0] - blanks[1]).abs().max() > 1e-3


def test_a_four_channel_model_has_no_concat_channels(sd1_handles):
    assert sd1_handles[0].concat_channels == 0
    assert sd1_handles[0].inpaint_blank_latent is None


def test_the_whole_node_chain_matches_the_inpaint_pipeline_with_everything_masked(settings, handles, make_context):
    mask = torch.ones(1, SIZE, SIZE)
    image, _, start = ours(settings, handles, make_context, mask)
    expected, _ = reference(settings.models_dir / "checkpoints" / FOLDER, mask, start)
    assert image.shape == expected.shape == (1, 3, SIZE, SIZE)
    assert expected.std() > 0.01
    largest, within = pixel_agreement(image, expected)
    # measured: max 4.3e-6, every value within 1/255 (without the input latent at the start: max 0.015, 83%)
    assert within >= 0.999 and largest < 4 * ONE_LEVEL


def test_with_a_partial_mask_the_unets_first_input_equals_the_pipelines(settings, handles, make_context):
    """The mask and masked-image channels everywhere; the noisy latent inside the mask (outside it ComfyUI's
    noise mask shows the model the input latent noised to sigma, which diffusers does not do)."""
    mask = square_mask(16, 40)
    # Two steps: the first sigma is sigma_max on both sides (diffusers' linspace of one step is timestep 0).
    _, inputs, start = ours(settings, handles, make_context, mask, steps=2)
    _, expected_inputs = reference(settings.models_dir / "checkpoints" / FOLDER, mask, start, steps=2)
    # ours batches [cond, uncond], diffusers [uncond, cond]: compare the cond rows.
    first, expected = inputs[0][0], expected_inputs[0][1]
    assert first.shape == expected.shape == (9, SIZE // 8, SIZE // 8)
    repaint = mask[0, ::8, ::8]
    assert torch.equal(first[4], repaint) and torch.equal(expected[4], repaint)
    # measured: max 7.1e-8 (masked-image latent), 0 (mask), 2.4e-7 (noisy latent in the mask; 7e-3 outside)
    assert torch.allclose(first[4:], expected[4:], atol=1e-5)
    assert torch.allclose(first[:4, repaint == 1], expected[:4, repaint == 1], atol=1e-5)


def test_with_a_partial_mask_the_sampling_loop_matches_the_pipelines(settings, handles, make_context):
    """Our sampler with the concat built from a VAEEncodeForInpaint LATENT, without the noise mask that
    ComfyUI also applies, is diffusers' loop step for step; the masked-image latent is ours for both."""
    model, clip, vae = handles
    mask = square_mask(16, 40)
    positive, negative = prompts(settings, clip, make_context)
    (latent,) = VAEEncodeForInpaint(picture(), vae, mask, 0, context=make_context(settings))
    concat = inpaint_concat(latent["samples"], latent["noise_mask"], model.latent_format, model.inpaint_blank_latent)
    scheduler = inpaint_pipeline(settings.models_dir / "checkpoints" / FOLDER).scheduler
    scheduler.set_timesteps(STEPS)
    with model.sampling_model() as sampling_model, torch.no_grad():
        result = sample_custom(replace(sampling_model, concat=concat), positive, negative,
                               torch.zeros_like(latent["samples"]), scheduler.sigmas.float(), "euler", seed=SEED,
                               cfg=CFG_SCALE)
    (image,) = VAEDecode({"samples": result.samples}, vae, context=make_context(settings))
    expected, _ = reference(settings.models_dir / "checkpoints" / FOLDER, mask, torch.zeros(()),
                            masked_image_latents=concat[:, 1:])
    largest, within = pixel_agreement(image.permute(0, 3, 1, 2), expected)
    # measured: max 5.9e-6, every value within 1/255 (with an all-ones mask channel instead: max 0.45, 10%)
    assert within >= 0.999 and largest < 4 * ONE_LEVEL


def test_ksampler_keeps_the_unmasked_latent_of_an_inpainting_model(settings, handles, make_context):
    model, clip, vae = handles
    positive, negative = prompts(settings, clip, make_context)
    (latent,) = VAEEncodeForInpaint(picture(), vae, square_mask(16, 40), 0, context=make_context(settings))
    (sampled,) = KSampler(model, SEED, 3, CFG_SCALE, "euler", "normal", positive, negative, latent, 1.0,
                          context=make_context(settings))
    keep = latent["noise_mask"][0, 0, ::8, ::8] == 0
    assert torch.allclose(sampled["samples"][..., keep], latent["samples"][..., keep], atol=1e-5)
    assert (sampled["samples"][..., ~keep] - latent["samples"][..., ~keep]).abs().max() > 0.1


def test_txt2img_on_an_inpainting_model_sees_an_all_ones_mask_and_the_grey_latent(settings, handles, make_context):
    model, clip, _ = handles
    positive, negative = prompts(settings, clip, make_context)
    (latent,) = EmptyLatentImage(SIZE, SIZE, 2)
    with UNetInputs(model.unet) as recorded:
        KSampler(model, SEED, 2, CFG_SCALE, "euler", "normal", positive, negative, latent, 1.0,
                 context=make_context(settings))
    grey = model.latent_format.process_in(model.inpaint_blank_latent)
    for call in recorded.calls:
        assert call.shape == (4, 9, SIZE // 8, SIZE // 8)  # 2 latents x (cond, uncond)
        assert torch.equal(call[:, 4], torch.ones(4, SIZE // 8, SIZE // 8))
        assert torch.allclose(call[:, 5:], grey.reshape(1, 4, 1, 1).expand(4, -1, SIZE // 8, SIZE // 8))


def test_a_four_channel_latent_is_accepted_and_a_wrong_one_is_refused_by_name(settings, handles, make_context):
    model, clip, _ = handles
    positive, negative = prompts(settings, clip, make_context)
    wrong = {"samples": torch.zeros(1, 9, SIZE // 8, SIZE // 8)}
    with pytest.raises(ValueError, match="KSampler: latent_image has 9 latent channels but the model takes 4"):
        KSampler(model, SEED, 1, CFG_SCALE, "euler", "normal", positive, negative, wrong, 1.0,
                 context=make_context(settings))


def test_an_inpainting_model_without_a_grey_latent_needs_a_noise_mask(settings, handles, make_context):
    model, clip, _ = handles
    positive, negative = prompts(settings, clip, make_context)
    bare = replace(model, inpaint_blank_latent=None)  # as a UNet loaded without its VAE
    (latent,) = EmptyLatentImage(SIZE, SIZE, 1)
    with pytest.raises(ValueError, match="KSampler: latent_image: the latent has no noise_mask"):
        KSampler(bare, SEED, 1, CFG_SCALE, "euler", "normal", positive, negative, latent, 1.0,
                 context=make_context(settings))
