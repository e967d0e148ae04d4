"""Image filters and simple transforms from ComfyUI's core: Gaussian blur, sharpening, blending two images by
a blend mode, palette quantization (with Floyd-Steinberg or ordered Bayer dithering), flipping and rotating
by quarter turns, and feathering a mask's edges.

IMAGE is float32 [B, H, W, C] in 0..1 on the CPU, MASK float32 [B, H, W] (nodes/values.py). No node
changes its inputs: each returns a new tensor.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from engine import Combo, Float, Int, Socket, node
from nodes.image import image_batch, scale_image
from nodes.latent import MAX_RESOLUTION, mask_batch

BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]
DITHER_METHODS = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]
FLIP_METHODS = ["x-axis: vertically", "y-axis: horizontally"]
ROTATIONS = ["none", "90 degrees", "180 degrees", "270 degrees"]
FILTERS_CATEGORY = "image/filters"


# --- blur and sharpen -------------------------------------------------------------------------------------

def gaussian_taps(radius: int, sigma: float) -> Tensor:
    """The normalised 1D Gaussian of 2r+1 taps spaced evenly over [-1, 1], not one pixel apart: ComfyUI's
    spacing, so `sigma` is relative to the radius (sigma 1 is nearly flat at any radius)."""
    taps = torch.linspace(-1.0, 1.0, 2 * radius + 1, dtype=torch.float64)
    weights = torch.exp(-taps * taps / (2.0 * sigma * sigma))
    return weights / weights.sum()


def gaussian_kernel(radius: int, sigma: float) -> Tensor:
    """ComfyUI's square blur kernel, exp(-(x^2 + y^2) / 2 sigma^2) normalised: the outer product of the 1D
    taps, which is why the blur can run as two 1D passes."""
    taps = gaussian_taps(radius, sigma)
    return torch.outer(taps, taps).float()


def gaussian_blur(image: Tensor, radius: int, sigma: float, input_name: str) -> Tensor:
    """Each channel of [B, H, W, C] blurred by the (2r+1)^2 Gaussian, the edges mirrored (reflect padding,
    which needs the image larger than the radius on both sides); two 1D passes, (2r+1) times cheaper."""
    height, width, channels = image.shape[1:]
    if radius >= height or radius >= width:
        raise ValueError(f"{input_name}: a radius of {radius} needs an image of at least {radius + 1} pixels "
                         f"on each side, got {width}x{height}")
    channels_first = F.pad(image.float().movedim(-1, 1), (radius, radius, radius, radius), mode="reflect")
    taps = gaussian_taps(radius, sigma).float()
    across = F.conv2d(channels_first, taps.reshape(1, 1, 1, -1).expand(channels, -1, -1, -1), groups=channels)
    down = F.conv2d(across, taps.reshape(1, 1, -1, 1).expand(channels, -1, -1, -1), groups=channels)
    return down.movedim(1, -1)


@node(category=FILTERS_CATEGORY, outputs=["IMAGE"], display_name="Blur Image")
def ImageBlur(image: Socket("IMAGE"), blur_radius: Int(1, min=1, max=31, step=1),
              sigma: Float(1.0, min=0.1, max=10.0, step=0.1)) -> tuple:
    """Gaussian blur over a (2 * blur_radius + 1) square, edges mirrored."""
    return (gaussian_blur(image_batch(image, "image"), blur_radius, sigma, "blur_radius"),)


@node(category=FILTERS_CATEGORY, outputs=["IMAGE"], display_name="Sharpen Image")
def ImageSharpen(image: Socket("IMAGE"), sharpen_radius: Int(1, min=1, max=31, step=1),
                 sigma: Float(1.0, min=0.1, max=10.0, step=0.01),
                 alpha: Float(1.0, min=0.0, max=5.0, step=0.01)) -> tuple:
    """Unsharp masking: the image plus 10 * alpha times its difference from its Gaussian blur, clamped to
    0..1 (a flat area stays as it is)."""
    image = image_batch(image, "image")
    # ComfyUI's kernel, -10 alpha G with its centre raised until it sums to 1, is this difference.
    blurred = gaussian_blur(image, sharpen_radius, sigma, "sharpen_radius")
    amount = alpha * 10.0
    return (((1.0 + amount) * image.float() - amount * blurred).clamp(0.0, 1.0),)


# --- blending ---------------------------------------------------------------------------------------------

def _soft_light_lift(base: Tensor) -> Tensor:
    # The W3C compositing spec's D(x) for soft light: a cubic in the shadows, the square root elsewhere.
    return torch.where(base <= 0.25, ((16.0 * base - 12.0) * base + 4.0) * base, torch.sqrt(base))


BLEND_FORMULAS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "normal": lambda base, top: top,
    "multiply": lambda base, top: base * top,
    "screen": lambda base, top: 1.0 - (1.0 - base) * (1.0 - top),
    "overlay": lambda base, top: torch.where(base <= 0.5, 2.0 * base * top,
                                             1.0 - 2.0 * (1.0 - base) * (1.0 - top)),
    "soft_light": lambda base, top: torch.where(
        top <= 0.5, base - (1.0 - 2.0 * top) * base * (1.0 - base),
        base + (2.0 * top - 1.0) * (_soft_light_lift(base) - base)),
    # ComfyUI's difference is signed (image1 - image2, then clamped), not the usual |image1 - image2|.
    "difference": lambda base, top: base - top,
}


def _matching_channels(image1: Tensor, image2: Tensor) -> Tensor:
    """image2 with image1's channel count: its alpha dropped, or an opaque alpha added."""
    if image2.shape[-1] > image1.shape[-1]:
        return image2[..., :image1.shape[-1]]
    if image2.shape[-1] < image1.shape[-1]:
        return F.pad(image2, (0, image1.shape[-1] - image2.shape[-1]), value=1.0)
    return image2


