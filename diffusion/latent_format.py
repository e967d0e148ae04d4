"""How a family's raw VAE latents map to the space its diffusion model works in (model-formats.md 5).

LATENT values between nodes are raw VAE latents, as in ComfyUI; sampling moves them in on entry and back
out at the end. The numbers belong to the VAE a family uses (VAEConfig carries them); the sampling code
only needs this small value, so both import it from here.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class LatentFormat:
    """`(z - shift) * scale` into the denoiser's space (ComfyUI's process_latent_in), and back."""

    scale_factor: float = 1.0
    shift_factor: float = 0.0

    def process_in(self, latent: Tensor) -> Tensor:
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent: Tensor) -> Tensor:
        return latent / self.scale_factor + self.shift_factor
