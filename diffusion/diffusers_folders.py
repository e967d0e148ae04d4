"""diffusers pipeline folders (model-formats 4): model_index.json, unet/, vae/, text_encoder/, scheduler/.

Configs come from each component's config.json, so no head override is ever needed here; weights come from
`diffusion_pytorch_model[.variant].safetensors` / `model[.variant].safetensors`, their sharded index files,
or (old folders) the pickled `.bin` through the restricted unpickler. Tensors are renamed to our LDM names
with the key maps and assigned one at a time like every other loader.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

from diffusion.checkpoints import (
    TEXT_BASES,
    LoadedCheckpoint,
    assign_weights,
    check_unexpected,
    load_text_encoder,
    names_from_key_map,
)
from diffusion.detection import PredictionChoice, checked_override, sd2_upcasts_attention, variant_of
from diffusion.key_maps import (
    unet_config_from_diffusers,
    unet_diffusers_key_map,
    vae_config_from_diffusers,
    vae_diffusers_key_map,
)
from diffusion.legacy_pickle import PickleTensors
from diffusion.safetensors_io import CheckpointError, SafetensorsFiles
from diffusion.text_encoders import ClipTextEncoder, TextEncoderConfig, text_encoder_config_from_state_dict
from diffusion.unet import UNetModel
from diffusion.vae import AutoencoderKL, VAEConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"

T = TypeVar("T")

_LATER_PIPELINES = {"transformer": "SD3 / SD3.5", "text_encoder_2": "SDXL"}
_SCHEDULER_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v_prediction"}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a diffusers folder needs it)") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def component_weight_files(folder: Path, base: str, variant: str | None = None) -> list[Path]:
    """The weight file(s) of one component folder: single file, sharded index, or legacy `.bin`."""
    tag = f".{variant}" if variant else ""
    single = folder / f"{base}{tag}.safetensors"
    if single.is_file():
        return [single]
    # Both index spellings occur: diffusers writes `x.safetensors.index.fp16.json`, transformers
    # `x.fp16.safetensors.index.json`.
    for index in (folder / f"{base}.safetensors.index{tag}.json", folder / f"{base}{tag}.safetensors.index.json"):
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: has no weight_map")
            shards = [folder / name for name in dict.fromkeys(weight_map.values())]
            absent = [shard.name for shard in shards if not shard.is_file()]
            if absent:
                raise CheckpointError(f"{index}: shard files missing: {absent}")
            return shards
    legacy = folder / f"{base}{tag}.bin"
    if legacy.is_file():
        return [legacy]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
    raise CheckpointError(
        f"{folder}: no {base}{tag}.safetensors, sharded {base}{tag} index or {base}{tag}.bin (found: {found})"
    )


def open_component(folder: Path, base: str, variant: str | None = None) -> SafetensorsFiles | PickleTensors:
    files = component_weight_files(folder, base, variant)
    if files[0].suffix == ".bin":
        return PickleTensors(files[0])
    return SafetensorsFiles(files)


def folder_family(folder: Path) -> str:
    """sd1 / sd2 from the UNet's structure (linear projections: SD2); later families refused by name."""
    index = read_json(folder / "model_index.json")
    for component, family in _LATER_PIPELINES.items():
        if _present(index, component):
            raise CheckpointError(f"{folder}: detected {family} diffusers folder; not supported yet")
    if not _present(index, "unet"):
        raise CheckpointError(f"{folder}: model_index.json names no unet (found {sorted(index)})")
    unet_json = read_json(folder / "unet" / "config.json")
    return "sd2" if unet_json.get("use_linear_projection") else "sd1"


