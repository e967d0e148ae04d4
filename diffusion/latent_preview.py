"""Cheap live previews: a linear latent -> RGB projection fitted to the VAE it stands in for.

A full VAE decode per sampler step is too slow to show progress, but each latent pixel's colour is close to
an affine function of its channels (the idea behind ComfyUI's latent2rgb factors). We do not ship anyone's
table: `fit_latent_to_rgb` fits the projection to the checkpoint's own VAE by least squares, decoding a
small fixed batch of latents and averaging the decoded pixels down to latent resolution. So a fine-tuned VAE,
or a tiny random-weight test VAE, gets factors that match what it actually decodes.

The factors act on raw VAE latents (the LATENT value's `samples`, what VAEDecode takes); a sampler holding
latents in the denoiser's space applies `LatentFormat.process_out` first.
"""
from __future__ import annotations

import io
import time
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from diffusion.vae import AutoencoderKL

# The fitting batch: 2 latents of 8x8, 128 rows for a (C+1)x3 fit, small enough that loading a checkpoint
# barely notices the decode (64x64 pixels each, on the tiny VAE or SD's).
_FIT_BATCH, _FIT_SIZE, _FIT_SEED = 2, 8, 0
PREVIEW_MAX_SIDE = 512


def _fitting_latents(channels: int, scale_factor: float) -> Tensor:
    """Image-like raw latents: smooth low-frequency fields plus some fine detail, at the spread real raw
    latents have (unit variance in the denoiser's space, i.e. 1/scale_factor raw)."""
    generator = torch.Generator().manual_seed(_FIT_SEED)
    coarse = torch.randn(_FIT_BATCH, channels, 4, 4, generator=generator)
    smooth = F.interpolate(coarse, size=(_FIT_SIZE, _FIT_SIZE), mode="bilinear", align_corners=False)
    detail = torch.randn(_FIT_BATCH, channels, _FIT_SIZE, _FIT_SIZE, generator=generator)
    return (0.8 * smooth + 0.6 * detail) / scale_factor


@torch.inference_mode()
def fit_latent_to_rgb(vae: AutoencoderKL) -> Tensor:
    """[C + 1, 3] float32 on the CPU: rows 0..C-1 weigh the latent channels, row C is the bias; the result
    is RGB in about -1..1. Decodes on whatever device and dtype the VAE is on."""
    config = vae.config
    latents = _fitting_latents(config.z_channels, config.scale_factor)
    device = vae.encoder.conv_in.weight.device
    pixels = vae.decode(latents.to(device=device, dtype=vae.dtype)).float().cpu()
    factor = pixels.shape[-1] // latents.shape[-1]
    targets = F.avg_pool2d(pixels, factor)  # [B, 3, h, w]: the colour each latent pixel decodes to
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, config.z_channels)
    design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1).double()
    rgb = targets.permute(0, 2, 3, 1).reshape(-1, targets.shape[1]).double()
    return torch.linalg.lstsq(design, rgb).solution.float()


def latent_to_rgb(latent: Tensor, factors: Tensor) -> Tensor:
    """[B, C, h, w] raw latents -> [B, h, w, 3] RGB in 0..1 through the fitted projection."""
    if latent.ndim != 4 or latent.shape[1] + 1 != factors.shape[0]:
        raise ValueError(
            f"latent of shape {list(latent.shape)} does not fit preview factors for "
            f"{factors.shape[0] - 1} channels"
        )
    weights, bias = factors[:-1].to(latent.device), factors[-1].to(latent.device)
    rgb = latent.float().permute(0, 2, 3, 1) @ weights + bias
    return ((rgb + 1) / 2).clamp(0, 1)


def latent_to_rgb_image(latent: Tensor, factors: Tensor, max_side: int = PREVIEW_MAX_SIDE) -> Image.Image:
    """The first latent of the batch as a PIL RGB image, upscaled (nearest, 8x at most) towards `max_side`
    on its long side so a 64x64 latent previews at the size it will decode to."""
    rgb = latent_to_rgb(latent[:1], factors)[0]
    image = Image.fromarray((rgb * 255).round().to(torch.uint8).cpu().numpy(), mode="RGB")
    scale = min(8, max(1, max_side // max(image.size)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image


def preview_jpeg(latent: Tensor, factors: Tensor, quality: int = 85) -> tuple[str, bytes]:
    """`("JPEG", bytes)`: what `ExecutionContext.progress(..., preview=...)` sends to websocket clients."""
    buffer = io.BytesIO()
    latent_to_rgb_image(latent, factors).save(buffer, format="JPEG", quality=quality)
    return "JPEG", buffer.getvalue()


class PreviewThrottle:
    """At most `max_per_second` previews: encoding and sending one every step would slow fast samplers."""

    def __init__(self, max_per_second: float = 4, clock: Callable[[], float] = time.monotonic) -> None:
        if max_per_second <= 0:
            raise ValueError(f"max_per_second must be positive, got {max_per_second}")
        self.interval = 1.0 / max_per_second
        self._clock = clock
        self._last: float | None = None

    def ready(self, *, force: bool = False) -> bool:
        """True (and the time is noted) when a preview may go out now; `force` for the final step."""
        now = self._clock()
        if force or self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False


__all__ = [
    "PREVIEW_MAX_SIDE", "PreviewThrottle", "fit_latent_to_rgb", "latent_to_rgb", "latent_to_rgb_image",
    "preview_jpeg",
]
