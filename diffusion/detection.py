"""What a checkpoint is, decided from its key names and how its tensor shapes relate (model-formats 3).

Never from absolute widths: diffusers and ComfyUI compare against 320/768/1024 and so recognise no tiny
model, while every rule here reads the structure (which keys exist, counts of numbered blocks, ratios of
widths), so tiny test checkpoints take exactly the path real ones take. Head counts are not in the weights:
they come from the family rule or from an explicit override.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion.safetensors_io import CheckpointError
from diffusion.unet import UNetConfig
from diffusion.vae import SD3_VAE, SD_VAE, VAEConfig

Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."

_LATER_FAMILIES = {
    "sdxl_base": "SDXL base", "sdxl_refiner": "SDXL refiner", "sd2_unclip": "SD2 unCLIP", "sd3": "SD3 / SD3.5",
}

# What each family's single file holds, for the "unknown layout" error (model-formats 2.1).
_FAMILY_EXPECTS = (
    "SD1: model.diffusion_model.input_blocks.*, first_stage_model.*, cond_stage_model.transformer.*",
    "SD2: model.diffusion_model.input_blocks.*, first_stage_model.*, cond_stage_model.model.*",
    "SDXL: model.diffusion_model.label_emb.*, conditioner.embedders.*",
    "SD3: model.diffusion_model.joint_blocks.*, text_encoders.*",
    "standalone VAE: encoder.*, decoder.* (optionally quant_conv.*, post_quant_conv.*)",
)

# ComfyUI's SD2 v-prediction test: the biased std of one norm bias above this means a v model.
_SD2_V_STD_THRESHOLD = 0.09

PREDICTION_TYPES = ("eps", "v_prediction")


@dataclass(frozen=True)
class HeadOverrides:
    """Attention head layout the weights cannot tell: needed for tiny models whose widths break the family rule.

    Set at most one of unet_num_heads / unet_head_width; text_num_heads sets the text encoder's heads.
    """

    unet_num_heads: int | None = None
    unet_head_width: int | None = None
    text_num_heads: int | None = None
    num_groups: int | None = None

    def __post_init__(self) -> None:
        if self.unet_num_heads is not None and self.unet_head_width is not None:
            raise ValueError("set unet_num_heads or unet_head_width, not both")


@dataclass(frozen=True)
class FamilyDetection:
    """The family of a single-file checkpoint and where its parts live."""

    family: str
    in_channels: int | None = None
    variant: str = "base"

    @property
    def text_prefix(self) -> str:
        return SD2_TEXT_PREFIX if self.family == "sd2" else SD1_TEXT_PREFIX


@dataclass(frozen=True)
class PredictionChoice:
    """The denoiser's parameterisation and which evidence decided it, so a wrong guess can be traced."""

    prediction: str
    source: str
    zsnr: bool = False


def variant_of(in_channels: int) -> str:
    """The UNet variant its input width tells (rule 5): noisy latent + mask + masked image, or + image."""
    return {9: "inpaint", 8: "pix2pix"}.get(in_channels, "base")


