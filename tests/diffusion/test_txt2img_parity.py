"""The model stack end to end: a tiny checkpoint's text -> sampler -> VAE image equals diffusers' pipeline.

Every part is proven on its own elsewhere; this proves they fit: loading a diffusers folder, encoding the
prompt and the empty negative, classifier-free guidance over our UNet, the Euler sampler on the normal
schedule, the latent scale factor and the VAE decode, against diffusers' StableDiffusionPipeline with
EulerDiscreteScheduler on the very same folder. With 10 steps on `linspace` spacing both feed the UNet the
integer timesteps 999, 888, ..., 0 (model-formats 9.3). diffusers starts from `latents * init_noise_sigma`
with `init_noise_sigma = sigma_max` where ComfyUI (and we) start at `sqrt(1 + sigma_max^2)` (8.4), so the
reference gets our noise pre-scaled by the ratio. What remains is float32 round-off and the sigma table
diffusers builds in float32 (up to ~1e-5 relative, 8.1).
"""
from __future__ import annotations

import math

import pytest
import torch

from diffusion.checkpoints import load_checkpoint
from diffusion.sampling import DiscreteConfig, DiscreteModelSampling, SamplingModel, sample
from diffusion.sampling.noise import initial_noise
from diffusion.text_encoders import SDTextEncoder
from diffusion.tiny_models import write_tiny_diffusers_folder

PROMPT = "a photo of a cat sitting on a red chair"
STEPS, CFG, SEED, SIZE = 10, 7.5, 42, 64


def ours_txt2img(folder, prediction: str) -> torch.Tensor:
    loaded = load_checkpoint(folder)
    assert loaded.prediction == prediction
    clip = SDTextEncoder(loaded.text_encoder)
    model = SamplingModel(loaded.unet, DiscreteModelSampling(DiscreteConfig(prediction=prediction)),
                          loaded.vae.latent_format)
    with torch.inference_mode():
        cond, _ = clip.encode(PROMPT)
        uncond, _ = clip.encode("")
        empty = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
        latent = sample(model, [[cond, {}]], [[uncond, {}]], empty, seed=SEED, steps=STEPS, cfg=CFG,
                        sampler_name="euler", scheduler="normal")
        return ((loaded.vae.decode(latent) + 1.0) / 2.0).clamp(0.0, 1.0)


def reference_txt2img(folder, prediction: str) -> torch.Tensor:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace",
                                                        prediction_type=prediction)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(STEPS)
    sigma_max = float(pipe.scheduler.sigmas[0])
    noise = initial_noise((1, 4, SIZE // 8, SIZE // 8), SEED)
    latents = noise * (math.sqrt(1.0 + sigma_max ** 2) / float(pipe.scheduler.init_noise_sigma))
    with torch.inference_mode():
        return pipe(PROMPT, negative_prompt="", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    guidance_scale=CFG, latents=latents, output_type="pt").images


@pytest.mark.parametrize(("family", "prediction"), [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_tiny_txt2img_matches_the_diffusers_pipeline(tmp_path, family, prediction):
    folder = write_tiny_diffusers_folder(tmp_path / family, family, v_prediction=prediction == "v_prediction")
    ours = ours_txt2img(folder, "eps" if prediction == "epsilon" else prediction)
    reference = reference_txt2img(folder, prediction)
    assert ours.shape == reference.shape == (1, 3, SIZE, SIZE)
    # Random tiny weights still make an image with structure; identical numbers would not be a coincidence.
    assert reference.std() > 0.01
    # measured: 3.9e-6 (SD1), 4.4e-6 (SD2 v-prediction); a cfg of 3 instead of 7.5 moves pixels by 0.49
    assert (ours - reference).abs().max() < 1e-4
