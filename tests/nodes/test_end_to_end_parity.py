"""The end-to-end proof (issue 5): txt2img and img2img through our nodes, as functions and through the
engine's Executor, equal diffusers' pipelines on the same tiny weights to within 1/255 on almost every pixel.

The checkpoint is a tiny random-weight SD1 diffusers folder in models/checkpoints, loaded by
CheckpointLoaderSimple; diffusers loads the very same folder. What the two sides must be given alike:
- Start noise (model-formats 8.4): both get our `initial_noise` for the seed. From pure noise we start at
  sqrt(1 + sigma_max^2) and diffusers at init_noise_sigma = sigma_max, so txt2img hands diffusers the noise
  pre-scaled by their ratio. img2img starts at sigma_0 on both sides; diffusers' own draw is replaced by ours.
- Sigmas: euler + normal at 10 steps gives integer timesteps 999, 888, ..., 0 on both sides. img2img at
  denoise 0.6 runs the last 10 steps of a 16-step (int(10 / 0.6)) schedule, while diffusers runs the last
  int(steps * strength) of `steps`; so diffusers gets our 16-step sigmas (`sigmas=`) with strength 10/16,
  which keeps the same 11 sigmas. Those sigmas sit at fractional timesteps; we (and ComfyUI) feed the UNet
  the nearest integer timestep (8.2) and diffusers the fractional one, so the reference UNet's timestep is
  rounded by a forward pre-hook.
- img2img latents: diffusers' img2img samples the VAE's latent distribution, ComfyUI's VAEEncode takes its
  mean; the reference gets its own VAE's mean latent (passed as a 4-channel `image`), ours comes from VAEEncode.
"""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import cli
from diffusion.sampling import calculate_sigmas
from diffusion.sampling.noise import initial_noise
from diffusion.tiny_models import write_tiny_diffusers_folder
from engine import ExecutionContext, Executor, RunSettings, Socket, node
from nodes.conditioning import CLIPTextEncode
from nodes.image import LoadImage
from nodes.latent import EmptyLatentImage
from nodes.loaders import CheckpointLoaderSimple
from nodes.sampling import KSampler
from nodes.vae import VAEDecode, VAEEncode

FOLDER, INPUT_IMAGE = "tiny-sd1", "gradient.png"
PROMPT, NEGATIVE = "a photo of a cat sitting on a red chair", ""
STEPS, CFG_SCALE, SEED, SIZE, DENOISE = 10, 7.0, 42, 64, 0.6
ONE_LEVEL = 1.0 / 255.0


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> RunSettings:
    base = tmp_path_factory.mktemp("parity_tree")
    write_tiny_diffusers_folder(base / "models" / "checkpoints" / FOLDER, "sd1")
    for name in ("input", "output", "temp"):
        (base / name).mkdir()
    write_input_image(base / "input" / INPUT_IMAGE)
    return RunSettings(models_dir=base / "models", input_dir=base / "input", output_dir=base / "output",
                       temp_dir=base / "temp", device="cpu")


def context_for(settings: RunSettings, class_type: str) -> ExecutionContext:
    return ExecutionContext("1", "parity", class_type, settings, lambda *report: None, lambda: False)


@pytest.fixture(scope="module")
def handles(settings):
    return CheckpointLoaderSimple(FOLDER, context=context_for(settings, "CheckpointLoaderSimple"))


