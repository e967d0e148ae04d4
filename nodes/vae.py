"""VAE nodes: IMAGE <-> LATENT, whole or in tiles, and the inpainting encode that greys out the masked area.

IMAGE is [B, H, W, C] in 0..1, float32 on the CPU; the VAE takes [B, 3, H, W] in [-1, 1] on the compute
device in its own dtype (nodes/values.py). The VAE runs under the shared ModelManager (nodes/runtime.py), so
it is moved to the device only while it works, and results come back as float32 CPU tensors.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.vae import AutoencoderKL, blend_tiles
from engine import ExecutionContext, Int, Socket, node
from nodes.latent import check_mask_batch, check_same_aspect, latent_samples, mask_batch
from nodes.runtime import model_manager
from nodes.values import VaeHandle

log = logging.getLogger(__name__)

# The tiled nodes' inputs as ComfyUI declares them; the temporal ones only matter to video VAEs.
TILE_OVERLAP = Int(64, min=0, max=4096, step=32)
TEMPORAL_OVERLAP = Int(8, min=4, max=4096, step=4, tooltip="Only used for video VAEs: Amount of frames to overlap.")
#: Latent tile and overlap of the out-of-memory encode fallback: ComfyUI's 512 and 64 pixels.
FALLBACK_TILE, FALLBACK_OVERLAP = 64, 8


def _temporal_size(verb: str) -> Int:
    return Int(64, min=8, max=4096, step=4, tooltip=f"Only used for video VAEs: Amount of frames to {verb} at a time.")


def _vae_of(vae: Any) -> AutoencoderKL:
    if not isinstance(vae, VaeHandle):
        raise ValueError("vae: the input is not a VAE (a checkpoint without one gives None); "
                         f"got {type(vae).__name__}")
    return vae.vae


def _image_batch(pixels: Any, name: str, factor: int) -> Tensor:
    """An IMAGE input checked for its layout and for a size the VAE can take, or a clear error."""
    if not isinstance(pixels, Tensor) or pixels.dim() != 4:
        shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise ValueError(f"{name}: an IMAGE must be a [B, H, W, C] tensor, got {shape}")
    batch, height, width, channels = pixels.shape
    if batch == 0:
        raise ValueError(f"{name}: the image batch is empty")
    if channels < 3:
        raise ValueError(f"{name}: the image has {channels} channel(s); the VAE needs RGB (3)")
    if height < factor or width < factor:
        raise ValueError(f"{name}: the image is {width}x{height}; the VAE needs at least {factor}x{factor} pixels")
    return pixels


def _crop_offsets(height: int, width: int, factor: int) -> tuple[slice, slice]:
    """The centred rows and columns that are a multiple of `factor` (ComfyUI crops VAE input this way)."""
    rows, cols = height // factor * factor, width // factor * factor
    top, left = (height % factor) // 2, (width % factor) // 2
    return slice(top, top + rows), slice(left, left + cols)


def _cropped(pixels: Tensor, factor: int, context: ExecutionContext) -> Tensor:
    height, width = pixels.shape[1:3]
    rows, cols = _crop_offsets(height, width, factor)
    if (rows.stop - rows.start, cols.stop - cols.start) != (height, width):
        log.info("%s (node %s): cropped pixels from %dx%d to %dx%d, the nearest multiple of %d the VAE takes",
                 context.class_type, context.node_id, width, height, cols.stop - cols.start,
                 rows.stop - rows.start, factor)
    return pixels[:, rows, cols]


@contextmanager
def _running(vae: AutoencoderKL, context: ExecutionContext) -> Iterator[torch.device]:
    """The VAE on the compute device for the block, without autograd; yields that device."""
    with model_manager(context.settings).use(vae), torch.inference_mode():
        yield vae.encoder.conv_in.weight.device


def _to_vae_input(pixels: Tensor, vae: AutoencoderKL, device: torch.device) -> Tensor:
    """IMAGE [B, H, W, C] 0..1 -> [B, 3, H, W] in [-1, 1] on the device, in the VAE's dtype."""
    return (pixels[..., :3].movedim(-1, 1).to(device, torch.float32) * 2.0 - 1.0).to(vae.dtype)


