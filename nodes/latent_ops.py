"""Latent arithmetic and transforms: add, subtract, multiply, interpolate, blend, rotate, flip, crop, batch,
batch seed behaviour, and saving and loading `.latent` files (ComfyUI's class names, inputs and defaults).

Every node returns a new LATENT dict (nodes/values.py) and never writes into its input. Where two latents
meet, the second is fitted to the first as ComfyUI does: resized (bilinear, centre crop) when its size
differs and repeated or cut to the first's batch. Latents with other channel counts (another model family)
are refused, naming the input.
`.latent` files are safetensors read and written only inside the input and output folders.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor

from engine import Combo, ExecutionContext, Float, Hidden, Int, NodeResult, RunSettings, Socket, String, node
from engine.paths import UnsafePathError, list_files, resolve_inside
from nodes.image import (check_filename_prefix, expand_filename_prefix, next_file_counter, output_location,
                         repeat_to_batch, write_new_file)
from nodes.latent import LATENT_SCALE, MAX_RESOLUTION, latent_samples, upscale_samples

ROTATIONS = ["none", "90 degrees", "180 degrees", "270 degrees"]
FLIP_METHODS = ["x-axis: vertically", "y-axis: horizontally"]
SEED_BEHAVIORS = ["random", "fixed"]
LATENT_EXTENSION = ".latent"
#: Files without this key were written before ComfyUI stored raw latents: they hold latents already scaled
#: by SD1's 0.18215, which LoadLatent undoes.
FORMAT_VERSION_KEY = "latent_format_version_0"
LEGACY_SCALE = 0.18215


# --- fitting one latent to another ------------------------------------------------------------------------

def fit_to(reference: Tensor, other: Tensor, name: str, reference_name: str, *, method: str = "bilinear",
           repeat_batch: bool = True) -> Tensor:
    """`other` at `reference`'s size (resized with a centre crop) and, with repeat_batch, its batch."""
    if other.shape[1] != reference.shape[1]:
        raise ValueError(f"{name}: {other.shape[1]}-channel latents cannot be combined with {reference_name}'s "
                         f"{reference.shape[1]} channels (latents of different model families)")
    if other.shape[-2:] != reference.shape[-2:]:
        other = upscale_samples(other, reference.shape[3], reference.shape[2], method, "center")
    if repeat_batch:
        other = repeat_to_batch(other, reference.shape[0])
    return other.to(reference.dtype)


def _with_samples(latent: dict, samples: Tensor, **changes: Any) -> dict:
    return {**latent, "samples": samples, **changes}


# --- arithmetic -------------------------------------------------------------------------------------------

def _pair(samples1: Any, samples2: Any) -> tuple[Tensor, Tensor]:
    first = latent_samples(samples1, "samples1")
    return first, fit_to(first, latent_samples(samples2, "samples2"), "samples2", "samples1")


@node(category="latent/advanced", outputs=["LATENT"])
def LatentAdd(samples1: Socket("LATENT"), samples2: Socket("LATENT")) -> tuple:
    first, second = _pair(samples1, samples2)
    return (_with_samples(samples1, first + second),)


@node(category="latent/advanced", outputs=["LATENT"])
def LatentSubtract(samples1: Socket("LATENT"), samples2: Socket("LATENT")) -> tuple:
    first, second = _pair(samples1, samples2)
    return (_with_samples(samples1, first - second),)


@node(category="latent/advanced", outputs=["LATENT"])
def LatentMultiply(samples: Socket("LATENT"), multiplier: Float(1.0, min=-10.0, max=10.0, step=0.01)) -> tuple:
    return (_with_samples(samples, latent_samples(samples, "samples") * multiplier),)