def strip_prefix(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    return {name[len(prefix):]: shape for name, shape in shapes.items() if name.startswith(prefix)}


def _count_indices(shapes: Shapes, pattern: str) -> int:
    """How many distinct N fill the `{}` in pattern (a regex fragment) across the keys."""
    regex = re.compile(pattern.replace(".", r"\.").replace("{}", r"(\d+)"))
    return len({match.group(1) for name in shapes if (match := regex.match(name))})


def detect_family(shapes: Shapes) -> FamilyDetection:
    """Name the family of a single file's key set, or raise one error listing what was found and expected."""
    unet = strip_prefix(shapes, UNET_PREFIX)
    if "joint_blocks.0.x_block.attn.qkv.weight" in unet:
        return FamilyDetection("sd3", in_channels=unet.get("x_embedder.proj.weight", (0, 0))[1])
    if "input_blocks.0.0.weight" in unet:
        in_channels = unet["input_blocks.0.0.weight"][1]
        variant = variant_of(in_channels)
        if "label_emb.0.0.weight" in unet:
            if any(name.startswith(SD2_TEXT_PREFIX) for name in shapes):
                # SD2.x unCLIP: label_emb takes an image embedding, the text encoder is SD2's.
                return FamilyDetection("sd2_unclip", in_channels, variant)
            base = any(name.startswith("conditioner.embedders.1.") for name in shapes)
            return FamilyDetection("sdxl_base" if base else "sdxl_refiner", in_channels, variant)
        if any(name.startswith(SD2_TEXT_PREFIX) for name in shapes):
            return FamilyDetection("sd2", in_channels, variant)
        if any(name.startswith(SD1_TEXT_PREFIX) for name in shapes):
            return FamilyDetection("sd1", in_channels, variant)
        # No text encoder at all: the transformer projections still tell SD2 (linear) from SD1 (1x1 conv).
        proj = next((shape for name, shape in unet.items() if name.endswith(".proj_in.weight")), None)
        if proj is not None:
            return FamilyDetection("sd2" if len(proj) == 2 else "sd1", in_channels, variant)
    if "encoder.conv_in.weight" in shapes and "decoder.conv_in.weight" in shapes:
        return FamilyDetection("vae", in_channels=shapes["encoder.conv_in.weight"][1])
    raise CheckpointError(unknown_layout_message(shapes))


def unknown_layout_message(shapes: Shapes) -> str:
    prefixes = Counter(".".join(name.split(".")[:2]) for name in shapes)
    found = ", ".join(f"{prefix}.* ({count})" for prefix, count in prefixes.most_common(12)) or "no tensors"
    expects = "; ".join(_FAMILY_EXPECTS)
    return f"unknown checkpoint layout: found {found}. Expected one of: {expects}"


def require_supported(detection: FamilyDetection, source: str) -> None:
    if detection.family in _LATER_FAMILIES:
        raise CheckpointError(f"{source}: detected {_LATER_FAMILIES[detection.family]}; not supported yet")
    if detection.family == "vae":
        raise CheckpointError(f"{source}: this is a standalone VAE file, not a full checkpoint: load it as a VAE")


def unet_config_from_shapes(
    unet: Shapes, family: str, overrides: HeadOverrides | None = None
) -> UNetConfig:
    """Derive the UNet layout from LDM-named shapes (prefix stripped): rule 6 of model-formats 3."""
    overrides = overrides or HeadOverrides()
    model_channels, in_channels = unet["input_blocks.0.0.weight"][:2]
    levels = _count_indices(unet, "input_blocks.{}.0.op.weight") + 1
    input_blocks = _count_indices(unet, "input_blocks.{}.")
    num_res_blocks = input_blocks // levels - 1
    widths, depths = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        widths.append(_require(unet, f"input_blocks.{first}.0.out_layers.3.weight")[0])
        depths.append(_count_indices(unet, f"input_blocks.{first}.1.transformer_blocks.{{}}."))
    if any(width % model_channels for width in widths):
        raise CheckpointError(f"UNet level widths {widths} are not multiples of model_channels {model_channels}")
    context = next((shape[1] for name, shape in unet.items() if name.endswith("attn2.to_k.weight")), None)
    proj = next((shape for name, shape in unet.items() if name.endswith(".proj_in.weight")), (0, 0))
    label = unet.get("label_emb.0.0.weight")
    num_heads, head_width = _unet_heads(family, overrides)
    return UNetConfig(
        in_channels=in_channels,
        out_channels=_require(unet, "out.2.weight")[0],
        model_channels=model_channels,
        channel_mult=tuple(width // model_channels for width in widths),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(depths),
        transformer_depth_middle=_count_indices(unet, "middle_block.1.transformer_blocks.{}."),
        num_heads=num_heads,
        head_width=head_width,
        context_dim=context,
        use_linear_proj=len(proj) == 2,
        adm_in_channels=label[1] if label is not None else None,
        num_groups=overrides.num_groups or 32,
        upcast_attention=sd2_upcasts_attention(family),
    )


def sd2_upcasts_attention(family: str) -> bool:
    # ComfyUI computes every SD2 UNet's attention in float32: SD2.1's attention logits overflow fp16 (NaN
    # images) and the weights do not say which SD2 a file is. A no-op in float32.
    return family == "sd2"


def _unet_heads(family: str, overrides: HeadOverrides) -> tuple[int | None, int | None]:
    if overrides.unet_num_heads is not None or overrides.unet_head_width is not None:
        return overrides.unet_num_heads, overrides.unet_head_width
    # The family rule (model-formats 2.1): SD1 has 8 heads everywhere, later families 64-wide heads.
    return (8, None) if family == "sd1" else (None, 64)


def _require(shapes: Shapes, name: str) -> tuple[int, ...]:
    if name not in shapes:
        raise CheckpointError(f"expected key {name!r} is missing (the checkpoint is incomplete or not this family)")
    return shapes[name]


def vae_config_from_shapes(vae: Shapes, *, num_groups: int = 32) -> VAEConfig:
    """Derive the VAE layout from LDM-named or diffusers-named shapes (prefix stripped): rule 7."""
    diffusers = "decoder.up_blocks.0.resnets.0.norm1.weight" in vae
    level_key = "encoder.down_blocks.{}.resnets.0.conv2.weight" if diffusers else "encoder.down.{}.block.0.conv2.weight"
    block_key = "encoder.down_blocks.0.resnets.{}.conv1.weight" if diffusers else "encoder.down.0.block.{}.conv1.weight"
    ch, in_channels = _require(vae, "encoder.conv_in.weight")[:2]
    levels = _count_indices(vae, level_key)
    widths = [vae[level_key.format(level)][0] for level in range(levels)]
    z_channels = _require(vae, "decoder.conv_in.weight")[1]
    # The latent scaling of the family's VAE (model-formats 5): SD3's 16-channel VAE has its own.
    latent_preset = SD3_VAE if z_channels == SD3_VAE.z_channels else SD_VAE
    return VAEConfig(
        ch=ch,
        ch_mult=tuple(width // ch for width in widths),
        num_res_blocks=_count_indices(vae, block_key),
        z_channels=z_channels,
        in_channels=in_channels,
        out_channels=_require(vae, "decoder.conv_out.weight")[0],
        use_quant_conv="quant_conv.weight" in vae,
        num_groups=num_groups,
        scale_factor=latent_preset.scale_factor,
        shift_factor=latent_preset.shift_factor,
    )


def detect_prediction(
    shapes: Shapes,
    *,
    family: str,
    metadata: Mapping[str, str] | None = None,
    path: Path | None = None,
    read_tensor: Callable[[str], torch.Tensor] | None = None,
    override: str | None = None,
) -> PredictionChoice:
    """Decide eps vs v-prediction: override, then markers, then sidecar yaml, metadata, the SD2 heuristic."""
    zsnr = "ztsnr" in shapes
    if override is not None:
        return checked_override(override, zsnr)
    if "v_pred" in shapes:
        return PredictionChoice("v_prediction", "v_pred key", zsnr)
    sidecar = _sidecar_parameterization(path) if path is not None else None
    if sidecar is not None:
        return PredictionChoice(sidecar[0], f"sidecar {sidecar[1]}", zsnr)
    hinted = (metadata or {}).get("modelspec.prediction_type")
    if hinted in ("v", "epsilon"):
        return PredictionChoice("v_prediction" if hinted == "v" else "eps", "modelspec.prediction_type", zsnr)
    if family == "sd2" and read_tensor is not None:
        guess = _sd2_heuristic(shapes, read_tensor)
        if guess is not None:
            return PredictionChoice(guess, "SD2 norm-bias heuristic", zsnr)
    return PredictionChoice("eps", "family default", zsnr)


def checked_override(override: str, zsnr: bool) -> PredictionChoice:
    """The caller's explicit prediction type, which beats every marker and heuristic."""
    if override not in PREDICTION_TYPES:
        raise ValueError(f"prediction override must be one of {PREDICTION_TYPES}, got {override!r}")
    return PredictionChoice(override, "override", zsnr)


def _sidecar_parameterization(path: Path) -> tuple[str, str] | None:
    """A1111's config beside the file: `parameterization: "v"` means v; an LDM config without it means eps."""
    for sidecar in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if sidecar.is_file():
            match = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", sidecar.read_text(errors="replace"), re.M)
            v = match is not None and match.group(1) == "v"
            return ("v_prediction" if v else "eps"), sidecar.name
    return None


def _sd2_heuristic(shapes: Shapes, read_tensor: Callable[[str], torch.Tensor]) -> str | None:
    # ComfyUI's test: SD2-v models' last output attention has a norm1 bias spread above 0.09; meaningless on
    # random weights, so it is the last resort before the default and the override always wins.
    unet = strip_prefix(shapes, UNET_PREFIX)
    if unet.get("input_blocks.0.0.weight", (0, 0))[1] != 4:
        return None
    last = _count_indices(unet, "output_blocks.{}.") - 1
    name = f"{UNET_PREFIX}output_blocks.{last}.1.transformer_blocks.0.norm1.bias"
    if name not in shapes:
        return None
    std = read_tensor(name).float().std(unbiased=False).item()
    return "v_prediction" if std > _SD2_V_STD_THRESHOLD else "eps"
