"""Mask nodes: solid masks, conversion from and to images, inversion, thresholds, cropping, compositing,
growing and shrinking. MASK is float32 [B, H, W] in 0..1, IMAGE [B, H, W, C] (nodes/values.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import Boolean, Combo, Float, Int, Socket, node
from nodes.image import image_batch
from nodes.latent import MAX_RESOLUTION, mask_batch

IMAGE_CHANNELS = ["red", "green", "blue", "alpha"]
COMPOSITE_OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]


@node(category="mask", outputs=["MASK"])
def SolidMask(value: Float(1.0, min=0.0, max=1.0, step=0.01),
              width: Int(512, min=1, max=MAX_RESOLUTION, step=1),
              height: Int(512, min=1, max=MAX_RESOLUTION, step=1)) -> tuple:
    return (torch.full((1, height, width), value, dtype=torch.float32),)


@node(category="mask", outputs=["MASK"])
def InvertMask(mask: Socket("MASK")) -> tuple:
    return (1.0 - mask_batch(mask, "mask"),)


@node(category="mask", outputs=["MASK"])
def ImageToMask(image: Socket("IMAGE"), channel: Combo(IMAGE_CHANNELS)) -> tuple:
    image = image_batch(image, "image")
    index = IMAGE_CHANNELS.index(channel)
    if index >= image.shape[-1]:
        raise ValueError(f"channel: the image has {image.shape[-1]} channels, so no {channel!r} channel")
    return (image[..., index].clone(),)


@node(category="mask", outputs=["IMAGE"])
def MaskToImage(mask: Socket("MASK")) -> tuple:
    return (mask_batch(mask, "mask").unsqueeze(-1).expand(-1, -1, -1, 3).clone(),)


@node(category="mask", outputs=["MASK"])
def ThresholdMask(mask: Socket("MASK"), value: Float(0.5, min=0.0, max=1.0, step=0.01)) -> tuple:
    """1 where the mask is above `value`, else 0."""
    return ((mask_batch(mask, "mask") > value).float(),)


@node(category="mask", outputs=["MASK"])
def CropMask(mask: Socket("MASK"), x: Int(0, min=0, max=MAX_RESOLUTION, step=1),
             y: Int(0, min=0, max=MAX_RESOLUTION, step=1), width: Int(512, min=1, max=MAX_RESOLUTION, step=1),
             height: Int(512, min=1, max=MAX_RESOLUTION, step=1)) -> tuple:
    return (mask_batch(mask, "mask")[:, y:y + height, x:x + width].clone(),)


def _combined(destination: Tensor, source: Tensor, operation: str) -> Tensor:
    if operation in ("and", "or", "xor"):
        logical = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}[operation]
        return logical(destination.round().bool(), source.round().bool()).float()
    return {"multiply": destination * source, "add": destination + source,
            "subtract": destination - source}[operation]


@node(category="mask", outputs=["MASK"])
def MaskComposite(destination: Socket("MASK"), source: Socket("MASK"),
                  x: Int(0, min=0, max=MAX_RESOLUTION, step=1), y: Int(0, min=0, max=MAX_RESOLUTION, step=1),
                  operation: Combo(COMPOSITE_OPERATIONS)) -> tuple:
    """`source` combined into `destination` with its top-left corner at (x, y), clipped to the destination;
    the result is clamped to 0..1 (and/or/xor round both masks to 0 or 1 first)."""
    output, source = mask_batch(destination, "destination").clone(), mask_batch(source, "source")
    if output.shape[0] not in (1, source.shape[0]) and source.shape[0] != 1:
        raise ValueError(f"source: {source.shape[0]} masks cannot combine with {output.shape[0]} destination masks")
    bottom, right = min(y + source.shape[1], output.shape[1]), min(x + source.shape[2], output.shape[2])
    if bottom > y and right > x:
        region = output[:, y:bottom, x:right]
        combined = _combined(region, source[:, :bottom - y, :right - x], operation)
        output = output.expand(combined.shape[0], -1, -1).clone()
        output[:, y:bottom, x:right] = combined
    return (output.clamp(0.0, 1.0),)


def grow_step(masks: Tensor, tapered_corners: bool, shrink: bool) -> Tensor:
    """One step of greyscale dilation (or erosion) of [B, H, W] over the 3x3 neighbourhood, or over the
    plus-shaped one when `tapered_corners`; edges count as their nearest pixel (scipy's 'reflect' mode,
    which ComfyUI's GrowMask uses)."""
    sign = -1.0 if shrink else 1.0
    padded = F.pad((sign * masks).unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    height, width = masks.shape[-2:]
    offsets = [(dy, dx) for dy in range(3) for dx in range(3)
               if not (tapered_corners and dy != 1 and dx != 1)]
    shifted = torch.stack([padded[:, dy:dy + height, dx:dx + width] for dy, dx in offsets])
    return sign * shifted.amax(dim=0)


@node(category="mask", outputs=["MASK"],
      description="Grow the mask by `expand` pixels (shrink it when negative); tapered corners grow it as a "
                  "diamond rather than a square.")
def GrowMask(mask: Socket("MASK"), expand: Int(0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1),
             tapered_corners: Boolean(True)) -> tuple:
    grown = mask_batch(mask, "mask")
    for _ in range(abs(expand)):
        step = grow_step(grown, tapered_corners, shrink=expand < 0)
        if torch.equal(step, grown):
            break  # nothing left to grow into: the rest of the steps would change nothing
        grown = step
    return (grown,)
