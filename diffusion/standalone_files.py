"""A UNet or a text encoder stored on its own (ComfyUI's `diffusion_models/` and `text_encoders/` folders).

A standalone UNet file holds the LDM names, with or without the `model.diffusion_model.` prefix, or
diffusers names (a pipeline's `unet/diffusion_pytorch_model.safetensors` copied out); a standalone
text encoder holds transformers names (`text_model.*`, OpenAI CLIP-L as ComfyUI ships `clip_l.safetensors`) or
open_clip names (SD2's OpenCLIP-H), with or without a checkpoint's `cond_stage_model.*` prefix. The family is
told by the structure, as for whole checkpoints: a linear `proj_in` or an open_clip tower means SD2.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion import detection
from diffusion.checkpoints import (
    TEXT_BASES,
    assign_weights,
    check_unexpected,
    identity_names,
    is_skipped_key,
    load_text_encoder,
    names_from_key_map,
    open_tensor_file,
    refuse_fp8_scaled,
)
from diffusion.detection import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, UNET_PREFIX, HeadOverrides, PredictionChoice
from diffusion.key_maps import unet_diffusers_key_map
from diffusion.safetensors_io import CheckpointError
from diffusion.text_encoders import SD2_OPENCLIP_H, ClipTextEncoder, text_encoder_config_from_state_dict
from diffusion.unet import UNetConfig, UNetModel

_TEXT_PREFIXES = (SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, "cond_stage_model.", "")
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class LoadedUNet:
    unet: UNetModel
    config: UNetConfig
    family: str
    prediction: PredictionChoice


def is_diffusers_unet(shapes: Shapes) -> bool:
    return "conv_in.weight" in shapes and "down_blocks.0.resnets.0.conv1.weight" in shapes


def _unet_family(unet_shapes: Shapes, where: str) -> str:
    if "joint_blocks.0.x_block.attn.qkv.weight" in unet_shapes:
        raise CheckpointError(f"{where}: an SD3 MMDiT, not supported yet")
    if "input_blocks.0.0.weight" not in unet_shapes and not is_diffusers_unet(unet_shapes):
        raise CheckpointError(f"{where}: not a UNet file. {detection.unknown_layout_message(unet_shapes)}")
    if "label_emb.0.0.weight" in unet_shapes or "add_embedding.linear_1.weight" in unet_shapes:
        raise CheckpointError(f"{where}: an SDXL-style UNet (added conditioning), not supported yet")
    proj = next((shape for name, shape in unet_shapes.items() if name.endswith(".proj_in.weight")), None)
    return "sd2" if proj is not None and len(proj) == 2 else "sd1"


def _count(shapes: Shapes, pattern: str) -> int:
    """How many distinct N fill `{}` in `pattern` across the keys (`down_blocks.{}.` -> the levels)."""
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)"))
    return len({match.group(1) for name in shapes if (match := regex.match(name))})


def diffusers_unet_config(shapes: Shapes, family: str, overrides: HeadOverrides | None = None) -> UNetConfig:
    """The LDM layout of a diffusers-named UNet file (no config.json beside it), read off its structure the
    way detection reads LDM names: levels, resnets per level, widths, transformer depths."""
    model_channels, in_channels = shapes["conv_in.weight"][:2]
    levels = _count(shapes, "down_blocks.{}.")
    widths = [shapes[f"down_blocks.{level}.resnets.0.conv2.weight"][0] for level in range(levels)]
    depths = [_count(shapes, f"down_blocks.{level}.attentions.0.transformer_blocks.{{}}.") for level in range(levels)]
    context = next((shape[1] for name, shape in shapes.items() if name.endswith("attn2.to_k.weight")), 768)
    proj = next((shape for name, shape in shapes.items() if name.endswith(".proj_in.weight")), (0, 0))
    heads = overrides or HeadOverrides()
    if heads.unet_num_heads is None and heads.unet_head_width is None:
        # The family rule (model-formats 2.1): SD1 has 8 heads everywhere, SD2 64-wide heads.
        heads = HeadOverrides(unet_num_heads=8) if family == "sd1" else HeadOverrides(unet_head_width=64)
    return UNetConfig(
        in_channels=in_channels,
        out_channels=shapes["conv_out.weight"][0],
        model_channels=model_channels,
        channel_mult=tuple(width // model_channels for width in widths),
        num_res_blocks=_count(shapes, "down_blocks.0.resnets.{}."),
        transformer_depth=tuple(depths),
        transformer_depth_middle=_count(shapes, "mid_block.attentions.0.transformer_blocks.{}."),
        num_heads=heads.unet_num_heads,
        head_width=heads.unet_head_width,
        context_dim=context,
        use_linear_proj=len(proj) == 2,
        num_groups=(overrides.num_groups if overrides else None) or 32,
        upcast_attention=detection.sd2_upcasts_attention(family),
    )


def load_unet_file(
    path: str | os.PathLike, *, dtype: torch.dtype, device: str | torch.device = "cpu",
    overrides: HeadOverrides | None = None,
) -> LoadedUNet:
    """A standalone SD1/SD2 UNet; its prediction type from markers, metadata or a sidecar yaml (else eps)."""
    path, device = Path(path), torch.device(device)
    with open_tensor_file(path) as source:
        shapes = source.shapes()
        refuse_fp8_scaled(source)
        prefix = UNET_PREFIX if any(k.startswith(UNET_PREFIX) for k in shapes) else ""
        unet_shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix) and not is_skipped_key(k)}
        family = _unet_family(unet_shapes, source.description)
        diffusers = is_diffusers_unet(unet_shapes)
        try:
            if diffusers:
                config = diffusers_unet_config(unet_shapes, family, overrides)
            else:
                config = detection.unet_config_from_shapes(unet_shapes, family, overrides)
            for width, depth in zip(config.level_widths, config.transformer_depth):
                if depth:
                    config.heads_for(width)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{source.description}: UNet: {error}") from None
        unet = UNetModel(config, device="meta")
        if diffusers:
            names = names_from_key_map(unet_diffusers_key_map(config), shapes, prefix)
        else:
            names = identity_names(unet.state_dict(), prefix)
        assign_weights(unet, source, names, dtype=dtype, device=device, what="UNet")
        parts = ("down_blocks.", "mid_block.", "up_blocks.") if diffusers else ("input_blocks.", "middle_block.",
                                                                                 "output_blocks.")
        check_unexpected(shapes, set(names.values()), prefix or parts, source.description)
        prediction = detection.detect_prediction(shapes, family=family, metadata=source.metadata, path=path)
    return LoadedUNet(unet, config, family, prediction)


def _token_width(shapes: Shapes) -> int | None:
    shape = next((v for k, v in shapes.items() if k.endswith("token_embedding.weight")), None)
    return shape[1] if shape is not None else None


def load_text_encoder_file(
    path: str | os.PathLike, *, dtype: torch.dtype, device: str | torch.device = "cpu",
    num_heads: int | None = None,
) -> ClipTextEncoder:
    """A standalone CLIP-L (SD1) or OpenCLIP-H (SD2) text tower; `num_heads` for widths the 64-wide head
    rule does not fit (tiny models)."""
    path, device = Path(path), torch.device(device)
    with open_tensor_file(path) as source:
        shapes = source.shapes()
        refuse_fp8_scaled(source)
        prefix = next(p for p in _TEXT_PREFIXES if any(k.startswith(p) for k in shapes))
        keys = [k for k in shapes if k.startswith(prefix) and not is_skipped_key(k)
                and not k.endswith(("logit_scale", "position_ids"))]
        local = {k[len(prefix):]: shapes[k] for k in keys}
        open_clip = "positional_embedding" in local
        family = "sd2" if open_clip or _token_width(local) == SD2_OPENCLIP_H.hidden_size else "sd1"
        try:
            config = text_encoder_config_from_state_dict(local, base=TEXT_BASES[family], num_heads=num_heads)
        except ValueError as error:
            raise CheckpointError(f"{source.description}: text encoder: {error}") from None
        if family == "sd2" and not open_clip and config.num_layers < SD2_OPENCLIP_H.num_layers:
            # A diffusers-style OpenCLIP-H (transformers names) ends before the last block; CLIP-skip layers
            # still count from the full tower (model-formats 4).
            config = dataclasses.replace(config, missing_last_layers=SD2_OPENCLIP_H.num_layers - config.num_layers)
        if open_clip:
            names = {key: key for key in keys}
        else:
            names = {key[len(prefix):].removeprefix("text_model."): key for key in keys}
        return load_text_encoder(config, source, names, open_clip_prefix=prefix if open_clip else None,
                                 dtype=dtype, device=device)


__all__ = ["LoadedUNet", "load_text_encoder_file", "load_unet_file"]