@node(category=FILTERS_CATEGORY, outputs=["IMAGE"], display_name="Blend Images")
def ImageBlend(image1: Socket("IMAGE"), image2: Socket("IMAGE"),
               blend_factor: Float(0.5, min=0.0, max=1.0, step=0.01), blend_mode: Combo(BLEND_MODES)) -> tuple:
    """image2 laid over image1 by `blend_mode`, mixed with image1 by `blend_factor` (0: image1 alone) and
    clamped to 0..1; image2 is resized to image1 (bicubic, centre crop) and image1's alpha is kept."""
    image1 = image_batch(image1, "image1").float()
    image2 = _matching_channels(image1, image_batch(image2, "image2").float())
    if image2.shape[1:3] != image1.shape[1:3]:
        image2 = scale_image(image2, image1.shape[2], image1.shape[1], "bicubic", "center")
    if image1.shape[0] != image2.shape[0] and 1 not in (image1.shape[0], image2.shape[0]):
        raise ValueError(f"image2: a batch of {image2.shape[0]} cannot blend with image1's batch of "
                         f"{image1.shape[0]} (give one image, or batches of the same size)")
    blended = BLEND_FORMULAS[blend_mode](image1, image2)
    mixed = (image1 * (1.0 - blend_factor) + blended * blend_factor).clamp(0.0, 1.0)
    if image1.shape[-1] == 4:  # alpha is coverage, not a colour to blend
        mixed[..., 3] = image1[..., 3]
    return (mixed,)


# --- quantization -----------------------------------------------------------------------------------------

def bayer_thresholds(order: int) -> Tensor:
    """The order x order ordered-dither matrix as thresholds centred on 0, in (-0.5, 0.5): entry i of the
    classic Bayer index matrix becomes (i + 0.5) / order^2 - 0.5."""
    index = torch.zeros(1, 1, dtype=torch.float64)
    while index.shape[0] < order:
        index = torch.cat([torch.cat([4 * index, 4 * index + 2], dim=1),
                           torch.cat([4 * index + 3, 4 * index + 1], dim=1)])
    return (index + 0.5) / (order * order) - 0.5


def bayer_dithered(picture: Image.Image, palette: Image.Image, order: int) -> Image.Image:
    """Ordered dithering: each pixel nudged by its threshold, scaled to twice the palette's spacing on a
    0..255 scale, then mapped to a palette colour by Pillow's (nearly nearest) lookup, undithered."""
    palette_size = len(palette.getpalette()) // 3
    offsets = bayer_thresholds(order) * (2 * 256 / palette_size) + 0.5
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32).copy())
    height, width = pixels.shape[:2]
    tiled = offsets.repeat(math.ceil(height / order), math.ceil(width / order))[:height, :width]
    nudged = (pixels + tiled.unsqueeze(-1).float()).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(nudged.numpy(), "RGB").quantize(palette=palette, dither=Image.Dither.NONE)


