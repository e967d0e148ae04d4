"""Tiny random-weight stand-ins, in the real file formats, for every file the nine ComfyUI examples name.

The examples run unchanged, at their own sizes (up to 1920x1088) and step counts, so the stand-ins use a leaner
layout than diffusion/tiny_models' defaults: one resnet per level and attention only at the quarter-size
level (and the middle block). The default tiny UNet attends over every latent pixel at full resolution,
which costs ~1700 GFLOP per step at 1920x1088 against ~20 here; the layout is still the real LDM one that
detection reads from the key names, so the files load through the same path a real checkpoint takes.
The one LoRA-bearing checkpoint keeps the default tiny widths at the attention level, so that the tiny
LoRA files (tiny_models.tiny_lora_tensors) patch its UNet as well as its text encoder.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusion.detection import UNET_PREFIX, VAE_PREFIX
from diffusion.lora import unet_lora_names
from diffusion.text_encoders import transformers_to_open_clip
from diffusion.tiny_models import (
    HEAD_OVERRIDES_METADATA,
    random_weights,
    tiny_checkpoint_tensors,
    tiny_lora_tensors,
    tiny_overrides,
    tiny_text_weights,
    tiny_unet_config,
)
from diffusion.unet import TINY_SDXL_REFINER_UNET, TINY_SDXL_UNET, UNetConfig, UNetModel
from diffusion.vae import TINY_VAE, AutoencoderKL

LEAN_VAE = dataclasses.replace(TINY_VAE, num_res_blocks=1)
_LEAN = dict(transformer_depth=(0, 0, 1, 0), num_res_blocks=1)


def lean_unet_config(family: str, *, lora_ready: bool = False, inpaint: bool = False) -> UNetConfig:
    widths = (1, 1, 4, 4) if lora_ready else (1, 1, 1, 1)
    return dataclasses.replace(tiny_unet_config(family, inpaint=inpaint), channel_mult=widths, **_LEAN)


@dataclass(frozen=True)
class StandInCheckpoint:
    name: str
    family: str
    seed: int
    v_prediction: bool = False
    inpaint: bool = False
    lora_ready: bool = False
    dtype: torch.dtype = torch.float32

    @property
    def unet_config(self) -> UNetConfig:
        return lean_unet_config(self.family, lora_ready=self.lora_ready, inpaint=self.inpaint)


CHECKPOINTS = (
    StandInCheckpoint("v1-5-pruned-emaonly.ckpt", "sd1", seed=1, lora_ready=True),
    StandInCheckpoint("v2-1_768-ema-pruned.ckpt", "sd2", seed=2, v_prediction=True),
    StandInCheckpoint("512-inpainting-ema.safetensors", "sd1", seed=3, inpaint=True),
    StandInCheckpoint("wd-illusion-fp16.safetensors", "sd2", seed=4, v_prediction=True, dtype=torch.float16),
    StandInCheckpoint("Anything-V3.0.ckpt", "sd1", seed=5),
    StandInCheckpoint("AbyssOrangeMix2_hard.safetensors", "sd1", seed=6),
)
VAES = {"vae-ft-mse-840000-ema-pruned.safetensors": 7}
#: lora_multiple's two LoRAs, both for the checkpoint they are applied to.
LORAS = {"epiNoiseoffset_v2.safetensors": 8, "theovercomer8sContrastFix_sd15.safetensors": 9}
SDXL_CHECKPOINTS = {
    "sd_xl_base_1.0.safetensors": "base", "sd_xl_refiner_1.0.safetensors": "refiner",
    "sd_xl_turbo_1.0_fp16.safetensors": "base",
}
#: (width, height) of the input images written for the examples' LoadImage nodes.
IMAGE_SIZES = {"example.png": (192, 128), "yosemite_inpaint_example.png": (128, 128),
               "yosemite_outpaint_example.png": (128, 128)}


def write_example_files(models: Path, inputs: Path) -> None:
    """Every model file and input image the nine examples name, under models/ and input/."""
    for folder in ("checkpoints", "vae", "loras"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    inputs.mkdir(parents=True, exist_ok=True)
    for checkpoint in CHECKPOINTS:
        write_stand_in_checkpoint(models / "checkpoints" / checkpoint.name, checkpoint)
    for name, seed in VAES.items():
        save_file(random_weights(AutoencoderKL(LEAN_VAE, device="meta"), seed), str(models / "vae" / name))
    lora_target = next(checkpoint for checkpoint in CHECKPOINTS if checkpoint.lora_ready).unet_config
    for name, seed in LORAS.items():
        tensors, metadata = lora_for(lora_target, seed)
        save_file(tensors, str(models / "loras" / name), metadata=metadata)
    for name, variant in SDXL_CHECKPOINTS.items():
        save_file(sdxl_tensors(variant), str(models / "checkpoints" / name))
    for name, size in IMAGE_SIZES.items():
        write_input_image(inputs / name, size, with_hole="inpaint" in name)


def stand_in_tensors(checkpoint: StandInCheckpoint) -> dict[str, torch.Tensor]:
    """tiny_models' single-file key set with the lean UNet and VAE in place of the default ones."""
    tensors = tiny_checkpoint_tensors(checkpoint.family, seed=checkpoint.seed, v_prediction=checkpoint.v_prediction)
    tensors = {key: value for key, value in tensors.items() if not key.startswith((UNET_PREFIX, VAE_PREFIX))}
    unet = random_weights(UNetModel(checkpoint.unet_config, device="meta"), checkpoint.seed)
    vae = random_weights(AutoencoderKL(LEAN_VAE, device="meta"), checkpoint.seed + 1)
    tensors |= {UNET_PREFIX + key: value for key, value in unet.items()}
    tensors |= {VAE_PREFIX + key: value for key, value in vae.items()}
    return {key: value.to(checkpoint.dtype) if value.is_floating_point() else value for key, value in tensors.items()}