def _unit_and_length(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Per latent pixel: the channel vector's direction (zero for a zero vector) and its length."""
    length = torch.linalg.vector_norm(samples, dim=1, keepdim=True)
    return torch.nan_to_num(samples / length), length


@node(category="latent/advanced", outputs=["LATENT"])
def LatentInterpolate(samples1: Socket("LATENT"), samples2: Socket("LATENT"),
                      ratio: Float(1.0, min=0.0, max=1.0, step=0.01)) -> tuple:
    """ratio 1 is samples1. At every latent pixel the channel vectors' directions are mixed linearly and
    renormalised, and their lengths mixed separately, so a half-way latent keeps a natural magnitude."""
    first, second = _pair(samples1, samples2)
    # ComfyUI's per-position norms drop the channel axis and so only broadcast for a batch of one; the
    # norm is kept per latent pixel here, which is what it computes for that batch.
    direction1, length1 = _unit_and_length(first)
    direction2, length2 = _unit_and_length(second)
    direction, _ = _unit_and_length(direction1 * ratio + direction2 * (1.0 - ratio))
    return (_with_samples(samples1, direction * (length1 * ratio + length2 * (1.0 - ratio))),)


@node(category="_for_testing", outputs=["LATENT"])
def LatentBlend(samples1: Socket("LATENT"), samples2: Socket("LATENT"),
                blend_factor: Float(0.5, min=0.0, max=1.0, step=0.01)) -> tuple:
    """blend_factor of samples1 plus the rest of samples2 (ComfyUI's "normal" blend mode, its only one,
    which it does not show as an input); samples2 is resized bicubically to samples1's size."""
    first = latent_samples(samples1, "samples1")
    second = latent_samples(samples2, "samples2")
    if second.shape[0] not in (1, first.shape[0]):
        raise ValueError(f"samples2: a batch of {second.shape[0]} cannot be blended into samples1's batch of "
                         f"{first.shape[0]} (give one latent or as many as samples1 has)")
    second = fit_to(first, second, "samples2", "samples1", method="bicubic", repeat_batch=False)
    return (_with_samples(samples1, first * blend_factor + second * (1.0 - blend_factor)),)


# --- transforms -------------------------------------------------------------------------------------------

def _transformed(latent: dict, transform: Any) -> dict:
    """The latent with `transform` applied to its samples and, so it still covers the same part, its mask.
    (ComfyUI leaves the noise mask as it was, which the sampler would then stretch over the new shape.)"""
    changes = {}
    if isinstance(latent.get("noise_mask"), Tensor):
        changes["noise_mask"] = transform(latent["noise_mask"])
    return _with_samples(latent, transform(latent_samples(latent, "samples")), **changes)


@node(category="latent/transform", outputs=["LATENT"])
def LatentRotate(samples: Socket("LATENT"), rotation: Combo(ROTATIONS)) -> tuple:
    """Rotate clockwise by the chosen angle."""
    turns = ROTATIONS.index(rotation)
    return (_transformed(samples, lambda values: torch.rot90(values, k=turns, dims=(-1, -2))),)


@node(category="latent/transform", outputs=["LATENT"])
def LatentFlip(samples: Socket("LATENT"), flip_method: Combo(FLIP_METHODS)) -> tuple:
    """"x-axis" mirrors top and bottom, "y-axis" left and right (flipping about that axis)."""
    axis = -2 if flip_method == FLIP_METHODS[0] else -1
    return (_transformed(samples, lambda values: torch.flip(values, dims=(axis,))),)


@node(category="latent/transform", outputs=["LATENT"])
def LatentCrop(samples: Socket("LATENT"), width: Int(512, min=64, max=MAX_RESOLUTION, step=8),
               height: Int(512, min=64, max=MAX_RESOLUTION, step=8),
               x: Int(0, min=0, max=MAX_RESOLUTION, step=8), y: Int(0, min=0, max=MAX_RESOLUTION, step=8)) -> tuple:
    """The width x height pixel region at (x, y); a region past the edge is cut to what there is."""
    tensor = latent_samples(samples, "samples")
    latent_height, latent_width = tensor.shape[-2:]
    # ComfyUI's rule: the corner stays at least 8 latent pixels (64 image pixels) from the far edges.
    left = max(0, min(x // LATENT_SCALE, latent_width - 8))
    top = max(0, min(y // LATENT_SCALE, latent_height - 8))
    right = min(latent_width, left + width // LATENT_SCALE)
    bottom = min(latent_height, top + height // LATENT_SCALE)

    def crop(values: Tensor) -> Tensor:
        scale_y, scale_x = values.shape[-2] / latent_height, values.shape[-1] / latent_width
        return values[..., round(top * scale_y) : round(bottom * scale_y),
                      round(left * scale_x) : round(right * scale_x)].clone()
    return (_transformed(samples, crop),)


# --- batches ----------------------------------------------------------------------------------------------

def _masks_for(latent: dict, batch: int, size: tuple[int, int]) -> Tensor:
    """The latent's noise mask as [batch, 1, *size] (all ones, every pixel resampled, where it has none)."""
    mask = latent.get("noise_mask")
    if not isinstance(mask, Tensor):
        return torch.ones(batch, 1, *size)
    mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
    if mask.shape[-2:] != size:
        mask = F.interpolate(mask, size=size, mode="bilinear")
    return repeat_to_batch(mask, batch)


@node(category="latent/batch", outputs=["LATENT"])
def LatentBatch(samples1: Socket("LATENT"), samples2: Socket("LATENT")) -> tuple:
    """samples2 after samples1 in one batch; samples2 is resized to samples1's size if it differs."""
    first = latent_samples(samples1, "samples1")
    second = fit_to(first, latent_samples(samples2, "samples2"), "samples2", "samples1", repeat_batch=False)
    positions1 = list(samples1.get("batch_index", range(first.shape[0])))
    positions2 = list(samples2.get("batch_index", range(second.shape[0])))
    batched = {**samples1, "samples": torch.cat([first, second]), "batch_index": positions1 + positions2}
    # ComfyUI keeps samples1's mask for the whole batch; each half keeps its own here.
    if "noise_mask" in samples1 or "noise_mask" in samples2:
        reference = samples1.get("noise_mask", samples2.get("noise_mask"))
        size = tuple(reference.shape[-2:])
        batched["noise_mask"] = torch.cat([_masks_for(samples1, first.shape[0], size),
                                           _masks_for(samples2, second.shape[0], size)])
    return (batched,)


@node(category="latent/advanced", outputs=["LATENT"])
def LatentBatchSeedBehavior(samples: Socket("LATENT"), seed_behavior: Combo(SEED_BEHAVIORS, default="fixed")) -> tuple:
    """"fixed": every latent gets the first one's noise; "random": each gets the noise of its batch position."""
    tensor = latent_samples(samples, "samples")
    result = dict(samples)
    if seed_behavior == "random":
        result.pop("batch_index", None)
    else:
        first = list(samples.get("batch_index", [0]))[0]
        result["batch_index"] = [first] * tensor.shape[0]
    return (result,)


# --- files ------------------------------------------------------------------------------------------------

def _safetensors_metadata(prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    metadata = {"prompt": json.dumps(prompt, allow_nan=False) if prompt is not None else ""}
    if isinstance(extra_pnginfo, dict):
        metadata.update({key: json.dumps(value, allow_nan=False) for key, value in extra_pnginfo.items()})
    return metadata


@node(category="_for_testing", output_node=True, validate=check_filename_prefix)
def SaveLatent(samples: Socket("LATENT"), filename_prefix: String("latents/ComfyUI"),
               prompt: Hidden("PROMPT"), extra_pnginfo: Hidden("EXTRA_PNGINFO"), *,
               context: ExecutionContext) -> NodeResult:
    """Write the raw latents as `{prefix}_{counter:05}_.latent` (safetensors) in the output folder."""
    tensor = latent_samples(samples, "samples")
    root = context.settings.output_dir
    expanded = expand_filename_prefix(filename_prefix, width=0, height=0, prompt=prompt)
    folder, subfolder, filename = output_location(root, expanded)
    tensors = {"latent_tensor": tensor.detach().cpu().contiguous(), FORMAT_VERSION_KEY: torch.tensor([])}
    content = safetensors.torch.save(tensors, metadata=_safetensors_metadata(prompt, extra_pnginfo))
    name, _ = write_new_file(folder, lambda number: f"{filename}_{number:05}_{LATENT_EXTENSION}",
                             next_file_counter(folder, filename), lambda target: target.write(content))
    return NodeResult(ui={"latents": [{"filename": name, "subfolder": subfolder, "type": "output"}]})


def input_latents(settings: RunSettings) -> list[str]:
    return list_files(settings.input_dir, (LATENT_EXTENSION,))


def _latent_file_digest(constants: Mapping[str, Any], settings: RunSettings) -> str:
    # A file replaced under the same name must load again (ComfyUI hashes it too).
    return hashlib.sha256(resolve_inside(settings.input_dir, constants["latent"]).read_bytes()).hexdigest()


@node(category="_for_testing", outputs=["LATENT"], fingerprint=_latent_file_digest)
def LoadLatent(latent: Combo(input_latents), *, context: ExecutionContext) -> tuple:
    """Read a `.latent` file from the input folder (safetensors only, nothing is unpickled)."""
    try:
        path = resolve_inside(context.settings.input_dir, latent)
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except (UnsafePathError, OSError, safetensors.SafetensorError) as problem:
        raise ValueError(f"latent: {latent!r} cannot be read as a .latent (safetensors) file: {problem}") from None
    samples = tensors.get("latent_tensor")
    if samples is None or samples.dim() != 4:
        found = "no 'latent_tensor'" if samples is None else f"a latent_tensor of shape {tuple(samples.shape)}"
        raise ValueError(f"latent: {latent!r} holds {found}; a .latent file holds [B, C, h, w] 'latent_tensor'")
    multiplier = 1.0 if FORMAT_VERSION_KEY in tensors else 1.0 / LEGACY_SCALE
    return ({"samples": samples.float() * multiplier},)
