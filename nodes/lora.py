"""LoRA nodes: a LoRA/LoHa/LoKr file from `models/loras` as reversible patches on MODEL (and CLIP).

The patches are recorded on new handles (ModelHandle.with_patches) and applied to the shared weights only
while a node runs the model, so the loader's cached base model is never changed and two LoRA nodes in a row
stack in order. A file that matches none of the model's weights is not an error (ComfyUI loads it and
warns): the warning says how many modules matched, in the log.
"""
from __future__ import annotations

import logging

from diffusion.lora import LoraPatches, load_lora, text_lora_names, unet_lora_names
from diffusion.safetensors_io import CheckpointError
from engine import Combo, ExecutionContext, Float, RunSettings, Socket, node
from engine.model_folders import model_files
from nodes.loaders import file_fingerprint, model_file
from nodes.values import ClipHandle, ModelHandle, WeightPatch

log = logging.getLogger(__name__)


def lora_names(settings: RunSettings) -> list[str]:
    return model_files(settings.model_roots, "loras")


def read_lora(settings: RunSettings, lora_name: str, model: ModelHandle | None, clip: ClipHandle | None) -> LoraPatches:
    path = model_file(settings, "loras", lora_name, "lora_name")
    unet_config = getattr(model.unet, "config", None) if model is not None else None
    unet_names = unet_lora_names(unet_config) if unet_config is not None else {}
    shapes = {key: tuple(value.shape) for key, value in model.unet.state_dict().items()} if model else {}
    text_names = None
    if clip is not None:
        text_weights = clip.text.encoder.state_dict()
        text_names = text_lora_names(text_weights)
        shapes |= {f"text:{key}": tuple(value.shape) for key, value in text_weights.items()}
    try:
        patches = load_lora(path, unet_names=unet_names, text_names=text_names, weight_shapes=shapes)
    except (CheckpointError, ValueError) as error:
        raise ValueError(f"lora_name: {error}") from None
    log.info("LoRA %s", patches.summary())
    return patches


def _weight_patches(deltas: dict, strength: float, source: str) -> dict[str, WeightPatch]:
    return {key: WeightPatch(delta, strength, source) for key, delta in deltas.items()}


_STRENGTH = dict(min=-100.0, max=100.0, step=0.01)


@node(category="loaders", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP")], display_name="Load LoRA",
      fingerprint=file_fingerprint("loras", "lora_name"))
def LoraLoader(
    model: Socket("MODEL"),
    clip: Socket("CLIP"),
    lora_name: Combo(lora_names),
    strength_model: Float(1.0, **_STRENGTH),
    strength_clip: Float(1.0, **_STRENGTH),
    *,
    context: ExecutionContext,
) -> tuple:
    """Apply a LoRA to the diffusion model and the text encoder at separate strengths (0: unchanged)."""
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    patches = read_lora(context.settings, lora_name, model, clip)
    if strength_model != 0:
        model = model.with_patches(_weight_patches(patches.unet, strength_model, lora_name))
    if strength_clip != 0:
        clip = clip.with_patches(_weight_patches(patches.text, strength_clip, lora_name))
    return model, clip


@node(category="loaders", outputs=[("MODEL", "MODEL")], display_name="LoraLoaderModelOnly",
      fingerprint=file_fingerprint("loras", "lora_name"))
def LoraLoaderModelOnly(
    model: Socket("MODEL"), lora_name: Combo(lora_names), strength_model: Float(1.0, **_STRENGTH), *,
    context: ExecutionContext,
) -> tuple:
    """Apply a LoRA's diffusion-model part only."""
    if strength_model == 0:
        return (model,)
    patches = read_lora(context.settings, lora_name, model, None)
    return (model.with_patches(_weight_patches(patches.unet, strength_model, lora_name)),)
