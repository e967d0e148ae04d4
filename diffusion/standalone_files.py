"""A UNet or a text encoder stored on its own (ComfyUI's `diffusion_models/` and `text_encoders/` folders).

A standalone UNet file holds the LDM names, with or without the `model.diffusion_model.` prefix; a standalone
text encoder holds transformers names (`text_model.*`, OpenAI CLIP-L as ComfyUI ships `clip_l.safetensors`) or
open_clip names (SD2's OpenCLIP-H), with or without a checkpoint's `cond_stage_model.*` prefix. The family is
told by the structure, as for whole checkpoints: a linear `proj_in` or an open_clip tower means SD2.
"""
from __future__ import annotations

import dataclasses
import os
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
    open_tensor_file,
    refuse_fp8_scaled,
)
from diffusion.detection import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, UNET_PREFIX, HeadOverrides, PredictionChoice
from diffusion.safetensors_io import CheckpointError
from diffusion.text_encoders import SD2_OPENCLIP_H, ClipTextEncoder, text_encoder_config_from_state_dict
from diffusion.unet import UNetConfig, UNetModel

_TEXT_PREFIXES = (SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, "cond_stage_model.", "")


@dataclass(frozen=True)
class LoadedUNet:
    unet: UNetModel
    config: UNetConfig
    family: str
    prediction: PredictionChoice


def _unet_family(unet_shapes: dict[str, tuple[int, ...]], where: str) -> str:
    if "joint_blocks.0.x_block.attn.qkv.weight" in unet_shapes:
        raise CheckpointError(f"{where}: an SD3 MMDiT, not supported yet")
    if "input_blocks.0.0.weight" not in unet_shapes:
        if "conv_in.weight" in unet_shapes and any(k.startswith("down_blocks.") for k in unet_shapes):
            raise CheckpointError(f"{where}: a diffusers-named UNet; load its whole diffusers folder as a checkpoint")
        raise CheckpointError(f"{where}: not a UNet file. {detection.unknown_layout_message(unet_shapes)}")
    if "label_emb.0.0.weight" in unet_shapes:
        raise CheckpointError(f"{where}: an SDXL-style UNet (label_emb), not supported yet")
    proj = next((shape for name, shape in unet_shapes.items() if name.endswith(".proj_in.weight")), None)
    return "sd2" if proj is not None and len(proj) == 2 else "sd1"


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
        try:
            config = detection.unet_config_from_shapes(unet_shapes, family, overrides)
            for width, depth in zip(config.level_widths, config.transformer_depth):
                if depth:
                    config.heads_for(width)
        except ValueError as error:
            raise CheckpointError(f"{source.description}: UNet: {error}") from None
        unet = UNetModel(config, device="meta")
        names = identity_names(unet.state_dict(), prefix)
        assign_weights(unet, source, names, dtype=dtype, device=device, what="UNet")
        check_unexpected(shapes, set(names.values()), prefix or ("input_blocks.", "middle_block.", "output_blocks."),
                         source.description)
        prediction = detection.detect_prediction(shapes, family=family, metadata=source.metadata, path=path)
    return LoadedUNet(unet, config, family, prediction)


def _token_width(shapes: dict[str, tuple[int, ...]]) -> int | None:
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
