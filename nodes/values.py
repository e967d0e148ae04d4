"""The values that travel between the Stable Diffusion nodes: MODEL, CLIP and VAE handles, and the layouts of
LATENT, IMAGE, MASK and CONDITIONING (ComfyUI's, so workflows and custom-node authors find what they expect).

- IMAGE: float32 tensor [B, H, W, C] in 0..1 on the CPU (channels last, as ComfyUI).
- MASK: float32 tensor [B, H, W] (or [H, W]) in 0..1; 1 = the area to repaint.
- LATENT: dict {"samples": float32 [B, C, h, w] raw VAE latents, optional "noise_mask": [B|1, 1, H, W] or
  [B, H, W], optional "batch_index": list[int]} (the latent's per-image noise positions).
- CONDITIONING: list of [cross_attn [B, T, C], extras dict]; extras keys: "pooled_output", "area",
  "strength", "mask", "mask_strength", "set_area_to_bounds", "start_percent", "end_percent"
  (diffusion.sampling.guidance.Condition reads them).

A handle never changes once made: `with_*` methods return a new handle that shares the (read-only) module,
so the cached output of a loader node is never corrupted by a node downstream. Weight patches (LoRA) are
recorded on the handle and applied to the shared module only for the duration of `patched()`, then undone.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from diffusion.latent_format import LatentFormat
from diffusion.memory import ModelManager, weight_bytes
from diffusion.sampling import SamplingModel
from diffusion.sampling.model_sampling import ModelSampling
from diffusion.text_encoders import SDTextEncoder
from diffusion.vae import AutoencoderKL

#: A weight patch: given the module's current weight (on its device, in its dtype), the delta to add at
#: strength 1.0. LoRA, LoHa and LoKr files become these (diffusion/lora.py).
WeightDelta = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class WeightPatch:
    delta: WeightDelta
    strength: float
    source: str = ""  # the LoRA file, for messages


#: Weight name in the module's state_dict -> patches to apply, in order.
PatchSet = Mapping[str, tuple[WeightPatch, ...]]


def merge_patches(base: PatchSet, extra: Mapping[str, WeightPatch]) -> dict[str, tuple[WeightPatch, ...]]:
    """Two LoRA nodes stack: the second node's patches come after the first's, on the same weights."""
    merged = {key: tuple(value) for key, value in base.items()}
    for key, patch in extra.items():
        merged[key] = merged.get(key, ()) + (patch,)
    return merged


# One patch application at a time per module: a patched module must not be shared by two runs at once.
_PATCH_LOCK = threading.RLock()


@contextmanager
def patched_module(module: nn.Module, patches: PatchSet) -> Iterator[nn.Module]:
    """Apply `patches` to `module` in place, yield it, and restore the exact original weights afterwards
    (even when the body raises), so the base model in the cache is untouched."""
    if not patches:
        yield module
        return
    with _PATCH_LOCK, torch.no_grad():
        parameters = dict(module.named_parameters())
        unknown = sorted(set(patches) - set(parameters))
        if unknown:
            raise KeyError(f"patches name weights the module does not have: {', '.join(unknown[:5])}")
        originals: dict[str, Tensor] = {}
        try:
            for name, chain in patches.items():
                weight = parameters[name]
                originals[name] = weight.detach().clone()
                total = weight.detach().float()
                for patch in chain:
                    total = total + patch.strength * patch.delta(weight.detach()).float()
                weight.copy_(total.to(weight.dtype))
            yield module
        finally:
            for name, original in originals.items():
                parameters[name].copy_(original)


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """MODEL: the diffusion network, how it is parameterised, and the patches to apply when it runs."""

    unet: nn.Module
    model_sampling: ModelSampling
    latent_format: LatentFormat
    family: str  # "sd1", "sd2", ...
    patches: PatchSet = field(default_factory=dict)
    encode_y: Any = None  # diffusion.sampling.guidance.EncodeY for models with class/size conditioning
    #: [latent_channels + 1, 3] float32: a linear latent -> RGB (-1..1) projection for live previews, last
    #: row the bias (diffusion/latent_preview.py fits it from the checkpoint's own VAE). None: no previews.
    preview_factors: Tensor | None = None
    #: [latent_channels] float32: the raw VAE latent of a plain grey (0.0 in -1..1) image, per channel, from
    #: the checkpoint's own VAE; an inpainting model's masked image when nothing is masked. None: not known.
    inpaint_blank_latent: Tensor | None = None

    #: False on handles made by `with_*` from another: they share its weights, which the cache's byte budget
    #: must count once (on the loader's output), not once per LoRA or clip-skip node downstream.
    owns_weights: bool = True

    @property
    def nbytes(self) -> int:
        """For the executor's cache budget: the weights this handle keeps alive (0 if shared, see above)."""
        return weight_bytes(self.unet) if self.owns_weights else 0

    @property
    def concat_channels(self) -> int:
        """Input channels beyond the latent's: 5 for an inpainting UNet (mask + masked-image latent), else 0."""
        config = getattr(self.unet, "config", None)
        in_channels, out_channels = getattr(config, "in_channels", None), getattr(config, "out_channels", None)
        if in_channels is None or out_channels is None:
            return 0
        return max(0, in_channels - out_channels)

    def with_patches(self, extra: Mapping[str, WeightPatch]) -> ModelHandle:
        return replace(self, patches=merge_patches(self.patches, extra), owns_weights=False)

    @contextmanager
    def sampling_model(self, manager: ModelManager | None = None) -> Iterator[SamplingModel]:
        """The SamplingModel to sample with: weights on the compute device (via `manager`) and patched."""
        with _using(manager, self.unet), patched_module(self.unet, self.patches) as unet:
            yield SamplingModel(unet, self.model_sampling, self.latent_format, self.encode_y)


@dataclass(frozen=True, eq=False)
class ClipHandle:
    """CLIP: a text encoder with its tokenizer, skip layer, embeddings lookup and patches."""

    text: SDTextEncoder
    patches: PatchSet = field(default_factory=dict)

    owns_weights: bool = True  # as ModelHandle.owns_weights

    @property
    def nbytes(self) -> int:
        return weight_bytes(self.text.encoder) if self.owns_weights else 0

    def with_layer(self, layer: int) -> ClipHandle:
        return replace(self, text=self.text.with_layer(layer), owns_weights=False)

    def with_patches(self, extra: Mapping[str, WeightPatch]) -> ClipHandle:
        return replace(self, patches=merge_patches(self.patches, extra), owns_weights=False)

    def encode(self, prompt: str, manager: ModelManager | None = None) -> tuple[Tensor, Tensor]:
        """(cond [1, 77k, C], pooled) in float32 on the CPU, whatever device the encoder ran on."""
        with _using(manager, self.text.encoder), patched_module(self.text.encoder, self.patches), \
                torch.inference_mode():
            cond, pooled = self.text.encode(prompt)
        return cond.float().cpu(), pooled.float().cpu()


@dataclass(frozen=True, eq=False)
class VaeHandle:
    """VAE: the autoencoder. IMAGE in and out is [B, H, W, C] 0..1; LATENT samples are raw latents."""

    vae: AutoencoderKL

    @property
    def nbytes(self) -> int:
        return weight_bytes(self.vae)

    @property
    def downscale_factor(self) -> int:
        return self.vae.config.downscale_factor


@contextmanager
def _using(manager: ModelManager | None, module: nn.Module) -> Iterator[None]:
    if manager is None:
        yield
    else:
        with manager.use(module):
            yield
