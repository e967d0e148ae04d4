"""Inputs of inpainting UNets (in_channels 9 = 4 latent + 1 mask + 4 masked-image latent).

Such a UNet sees, beside the noisy latent, where to repaint (the mask at latent resolution, 1 = repaint) and
the image with that area greyed out, VAE-encoded into the model's latent space. When nothing is masked
(txt2img on an inpainting checkpoint) the mask is all ones and the masked image is a plain grey image, whose
latent we take from the checkpoint's own VAE rather than from a table of numbers for one VAE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .latent_format import LatentFormat
from .sampling.guidance import repeat_to_batch
from .vae import AutoencoderKL

# Pixels of the grey image encoded for the blank latent: 8x8 latent pixels, cheap on any VAE, and wide
# enough that the per-channel mean is not just the encoder's border response.
_GREY_SIDE = 64
INPAINT_CONCAT_CHANNELS = 5  # the mask channel + the 4 masked-image latent channels


@torch.inference_mode()
def grey_image_latent(vae: AutoencoderKL) -> Tensor:
    """[latent_channels] float32 on the CPU: the raw latent of a uniform 0.0 (in -1..1) image, per channel."""
    device = vae.encoder.conv_in.weight.device
    pixels = torch.zeros(1, 3, _GREY_SIDE, _GREY_SIDE, device=device, dtype=vae.dtype)
    return vae.encode(pixels).float().mean(dim=(0, 2, 3)).cpu()


def inpaint_concat(
    latent: Tensor, noise_mask: Tensor | None, latent_format: LatentFormat, blank_latent: Tensor | None
) -> Tensor:
    """[B, 5, h, w] on the latent's device and dtype: cat(mask, masked-image latent in the model's space).

    With a noise mask the LATENT's samples are the masked-image latent (VAEEncodeForInpaint greys the repaint
    area before encoding), and the mask is the noise mask resized bilinearly and rounded, as ComfyUI's concat
    conditioning does. Without one, the mask is all ones and the masked image is `blank_latent` everywhere.
    """
    batch, _, height, width = latent.shape
    if noise_mask is not None:
        mask = noise_mask.float().reshape(-1, 1, noise_mask.shape[-2], noise_mask.shape[-1])[:, :1]
        mask = F.interpolate(mask.to(latent.device), size=(height, width), mode="bilinear", align_corners=False)
        mask = repeat_to_batch(mask.round(), batch)
        # ComfyUI leaves an all-zero latent unshifted (model-formats.md 5), here as in sample_custom.
        masked = latent_format.process_in(latent) if bool(latent.any()) else latent
    else:
        if blank_latent is None:
            raise ValueError("the latent has no noise_mask and the model has no grey-image latent to stand for "
                             "an unmasked image (an inpainting UNet loaded without its VAE?)")
        mask = torch.ones(batch, 1, height, width, device=latent.device)
        blank = blank_latent.to(latent.device, torch.float32).reshape(1, -1, 1, 1)
        masked = latent_format.process_in(blank).expand(batch, -1, height, width)
    return torch.cat([mask.to(latent.dtype), masked.to(latent.dtype)], dim=1)

