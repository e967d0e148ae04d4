"""Latent nodes: empty latents, resizing, batch slicing and repeating, compositing and noise masks.

LATENT is ComfyUI's dict (nodes/values.py): "samples" [B, C, h, w] raw VAE latents, optional "noise_mask"
and "batch_index". Every node returns a new dict and never writes into its input, so a cached upstream
result stays what it was.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import Combo, Float, Int, Socket, node

MAX_RESOLUTION = 16384
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
CROP_METHODS = ["disabled", "center"]
#: ComfyUI's empty latents are 4-channel whatever the model; the sampler widens an all-zero latent to the
#: model's channel count (16 for SD3) when it starts (model-formats.md 5).
EMPTY_LATENT_CHANNELS = 4
#: Latent pixels per image pixel side: ComfyUI's nodes count in image pixels and divide by 8.
LATENT_SCALE = 8


def latent_samples(latent: Any, name: str) -> Tensor:
    """The [B, C, h, w] tensor of a LATENT input, or a clear error naming the input."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), Tensor):
        raise ValueError(f"{name}: expected a LATENT dict with a 'samples' tensor, got {type(latent).__name__}")
    samples = latent["samples"]
    if samples.dim() != 4:
        raise ValueError(f"{name}: latent samples must be [B, C, h, w], got shape {tuple(samples.shape)}")
    if samples.shape[0] == 0:
        raise ValueError(f"{name}: the latent batch is empty")
    return samples