def _to_image(decoded: Tensor) -> Tensor:
    """The decoder's [B, 3, H, W] about [-1, 1] -> IMAGE [B, H, W, 3] 0..1, float32 on the CPU."""
    return ((decoded.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).cpu()


def _decodable(samples: Any, vae: AutoencoderKL) -> Tensor:
    latent = latent_samples(samples, "samples")
    if latent.shape[1] != vae.config.z_channels:
        raise ValueError(f"samples: the latent has {latent.shape[1]} channels but this VAE decodes "
                         f"{vae.config.z_channels} (a latent of another model family?)")
    return latent


def encode_pixels(vae: AutoencoderKL, pixels: Tensor, context: ExecutionContext) -> Tensor:
    """IMAGE (already a multiple of the VAE's factor) -> raw latent [B, z, H/f, W/f], float32 CPU.

    An encode too large for the device memory is redone in tiles of 512 pixels, as ComfyUI's VAE does."""
    factor = vae.config.downscale_factor
    with _running(vae, context) as device:
        batch = _to_vae_input(pixels, vae, device)
        try:
            return vae.encode(batch).float().cpu()
        except torch.OutOfMemoryError:
            log.warning("%s (node %s): VAE encode ran out of memory; retrying in %d-pixel tiles",
                        context.class_type, context.node_id, FALLBACK_TILE * factor)
        # Retried outside the except block, whose traceback still holds the failed attempt's activations.
        if device.type == "cuda":
            torch.cuda.empty_cache()
        grid = (batch.shape[-2] // factor, batch.shape[-1] // factor)
        latent = blend_tiles(vae.encode, batch, grid, FALLBACK_TILE, FALLBACK_OVERLAP, factor, 1,
                             vae.config.z_channels, lambda done, total: context.check_interrupt())
        return latent.cpu()


@node(category="latent", outputs=["LATENT"])
def VAEEncode(pixels: Socket("IMAGE"), vae: Socket("VAE"), *, context: ExecutionContext) -> tuple:
    """Encode images into latents; sizes that are not a multiple of 8 are centre-cropped to one."""
    autoencoder = _vae_of(vae)
    factor = autoencoder.config.downscale_factor
    pixels = _cropped(_image_batch(pixels, "pixels", factor), factor, context)
    return ({"samples": encode_pixels(autoencoder, pixels, context)},)


@node(category="latent", outputs=[("IMAGE", "IMAGE", "The decoded image.")],
      description="Decodes latent images back into pixel space images.")
def VAEDecode(
    samples: Socket("LATENT", tooltip="The latent to be decoded."),
    vae: Socket("VAE", tooltip="The VAE model used for decoding the latent."),
    *, context: ExecutionContext,
) -> tuple:
    autoencoder = _vae_of(vae)
    latent = _decodable(samples, autoencoder)
    with _running(autoencoder, context) as device:
        # A decode too large for the device memory retries in tiles (diffusion/vae.py), as ComfyUI does.
        decoded = autoencoder.decode(latent.to(device, autoencoder.dtype), tiled_fallback=True)
        return (_to_image(decoded),)


def latent_tiling(tile_size: int, overlap: int, factor: int) -> tuple[int, int]:
    """Pixel tile size and overlap -> latent ones; an overlap over a quarter of the tile is cut to a
    quarter (ComfyUI's rule), so every tile still advances."""
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    return max(1, tile_size // factor), overlap // factor


@node(category="_for_testing", outputs=["IMAGE"])
def VAEDecodeTiled(
    samples: Socket("LATENT"),
    vae: Socket("VAE"),
    tile_size: Int(512, min=64, max=4096, step=32),
    overlap: TILE_OVERLAP,
    temporal_size: _temporal_size("decode"),
    temporal_overlap: TEMPORAL_OVERLAP,
    *, context: ExecutionContext,
) -> tuple:
    """Decode in overlapping tiles of tile_size pixels: less memory, seams blended. The temporal inputs are
    ComfyUI's for video VAEs; image VAEs have no frames to split and ignore them."""
    autoencoder = _vae_of(vae)
    latent = _decodable(samples, autoencoder)
    factor = autoencoder.config.downscale_factor
    tile, overlap_latent = latent_tiling(tile_size, overlap, factor)
    with _running(autoencoder, context) as device:
        decoded = blend_tiles(autoencoder.decode, latent.to(device, autoencoder.dtype),
                              tuple(latent.shape[-2:]), tile, overlap_latent, 1, factor,
                              autoencoder.config.out_channels, context.progress)
        return (_to_image(decoded),)


@node(category="_for_testing", outputs=["LATENT"])
def VAEEncodeTiled(
    pixels: Socket("IMAGE"),
    vae: Socket("VAE"),
    tile_size: Int(512, min=64, max=4096, step=64),
    overlap: TILE_OVERLAP,
    temporal_size: _temporal_size("encode"),
    temporal_overlap: TEMPORAL_OVERLAP,
    *, context: ExecutionContext,
) -> tuple:
    """Encode in overlapping tiles of tile_size pixels; the temporal inputs only matter for video VAEs."""
    autoencoder = _vae_of(vae)
    factor = autoencoder.config.downscale_factor
    pixels = _cropped(_image_batch(pixels, "pixels", factor), factor, context)
    tile, overlap_latent = latent_tiling(tile_size, overlap, factor)
    grid = (pixels.shape[1] // factor, pixels.shape[2] // factor)
    with _running(autoencoder, context) as device:
        latent = blend_tiles(autoencoder.encode, _to_vae_input(pixels, autoencoder, device), grid, tile,
                             overlap_latent, factor, 1, autoencoder.config.z_channels, context.progress)
        return ({"samples": latent.float().cpu()},)


def grow_mask(mask: Tensor, pixels: int) -> Tensor:
    """[B, 1, H, W] binarised and grown by a `pixels`-wide square (box max filter), same size out."""
    if pixels == 0:
        return mask.round()
    kernel = torch.ones(1, 1, pixels, pixels)
    grown = F.conv2d(mask.round(), kernel, padding=math.ceil((pixels - 1) / 2)).clamp(0.0, 1.0)
    # An even kernel yields one extra row and column; ComfyUI keeps the top-left H x W.
    return grown[..., : mask.shape[-2], : mask.shape[-1]].round()


@node(category="latent/inpaint", outputs=["LATENT"])
def VAEEncodeForInpaint(
    pixels: Socket("IMAGE"),
    vae: Socket("VAE"),
    mask: Socket("MASK"),
    grow_mask_by: Int(6, min=0, max=64, step=1),
    *, context: ExecutionContext,
) -> tuple:
    """Encode for an inpainting model: the masked pixels become neutral grey before encoding, and the noise
    mask (the mask grown by grow_mask_by pixels, for a seamless edge) limits sampling to that area."""
    autoencoder = _vae_of(vae)
    factor = autoencoder.config.downscale_factor
    pixels = _image_batch(pixels, "pixels", factor)
    masks = mask_batch(mask, "mask")
    batch, height, width = pixels.shape[:3]
    check_same_aspect(masks, height, width, "mask", "pixels")
    check_mask_batch(masks, batch, "mask")
    masks = F.interpolate(masks[:, None], size=(height, width), mode="bilinear")
    rows, cols = _crop_offsets(height, width, factor)
    pixels, masks = _cropped(pixels, factor, context), masks[..., rows, cols]
    keep = (1.0 - masks.round())[:, 0, :, :, None]
    greyed = (pixels[..., :3] - 0.5) * keep + 0.5
    return ({"samples": encode_pixels(autoencoder, greyed, context), "noise_mask": grow_mask(masks, grow_mask_by)},)
