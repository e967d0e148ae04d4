"""Shared helpers of the UNet / VAE / key-map tests: diffusers reference twins with every weight mattering.

The reference models are diffusers' own classes built from our config converters, with every norm
perturbed (model-formats.md 10.2: fresh norms are weight 1, bias 0, so a swapped norm key would be invisible).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from torch import nn

from diffusion.key_maps import (
    unet_config_to_diffusers,
    unet_state_dict_from_diffusers,
    vae_config_to_diffusers,
    vae_state_dict_from_diffusers,
)
from diffusion.unet import SDXL_ADM_TIME_EMBED_DIM, UNetConfig, UNetModel
from diffusion.vae import AutoencoderKL, VAEConfig

# model-formats.md 10.4: fp32 CPU components agree to ~1e-5 after normalising by the output's scale.
PARITY_TOLERANCE = 1e-5
# The tiny SDXL presets' label_emb input is this pooled width plus 6 (base) or 5 (refiner) x 256.
TINY_POOLED_WIDTH = 32


def perturb_norms(module: nn.Module, seed: int) -> None:
    """Every GroupNorm / LayerNorm gets weight ``1 + 0.1 randn`` and bias ``0.1 randn``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, (nn.GroupNorm, nn.LayerNorm)):
                norm.weight.copy_(1 + 0.1 * torch.randn(norm.weight.shape, generator=generator))
                norm.bias.copy_(0.1 * torch.randn(norm.bias.shape, generator=generator))


def normalised_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |ours - reference| / max |reference|``."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def ablated_outputs(layers: dict[str, nn.Module], run, batch_item: dict[str, torch.Tensor]) -> dict[str, float]:
    """How much zeroing each layer's output moves the model's output, all ablations in one batched call.

    Batch item ``i`` sees layer ``i`` output zeros (a forward hook masks it per item); the last item is the
    intact baseline. ``run`` maps a dict of batched inputs to the output; every input has batch size 1.
    """
    batch = len(layers) + 1
    hooks = []
    for index, layer in enumerate(layers.values()):
        keep = torch.ones(batch)
        keep[index] = 0.0

        def mask(module, args, output, keep=keep):
            return output * keep.to(output.dtype).view(-1, *[1] * (output.ndim - 1))

        hooks.append(layer.register_forward_hook(mask))
    try:
        output = run({name: value.repeat(batch, *[1] * (value.ndim - 1)) for name, value in batch_item.items()})
    finally:
        for hook in hooks:
            hook.remove()
    return {name: normalised_error(output[i], output[-1]) for i, name in enumerate(layers)}


def reference_unet(config: UNetConfig, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    reference = UNet2DConditionModel.from_config(unet_config_to_diffusers(config)).eval()
    perturb_norms(reference, seed + 1)
    return reference


def unet_from_reference(reference: UNet2DConditionModel, config: UNetConfig) -> UNetModel:
    ours = UNetModel(config).eval()
    ours.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict(), config), strict=True)
    return ours


def unet_inputs(config: UNetConfig, batch: int = 2, size: tuple[int, int] = (16, 16), seed: int = 2) -> dict:
    """Random UNet inputs; for label_emb models also SDXL's pooled vector and size numbers."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(batch, config.in_channels, *size, generator=generator),
        "timesteps": torch.linspace(3.0, 901.0, batch),
        "context": torch.randn(batch, 7, config.context_dim, generator=generator),
    }
    if config.adm_in_channels is not None:
        count = (config.adm_in_channels - TINY_POOLED_WIDTH) // SDXL_ADM_TIME_EMBED_DIM
        inputs["pooled"] = torch.randn(batch, TINY_POOLED_WIDTH, generator=generator)
        inputs["size_numbers"] = torch.rand(batch, count, generator=generator) * 1024
    return inputs


def reference_vae(config: VAEConfig, seed: int = 0) -> DiffusersAutoencoderKL:
    torch.manual_seed(seed)
    reference = DiffusersAutoencoderKL.from_config(vae_config_to_diffusers(config)).eval()
    perturb_norms(reference, seed + 1)
    return reference


def vae_from_reference(reference: DiffusersAutoencoderKL, config: VAEConfig) -> AutoencoderKL:
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(vae_state_dict_from_diffusers(reference.state_dict(), config), strict=True)
    return ours