def quantize_picture(rgb: Tensor, colors: int, dither: str) -> Tensor:
    """One [H, W, 3] image reduced to a palette of at most `colors` colours (Pillow's median cut)."""
    # ComfyUI truncates to 8 bits (x * 255 cast down) rather than rounding.
    picture = Image.fromarray((rgb.clamp(0.0, 1.0) * 255.0).to(torch.uint8).numpy(), "RGB")
    # The palette comes from a first quantize and is applied in a second one, as Pillow needs to honour
    # the dither choice (Pillow issue 5836).
    palette = picture.quantize(colors=colors)
    if dither.startswith("bayer-"):
        quantized = bayer_dithered(picture, palette, int(dither.split("-")[1]))
    else:
        method = Image.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else Image.Dither.NONE
        quantized = picture.quantize(palette=palette, dither=method)
    return torch.from_numpy(np.asarray(quantized.convert("RGB"), dtype=np.float32) / 255.0)


@node(category=FILTERS_CATEGORY, outputs=["IMAGE"], display_name="Quantize Image")
def ImageQuantize(image: Socket("IMAGE"), colors: Int(256, min=1, max=256, step=1),
                  dither: Combo(DITHER_METHODS)) -> tuple:
    """Each image reduced to its own palette of at most `colors` colours; an alpha channel passes through."""
    image = image_batch(image, "image")
    if image.shape[-1] not in (3, 4):
        raise ValueError(f"image: quantizing needs RGB or RGBA images, got {image.shape[-1]} channels")
    quantized = torch.stack([quantize_picture(picture[..., :3], colors, dither) for picture in image])
    return (torch.cat([quantized, image[..., 3:].float()], dim=-1),)


# --- transforms -------------------------------------------------------------------------------------------

@node(category="image/transform", outputs=["IMAGE"])
def ImageFlip(image: Socket("IMAGE"), flip_method: Combo(FLIP_METHODS)) -> tuple:
    """Mirror each image: about the x axis (upside down) or about the y axis (left to right)."""
    image = image_batch(image, "image")
    return (torch.flip(image, dims=[1] if flip_method.startswith("x") else [2]),)


@node(category="image/transform", outputs=["IMAGE"], display_name="Rotate Image")
def ImageRotate(image: Socket("IMAGE"), rotation: Combo(ROTATIONS)) -> tuple:
    """Turn each image clockwise by a quarter, half or three-quarter turn."""
    image = image_batch(image, "image")
    quarter_turns = ROTATIONS.index(rotation)
    # rot90 from the width axis towards the height axis turns the picture clockwise.
    return (torch.rot90(image, k=quarter_turns, dims=[2, 1]).clone(),)


# --- masks ------------------------------------------------------------------------------------------------

def _edge_ramp(size: int, start: int, end: int) -> Tensor:
    """Per-position factors along one axis: (i + 1) / start over the first `start` positions, and a ramp over
    the last `end` positions as ComfyUI writes it, which indexes the far edge as -i: its first step (i = 0)
    lands on position 0, so the outermost far position gets 2 / end and position 0 an extra 1 / end."""
    factors = torch.ones(size, dtype=torch.float64)
    start, end = min(start, size), min(end, size)
    factors[:start] *= torch.arange(1, start + 1, dtype=torch.float64) / max(start, 1)
    far_steps = torch.arange(end)
    factors[(-far_steps) % size] *= (far_steps + 1).double() / max(end, 1)
    return factors


@node(category="mask", outputs=["MASK"])
def FeatherMask(mask: Socket("MASK"), left: Int(0, min=0, max=MAX_RESOLUTION, step=1),
                top: Int(0, min=0, max=MAX_RESOLUTION, step=1), right: Int(0, min=0, max=MAX_RESOLUTION, step=1),
                bottom: Int(0, min=0, max=MAX_RESOLUTION, step=1)) -> tuple:
    """Fade the mask linearly towards each edge over the given number of pixels (ramps that meet multiply);
    the right and bottom ramps start one pixel in, as in ComfyUI, and scale the first column or row too."""
    masks = mask_batch(mask, "mask")
    height, width = masks.shape[1:]
    rows = _edge_ramp(height, top, bottom).unsqueeze(1)
    columns = _edge_ramp(width, left, right).unsqueeze(0)
    return ((masks.double() * rows * columns).float(),)