def mask_batch(mask: Any, name: str) -> Tensor:
    """A MASK input as float32 [B, H, W] (a single [H, W] or ComfyUI's [B, 1, H, W] accepted)."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name}: expected a MASK tensor, got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ValueError(f"{name}: a MASK must be [B, H, W] or [H, W], got shape {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise ValueError(f"{name}: the mask is empty (shape {tuple(mask.shape)})")
    return mask.float()


def check_same_aspect(mask: Tensor, height: int, width: int, name: str, target: str) -> None:
    """A mask may come at another resolution (it is resized), never with another shape of picture: that is
    almost always the wrong mask, which ComfyUI would silently stretch."""
    if not bool(mask.any()):
        # An all-zero mask repaints nothing at any size: LoadImage's 64x64 stand-in for a picture without
        # alpha, which ComfyUI workflows feed to inpainting nodes as they are.
        return
    mask_height, mask_width = mask.shape[-2:]
    # Allows a pixel of rounding on each side at either resolution (an odd image size cropped to 8s).
    if abs(mask_height * width - height * mask_width) > max(width, mask_width) + max(height, mask_height):
        raise ValueError(f"{name}: the mask is {mask_width}x{mask_height} but {target} is {width}x{height}; "
                         "a mask must have the same aspect ratio (it is resized, never cropped)")


def check_mask_batch(mask: Tensor, batch: int, name: str) -> None:
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"{name}: {mask.shape[0]} masks for a batch of {batch}; give one mask or one per image")


def _slerp(low: Tensor, high: Tensor, ratio: Tensor) -> Tensor:
    """Spherical interpolation of [N, C] vectors by [N, 1] ratios, with the length interpolated linearly.

    Vectors of length zero count as direction zero; (anti)parallel pairs fall back to their start and to
    linear interpolation (where slerp divides by sin(omega) = 0), as ComfyUI's bislerp does."""
    low_norm = low.norm(dim=-1, keepdim=True)
    high_norm = high.norm(dim=-1, keepdim=True)
    low_unit = torch.where(low_norm == 0, 0.0, low / low_norm)
    high_unit = torch.where(high_norm == 0, 0.0, high / high_norm)
    dot = (low_unit * high_unit).sum(dim=-1, keepdim=True)
    omega = torch.acos(dot.clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    result = (torch.sin((1.0 - ratio) * omega) * low_unit + torch.sin(ratio * omega) * high_unit) / sin_omega
    result = result * (low_norm * (1.0 - ratio) + high_norm * ratio)
    result = torch.where(dot < 1e-5 - 1.0, low * (1.0 - ratio) + high * ratio, result)
    return torch.where(dot > 1.0 - 1e-5, low, result)


def _bilinear_taps(old: int, new: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For each of `new` output positions: the two source indices and the weight of the second, the
    sampling positions of bilinear interpolation with align_corners=False."""
    position = ((torch.arange(new, device=device, dtype=torch.float32) + 0.5) * (old / new) - 0.5).clamp(0, old - 1)
    first = position.floor().long()
    second = (first + 1).clamp(max=old - 1)
    return first, second, position - first


def bislerp(samples: Tensor, width: int, height: int) -> Tensor:
    """Resize [B, C, H, W] with bilinear taps but slerp between the channel vectors instead of a straight
    line, width first, then height (ComfyUI's "bislerp"): keeps latent vectors at a natural length."""
    dtype = samples.dtype
    result = samples.float()
    for axis, size in ((3, width), (2, height)):
        first, second, ratio = _bilinear_taps(result.shape[axis], size, result.device)
        moved = result.movedim(axis, -1).movedim(1, -1)  # [B, other, size_old, C]
        low = moved[..., first, :].reshape(-1, moved.shape[-1])
        high = moved[..., second, :].reshape(-1, moved.shape[-1])
        ratios = ratio.reshape(-1, 1).repeat(moved.shape[0] * moved.shape[1], 1)
        blended = _slerp(low, high, ratios).reshape(*moved.shape[:2], size, moved.shape[-1])
        result = blended.movedim(-1, 1).movedim(-1, axis)
    return result.to(dtype)


def center_crop_to_aspect(samples: Tensor, width: int, height: int) -> Tensor:
    """The centred part of [.., H, W] with the aspect ratio of width x height (ComfyUI's crop="center")."""
    old_height, old_width = samples.shape[-2:]
    old_aspect, new_aspect = old_width / old_height, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    return samples[..., y : old_height - y, x : old_width - x]


def upscale_samples(samples: Tensor, width: int, height: int, method: str, crop: str = "disabled") -> Tensor:
    """Resize channels-first [B, C, H, W] to width x height: torch's interpolation modes or bislerp."""
    if method not in UPSCALE_METHODS:
        raise ValueError(f"upscale_method must be one of {UPSCALE_METHODS}, got {method!r}")
    if crop == "center":
        samples = center_crop_to_aspect(samples, width, height)
    if method == "bislerp":
        return bislerp(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=method)


@node(category="latent", outputs=["LATENT"],
      description="Create a new batch of empty latent images to be denoised via sampling.")
def EmptyLatentImage(
    width: Int(512, min=16, max=MAX_RESOLUTION, step=8, tooltip="The width of the latent images in pixels."),
    height: Int(512, min=16, max=MAX_RESOLUTION, step=8, tooltip="The height of the latent images in pixels."),
    batch_size: Int(1, min=1, max=4096, tooltip="The number of latent images in the batch."),
) -> tuple:
    samples = torch.zeros(batch_size, EMPTY_LATENT_CHANNELS, height // LATENT_SCALE, width // LATENT_SCALE)
    return ({"samples": samples},)


def _upscaled(latent: dict, samples: Tensor) -> dict:
    return {**latent, "samples": samples}


@node(category="latent", outputs=["LATENT"])
def LatentUpscale(
    samples: Socket("LATENT"),
    upscale_method: Combo(UPSCALE_METHODS),
    width: Int(512, min=0, max=MAX_RESOLUTION, step=8),
    height: Int(512, min=0, max=MAX_RESOLUTION, step=8),
    crop: Combo(CROP_METHODS),
) -> tuple:
    """Resize the latent to width x height pixels; a 0 side follows the other with the aspect kept."""
    tensor = latent_samples(samples, "samples")
    if width == 0 and height == 0:
        return (samples,)
    latent_height, latent_width = tensor.shape[-2:]
    # ComfyUI's rules: a side of 0 keeps the aspect ratio, and no side goes below 64 pixels.
    if width == 0:
        width = round(latent_width * max(64, height) / latent_height)
    elif height == 0:
        height = round(latent_height * max(64, width) / latent_width)
    width, height = max(64, width), max(64, height)
    resized = upscale_samples(tensor, width // LATENT_SCALE, height // LATENT_SCALE, upscale_method, crop)
    return (_upscaled(samples, resized),)


@node(category="latent", outputs=["LATENT"])
def LatentUpscaleBy(
    samples: Socket("LATENT"),
    upscale_method: Combo(UPSCALE_METHODS),
    scale_by: Float(1.5, min=0.01, max=8.0, step=0.01),
) -> tuple:
    tensor = latent_samples(samples, "samples")
    width, height = round(tensor.shape[3] * scale_by), round(tensor.shape[2] * scale_by)
    if width < 1 or height < 1:
        raise ValueError(f"scale_by: {scale_by} would shrink the {tensor.shape[3]}x{tensor.shape[2]} latent to "
                         "nothing")
    return (_upscaled(samples, upscale_samples(tensor, width, height, upscale_method)),)


def _masks_per_item(masks: Tensor, batch: int) -> Tensor:
    """A noise mask batch lined up with the latent batch: fewer masks than latents repeat cyclically."""
    if masks.shape[0] >= batch:
        return masks
    return masks.repeat(math.ceil(batch / masks.shape[0]), *([1] * (masks.dim() - 1)))[:batch]


@node(category="latent/batch", outputs=["LATENT"])
def LatentFromBatch(
    samples: Socket("LATENT"),
    batch_index: Int(0, min=0, max=63),
    length: Int(1, min=1, max=64),
) -> tuple:
    """Take `length` latents from `batch_index` on; they keep their batch positions, so their noise is the
    noise they had in the whole batch."""
    tensor = latent_samples(samples, "samples")
    batch = tensor.shape[0]
    # ComfyUI clamps rather than fails: an index past the end takes the last latent.
    start = min(batch - 1, batch_index)
    length = min(batch - start, length)
    picked = {**samples, "samples": tensor[start : start + length].clone()}
    if "noise_mask" in samples:
        masks = samples["noise_mask"]
        if masks.shape[0] > 1:
            masks = _masks_per_item(masks, batch)[start : start + length]
        picked["noise_mask"] = masks.clone()
    positions = samples.get("batch_index", list(range(batch)))
    picked["batch_index"] = list(positions[start : start + length])
    return (picked,)


@node(category="latent/batch", outputs=["LATENT"])
def RepeatLatentBatch(samples: Socket("LATENT"), amount: Int(1, min=1, max=64)) -> tuple:
    tensor = latent_samples(samples, "samples")
    repeated = {**samples, "samples": tensor.repeat(amount, 1, 1, 1)}
    masks = samples.get("noise_mask")
    if masks is not None and masks.shape[0] > 1:
        masks = _masks_per_item(masks, tensor.shape[0])
        repeated["noise_mask"] = masks.repeat(amount, *([1] * (masks.dim() - 1)))
    if "batch_index" in samples:
        # Each copy continues the positions after the previous one, so every copy gets fresh noise.
        positions = list(samples["batch_index"])
        span = max(positions) - min(positions) + 1
        repeated["batch_index"] = [p + copy * span for copy in range(amount) for p in positions]
    return (repeated,)


def feather_ramp(size: int, feather: int, fade_start: bool, fade_end: bool) -> Tensor:
    """Weights along one side of a pasted latent: rising (1/f, 2/f, ..., 1) over `feather` rows on each
    edge that lies inside the destination (ComfyUI's LatentComposite feathering)."""
    ramp = torch.ones(size)
    count = min(feather, size)
    if count == 0:
        return ramp
    fade = torch.arange(1, count + 1, dtype=torch.float32) / feather
    if fade_start:
        ramp[:count] *= fade
    if fade_end:
        ramp[size - count :] *= fade.flip(0)
    return ramp


@node(category="latent", outputs=["LATENT"])
def LatentComposite(
    samples_to: Socket("LATENT"),
    samples_from: Socket("LATENT"),
    x: Int(0, min=0, max=MAX_RESOLUTION, step=8),
    y: Int(0, min=0, max=MAX_RESOLUTION, step=8),
    feather: Int(0, min=0, max=MAX_RESOLUTION, step=8),
) -> tuple:
    """Paste samples_from into samples_to at (x, y) pixels; what falls outside samples_to is cut off."""
    target = latent_samples(samples_to, "samples_to")
    source = latent_samples(samples_from, "samples_from")
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"samples_from: {source.shape[1]}-channel latents cannot be pasted into "
                         f"{target.shape[1]}-channel samples_to")
    if source.shape[0] not in (1, target.shape[0]):
        raise ValueError(f"samples_from: a batch of {source.shape[0]} cannot be pasted into a batch of "
                         f"{target.shape[0]} (give one latent or as many as samples_to has)")
    height, width = target.shape[-2:]
    left, top, feather = min(x // LATENT_SCALE, width), min(y // LATENT_SCALE, height), feather // LATENT_SCALE
    piece = source[:, :, : height - top, : width - left].to(target.dtype)
    rows, cols = piece.shape[-2:]
    result = target.clone()
    region = result[:, :, top : top + rows, left : left + cols]
    if feather > 0 and rows and cols:
        weight = (feather_ramp(rows, feather, top != 0, top + rows < height)[:, None]
                  * feather_ramp(cols, feather, left != 0, left + cols < width)[None, :]).to(target.device)
        piece = piece * weight + region * (1.0 - weight)
    region[...] = piece
    return ({**samples_to, "samples": result},)


@node(category="latent/inpaint", outputs=["LATENT"])
def SetLatentNoiseMask(samples: Socket("LATENT"), mask: Socket("MASK")) -> tuple:
    """Only the masked part (1) is re-noised and resampled; the sampler resizes the mask to the latent."""
    tensor = latent_samples(samples, "samples")
    masks = mask_batch(mask, "mask")
    check_same_aspect(masks, tensor.shape[2], tensor.shape[3], "mask", "the latent (in latent pixels)")
    check_mask_batch(masks, tensor.shape[0], "mask")
    return ({**samples, "noise_mask": masks.reshape(-1, 1, *masks.shape[-2:])},)