def _present(index: Mapping, component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and entry[:1] != [None]


def load_diffusers_folder(
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    prediction: str | None = None,
    variant: str | None = None,
) -> LoadedCheckpoint:
    """A diffusers SD1/SD2 pipeline folder; see load_checkpoint."""
    family = folder_family(folder)
    unet_config = _config(folder / "unet" / "config.json", unet_config_from_diffusers)
    if sd2_upcasts_attention(family):
        # The same SD2 rule as for single files (ComfyUI converts folders and applies it too); SD2.0 folders
        # leave upcast_attention off in config.json.
        unet_config = dataclasses.replace(unet_config, upcast_attention=True)
    vae_config = _config(folder / "vae" / "config.json", vae_config_from_diffusers)
    unet = UNetModel(unet_config, device="meta")
    with open_component(folder / "unet", DIFFUSERS_WEIGHTS, variant) as source:
        names = names_from_key_map(unet_diffusers_key_map(unet_config), source.shapes())
        assign_weights(unet, source, names, what="UNet", dtype=dtype, device=device)
        check_unexpected(source.shapes(), set(names.values()), "", source.description)
    vae = load_diffusers_vae(folder / "vae", vae_config, dtype=dtype, device=device, variant=variant)
    text_config, text_encoder = _load_text_encoder(folder / "text_encoder", family, dtype, device, variant)
    choice = _folder_prediction(folder, prediction)
    return LoadedCheckpoint(
        source=str(folder), family=family, variant=variant_of(unet_config.in_channels),
        unet=unet, vae=vae, text_encoder=text_encoder, unet_config=unet_config, vae_config=vae_config,
        text_config=text_config, prediction=choice.prediction, prediction_source=choice.source, zsnr=choice.zsnr,
        skipped_keys=(), unexpected_keys=(),
    )


def _config(path: Path, parse: Callable[[dict], T]) -> T:
    config_json = read_json(path)
    try:
        return parse(config_json)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def _load_text_encoder(
    folder: Path, family: str, dtype: torch.dtype, device: torch.device, variant: str | None
) -> tuple[TextEncoderConfig, ClipTextEncoder]:
    text_json = read_json(folder / "config.json")
    with open_component(folder, TRANSFORMERS_WEIGHTS, variant) as source:
        shapes = source.shapes()
        names = {key.removeprefix("text_model."): key for key in shapes}
        try:
            text_config = text_encoder_config_from_state_dict(
                {name: shapes[key] for name, key in names.items()},
                base=TEXT_BASES[family],
                num_heads=text_json.get("num_attention_heads"),
            )
        except ValueError as error:
            raise CheckpointError(f"{source.description}: {error}") from None
        if family == "sd2":
            # diffusers' SD2 towers end at the penultimate block already (its last one was dropped when the
            # folder was made); layers still count from the full tower, so SD2's default -2 is our last.
            text_config = dataclasses.replace(text_config, missing_last_layers=1)
        encoder = load_text_encoder(text_config, source, names, open_clip_prefix=None, dtype=dtype, device=device)
    return text_config, encoder


def load_diffusers_vae(
    folder: Path, config: VAEConfig | None = None, *, dtype: torch.dtype, device: torch.device,
    variant: str | None = None,
) -> AutoencoderKL:
    """A diffusers VAE folder (config.json + weights)."""
    config = config or _config(folder / "config.json", vae_config_from_diffusers)
    vae = AutoencoderKL(config, device="meta")
    with open_component(folder, DIFFUSERS_WEIGHTS, variant) as source:
        names = names_from_key_map(vae_diffusers_key_map(config), source.shapes())
        assign_weights(vae, source, names, what="VAE", dtype=dtype, device=device)
        check_unexpected(source.shapes(), set(names.values()), "", source.description)
    return vae


def _folder_prediction(folder: Path, override: str | None) -> PredictionChoice:
    scheduler = folder / "scheduler" / "scheduler_config.json"
    config = read_json(scheduler) if scheduler.is_file() else {}
    zsnr = bool(config.get("rescale_betas_zero_snr", False))
    if override is not None:
        return checked_override(override, zsnr)
    if config.get("prediction_type") in _SCHEDULER_PREDICTIONS:
        return PredictionChoice(_SCHEDULER_PREDICTIONS[config["prediction_type"]], "scheduler_config.json", zsnr)
    return PredictionChoice("eps", "family default", zsnr)