def write_input_image(path) -> None:
    """A smooth, colourful 64x64 PNG."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    rgb = torch.stack([xs, ys, 0.5 + 0.4 * torch.sin(6.0 * xs * ys)], dim=-1).clamp(0, 1)
    Image.fromarray((rgb * 255).round().to(torch.uint8).numpy(), mode="RGB").save(path)


@pytest.fixture(scope="module")
def pixels(settings) -> torch.Tensor:
    (image, _) = LoadImage(INPUT_IMAGE, context=context_for(settings, "LoadImage"))
    return image


def ours(settings, handles, pixels: torch.Tensor | None) -> torch.Tensor:
    """txt2img (pixels None) or img2img at DENOISE through the nodes called as functions -> [1, 3, H, W]."""
    model, clip, vae = handles
    (positive,) = CLIPTextEncode(PROMPT, clip, context=context_for(settings, "CLIPTextEncode"))
    (negative,) = CLIPTextEncode(NEGATIVE, clip, context=context_for(settings, "CLIPTextEncode"))
    if pixels is None:
        (latent,) = EmptyLatentImage(SIZE, SIZE, 1)
    else:
        (latent,) = VAEEncode(pixels, vae, context=context_for(settings, "VAEEncode"))
    denoise = 1.0 if pixels is None else DENOISE
    (sampled,) = KSampler(model, SEED, STEPS, CFG_SCALE, "euler", "normal", positive, negative, latent, denoise,
                          context=context_for(settings, "KSampler"))
    (image,) = VAEDecode(sampled, vae, context=context_for(settings, "VAEDecode"))
    return image.permute(0, 3, 1, 2)


def euler_pipeline(folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_txt2img(folder) -> torch.Tensor:
    pipe = euler_pipeline(folder)
    pipe.scheduler.set_timesteps(STEPS)
    sigma_max = float(pipe.scheduler.sigmas[0])
    noise = initial_noise((1, 4, SIZE // 8, SIZE // 8), SEED)
    latents = noise * (math.sqrt(1.0 + sigma_max**2) / float(pipe.scheduler.init_noise_sigma))
    with torch.inference_mode():
        return pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    guidance_scale=CFG_SCALE, latents=latents, output_type="pt").images


def _round_timesteps(module, args, kwargs):
    return (args[0], torch.round(torch.as_tensor(args[1])), *args[2:]), kwargs


def reference_img2img(folder, pixels: torch.Tensor, model_sampling, monkeypatch) -> torch.Tensor:
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img_module

    components = euler_pipeline(folder).components
    # The tiny folder's UNet config has no sample_size, which the img2img pipeline's constructor compares.
    components["unet"].register_to_config(sample_size=SIZE // 8)
    pipe = StableDiffusionImg2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.register_forward_pre_hook(_round_timesteps, with_kwargs=True)
    total = int(STEPS / DENOISE)
    sigmas = calculate_sigmas(model_sampling, "normal", total)
    noise = initial_noise((1, 4, SIZE // 8, SIZE // 8), SEED)
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **_: noise.reshape(shape).clone())
    with torch.inference_mode():
        mean = pipe.vae.encode(pixels.permute(0, 3, 1, 2) * 2.0 - 1.0).latent_dist.mode()
        return pipe(PROMPT, image=mean * pipe.vae.config.scaling_factor, negative_prompt=NEGATIVE,
                    sigmas=sigmas.tolist(), strength=STEPS / total, guidance_scale=CFG_SCALE,
                    output_type="pt").images


def pixel_agreement(image: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, fraction of values within one 8-bit level)."""
    difference = (image - reference).abs()
    return float(difference.max()), float((difference <= ONE_LEVEL).float().mean())


def test_txt2img_through_the_nodes_matches_stable_diffusion_pipeline(settings, handles):
    image = ours(settings, handles, None)
    reference = reference_txt2img(settings.models_dir / "checkpoints" / FOLDER)
    assert image.shape == reference.shape == (1, 3, SIZE, SIZE)
    assert reference.std() > 0.01  # an image with structure, not a flat field
    largest, within = pixel_agreement(image, reference)
    # measured: max 5.1e-6, every value within 1/255
    assert within >= 0.999 and largest < 4 * ONE_LEVEL


def test_img2img_at_denoise_0_6_through_the_nodes_matches_the_img2img_pipeline(settings, handles, pixels,
                                                                               monkeypatch):
    image = ours(settings, handles, pixels)
    reference = reference_img2img(settings.models_dir / "checkpoints" / FOLDER, pixels,
                                  handles[0].model_sampling, monkeypatch)
    assert image.shape == reference.shape == (1, 3, SIZE, SIZE)
    largest, within = pixel_agreement(image, reference)
    # measured: max 3.1e-6, every value within 1/255; without the timestep rounding max 0.015, 83% within
    assert within >= 0.999 and largest < 4 * ONE_LEVEL


# --- the same run through the engine ------------------------------------------------------------------------

KEPT: dict[str, torch.Tensor] = {}


@node(category="testing", output_node=True)
def KeepImage(images: Socket("IMAGE")) -> None:
    """Test-only output node: keeps the decoded IMAGE for the assertions."""
    KEPT["images"] = images


def api_prompt(img2img: bool) -> dict:
    """ComfyUI's default txt2img graph (node ids as in its default workflow), or img2img from LoadImage."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": FOLDER}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": SEED, "steps": STEPS, "cfg": CFG_SCALE,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                                                   "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "KeepImage", "inputs": {"images": ["8", 0]}},
    }
    if img2img:
        del prompt["5"]
        prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": INPUT_IMAGE}}
        prompt["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
        prompt["3"]["inputs"] |= {"latent_image": ["11", 0], "denoise": DENOISE}
    return prompt


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_the_executor_runs_the_same_graph_to_the_same_image(settings, handles, pixels, img2img):
    registry = cli.load_registry([])
    registry.register(KeepImage)
    result = Executor(registry, settings=settings).execute(api_prompt(img2img))
    assert result.ok, result.error
    expected = ours(settings, handles, pixels if img2img else None)
    assert torch.equal(KEPT["images"].permute(0, 3, 1, 2), expected)