def write_stand_in_checkpoint(path: Path, checkpoint: StandInCheckpoint) -> None:
    tensors = stand_in_tensors(checkpoint)
    if path.suffix == ".ckpt":
        # A CompVis-era pickle; without metadata the loader reads the head layout off the tiny widths.
        torch.save({"state_dict": tensors, "global_step": 0}, path)
        return
    overrides = json.dumps(dataclasses.asdict(tiny_overrides(checkpoint.family)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", HEAD_OVERRIDES_METADATA: overrides})


def lora_for(unet_config: UNetConfig, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tiny kohya LoRA, keeping the text modules and the UNet modules this layout has at the same shape."""
    tensors, metadata = tiny_lora_tensors("sd1", "kohya", seed=seed)
    names = unet_lora_names(unet_config)
    shapes = {key: tuple(value.shape) for key, value in UNetModel(unet_config, device="meta").state_dict().items()}

    def fits(module: str) -> bool:
        if module.startswith("lora_te_"):
            return True
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        return module in names and shapes[names[module]] == (up.shape[0], *down.shape[1:])

    kept = {module for module in {key.split(".", 1)[0] for key in tensors} if fits(module)}
    lora = {key: value for key, value in tensors.items() if key.split(".", 1)[0] in kept}
    return lora, metadata


def sdxl_tensors(variant: str) -> dict[str, torch.Tensor]:
    """An SDXL single file's key layout (tiny widths): label_emb UNet, VAE, and the conditioner's encoders
    (base: CLIP-L and OpenCLIP-G; refiner: OpenCLIP-G only), enough for detection to name it."""
    config = TINY_SDXL_UNET if variant == "base" else TINY_SDXL_REFINER_UNET
    tensors = {UNET_PREFIX + k: v for k, v in random_weights(UNetModel(config, device="meta"), 0).items()}
    tensors |= {VAE_PREFIX + k: v for k, v in random_weights(AutoencoderKL(LEAN_VAE, device="meta"), 1).items()}
    open_clip = transformers_to_open_clip(tiny_text_weights("sd2", 2))
    if variant == "base":
        clip_l = tiny_text_weights("sd1", 3)
        tensors |= {f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in clip_l.items()}
        tensors |= {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip.items()}
    else:
        tensors |= {f"conditioner.embedders.0.model.{k}": v for k, v in open_clip.items()}
    return {key: value.half().contiguous() for key, value in tensors.items()}  # the released files are fp16


def write_input_image(path: Path, size: tuple[int, int], *, with_hole: bool) -> None:
    """A smooth colour gradient; with_hole makes the middle third transparent (LoadImage's mask = 1 - alpha)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.25 * np.sin(x / 9.0)], axis=-1)
    pixels = (rgb * 255).round().astype(np.uint8)
    if not with_hole:
        Image.fromarray(pixels, "RGB").save(path)
        return
    alpha = np.full((height, width), 255, np.uint8)
    alpha[height // 3: 2 * height // 3, width // 3: 2 * width // 3] = 0
    Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(path)
