"""Mask nodes: solid masks, inversion, growing and shrinking. MASK is float32 [B, H, W] in 0..1 (nodes/values.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import Boolean, Float, Int, Socket, node
from nodes.latent import MAX_RESOLUTION, mask_batch


@node(category="mask", outputs=["MASK"])
def SolidMask(value: Float(1.0, min=0.0, max=1.0, step=0.01),
              width: Int(512, min=1, max=MAX_RESOLUTION, step=1),
              height: Int(512, min=1, max=MAX_RESOLUTION, step=1)) -> tuple:
    return (torch.full((1, height, width), value, dtype=torch.float32),)


@node(category="mask", outputs=["MASK"])
def InvertMask(mask: Socket("MASK")) -> tuple:
    return (1.0 - mask_batch(mask, "mask"),)


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
