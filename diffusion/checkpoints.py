"""Loading SD1.x/SD2.x checkpoints from the files users have: single files, diffusers folders, VAE files.

Every model is built on the `meta` device (nothing allocated), then each tensor is read from the file
(memory-mapped), converted to the target dtype and device, and put in place of the meta parameter before
the next is read (`assign_weights`; the text encoder's own `load_weights` takes the same stream), so peak
memory is the model plus one tensor, never two copies of the weights (model-formats 1.2). Loading is
strict: a key the model needs and the file lacks is an error naming the keys, the module and the file.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from diffusion import detection
from diffusion.detection import (
    UNET_PREFIX,
    VAE_PREFIX,
    FamilyDetection,
    HeadOverrides,
    strip_prefix,
)
from diffusion.key_maps import fit_tensor_shape, vae_diffusers_key_map
from diffusion.legacy_pickle import PickleTensors
from diffusion.safetensors_io import CheckpointError, SafetensorsFiles
from diffusion.text_encoders import (
    SD1_CLIP_L,
    SD2_OPENCLIP_H,
    ClipTextEncoder,
    TextEncoderConfig,
    open_clip_to_transformers,
    text_encoder_config_from_state_dict,
)
from diffusion.unet import UNetConfig, UNetModel
from diffusion.vae import AutoencoderKL, VAEConfig

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TEXT_BASES = {"sd1": SD1_CLIP_L, "sd2": SD2_OPENCLIP_H}

# Keys that carry no weights we load (model-formats 2.6): EMA copies, the training schedule, markers.
_SKIP_PREFIXES = ("model_ema.", "loss.")
_SKIP_NAMES = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "v_pred", "ztsnr", "edm_vpred.sigma_min", "edm_vpred.sigma_max", "edm_mean", "edm_std",
    "cond_stage_model.model.logit_scale",
})
_SKIP_SUFFIXES = (".position_ids",)


class TensorSource(Protocol):
    """What every loader reads from (SafetensorsFiles, PickleTensors): names, shapes, one tensor at a time."""

    description: str
    metadata: dict[str, str]

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def get(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint's three models, the configs they were built from, and how the loader decided."""

    source: str
    family: str
    variant: str
    unet: UNetModel
    #: None when a single file carries no weights for it (a "UNet + text encoder only" or "no VAE" file):
    #: as in ComfyUI the loader still loads the rest, and the user adds a VAELoader / CLIPLoader.
    vae: AutoencoderKL | None
    text_encoder: ClipTextEncoder | None
    unet_config: UNetConfig
    vae_config: VAEConfig | None
    text_config: TextEncoderConfig | None
    prediction: str
    prediction_source: str
    zsnr: bool
    skipped_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def is_skipped_key(name: str) -> bool:
    return name in _SKIP_NAMES or name.startswith(_SKIP_PREFIXES) or name.endswith(_SKIP_SUFFIXES)


def open_tensor_file(path: str | os.PathLike) -> SafetensorsFiles | PickleTensors:
    """A single weights file: safetensors by default, legacy pickles only through the restricted unpickler."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return PickleTensors(path)
    return SafetensorsFiles([path])


def refuse_fp8_scaled(source: TensorSource) -> None:
    if any(name == "scaled_fp8" or name.endswith(".scaled_fp8") for name in source.shapes()):
        raise CheckpointError(
            f"{source.description}: scaled fp8 checkpoint (has a scaled_fp8 marker and per-layer scale_weight "
            "tensors); fp8 weights are not supported: use an fp16/bf16/fp32 file"
        )


# --- assigning tensors into meta-built modules ------------------------------------------------------------


def assign_weights(
    module: nn.Module,
    source: TensorSource,
    names: Mapping[str, str],
    *,
    dtype: torch.dtype,
    device: torch.device,
    what: str,
) -> None:
    """Fill every parameter and buffer of `module` from `source.get(names[key])`, one tensor at a time.

    names maps each of the module's state-dict keys to the key it has in the file. Floating tensors are
    converted to `dtype` as they are read; integer buffers keep theirs. 1x1-conv vs linear layouts are
    reconciled ([C, C] <-> [C, C, 1, 1], as diffusers and LDM store the VAE attention).
    """
    targets = module.state_dict(keep_vars=True)
    available = source.shapes()
    missing = [key for key in targets if names.get(key) not in available]
    if missing:
        raise CheckpointError(
            f"{source.description}: {what} is missing {len(missing)} of {len(targets)} keys, e.g. "
            f"{', '.join(repr(names.get(k, k)) for k in missing[:5])}"
        )
    for key, target in targets.items():
        tensor = source.get(names[key])
        if tuple(tensor.shape) != tuple(target.shape):
            try:
                tensor = fit_tensor_shape(tensor, tuple(target.shape), key=names[key])
            except ValueError:
                raise CheckpointError(
                    f"{source.description}: {what} key {names[key]!r} has shape {list(tensor.shape)}, "
                    f"the model expects {list(target.shape)}"
                ) from None
        _assign(module, key, _convert(tensor, dtype, device))
        del tensor
    leftover = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftover and device.type != "meta":
        raise CheckpointError(f"{source.description}: {what} tensors {leftover[:5]} were never loaded (still on meta)")


def _convert(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def _assign(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name)
    if leaf in owner._parameters:
        # Inference weights: no autograd bookkeeping, and LoRA patches may rewrite them in place.
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def names_from_key_map(key_map: Mapping[str, str], file_keys: Iterable[str], prefix: str = "") -> dict[str, str]:
    """Our key -> the file's key, for the diffusers names (under `prefix`) the file has; the VAE map offers
    two spellings of its attention tensors and a file holds one."""
    present = set(file_keys)
    return {ours: prefix + theirs for theirs, ours in key_map.items() if prefix + theirs in present}


def identity_names(module_keys: Iterable[str], prefix: str) -> dict[str, str]:
    """Module key -> file key for modules named after the LDM keys (the file only adds a prefix)."""
    return {key: prefix + key for key in module_keys}


# --- single files -------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prediction: str | None = None,
    overrides: HeadOverrides | None = None,
    variant: str | None = None,
) -> LoadedCheckpoint:
    """Load an SD1.x/SD2.x checkpoint: a single `.safetensors` / legacy pickle file or a diffusers folder.

    dtype defaults to fp32 on CPU and fp16 on CUDA. prediction ("eps" / "v_prediction") overrides what the
    file says. overrides supply the head counts a single file cannot tell (tiny or unusual widths); diffusers
    folders carry them in config.json. variant picks a diffusers weight variant ("fp16").
    """
    path = Path(path)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if path.is_dir():
        from diffusion.diffusers_folders import load_diffusers_folder

        return load_diffusers_folder(path, dtype=dtype, device=device, prediction=prediction, variant=variant)
    with open_tensor_file(path) as source:
        return _load_single_file(source, path, dtype, device, prediction, overrides or HeadOverrides())


def _load_single_file(
    source: TensorSource,
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    prediction: str | None,
    overrides: HeadOverrides,
) -> LoadedCheckpoint:
    shapes = source.shapes()
    refuse_fp8_scaled(source)
    try:
        found = detection.detect_family(shapes)
    except CheckpointError as error:
        raise CheckpointError(f"{source.description}: {error}") from None
    detection.require_supported(found, source.description)
    text_names = _text_encoder_names(shapes, found)
    unet_config, vae_config, text_config = _single_file_configs(shapes, found, text_names, overrides, source)
    choice = detection.detect_prediction(
        shapes, family=found.family, metadata=source.metadata, path=path, read_tensor=source.get,
        override=prediction,
    )
    unet = UNetModel(unet_config, device="meta")
    load = dict(dtype=dtype, device=device)
    assign_weights(unet, source, identity_names(unet.state_dict(), UNET_PREFIX), what="UNet", **load)
    used = {UNET_PREFIX + k for k in unet.state_dict()}
    vae = None
    if vae_config is not None:
        vae = AutoencoderKL(vae_config, device="meta")
        assign_weights(vae, source, identity_names(vae.state_dict(), VAE_PREFIX), what="VAE", **load)
        used |= {VAE_PREFIX + k for k in vae.state_dict()}
    text_encoder = None
    if text_config is not None:
        open_clip_prefix = found.text_prefix if found.family == "sd2" else None
        text_encoder = load_text_encoder(
            text_config, source, text_names, open_clip_prefix=open_clip_prefix, dtype=dtype, device=device
        )
    used |= set(text_names.values())
    prefixes = (UNET_PREFIX, VAE_PREFIX, found.text_prefix)
    check_unexpected(shapes, used, prefixes, source.description)
    leftover = [key for key in shapes if key not in used]
    return LoadedCheckpoint(
        source=source.description, family=found.family, variant=found.variant, unet=unet, vae=vae,
        text_encoder=text_encoder, unet_config=unet_config, vae_config=vae_config, text_config=text_config,
        prediction=choice.prediction, prediction_source=choice.source, zsnr=choice.zsnr,
        skipped_keys=tuple(k for k in leftover if is_skipped_key(k)),
        unexpected_keys=tuple(k for k in leftover if not is_skipped_key(k)),
    )


def check_unexpected(
    shapes: Mapping[str, tuple[int, ...]], used: set[str], prefixes: tuple[str, ...] | str, source: str
) -> None:
    """A file key under a model's prefix that no module takes means the derived layout is wrong: refuse."""
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    stray = [k for k in shapes if k not in used and not is_skipped_key(k) and k.startswith(prefixes)]
    if stray:
        raise CheckpointError(
            f"{source}: {len(stray)} tensors match no parameter of the detected layout, e.g. {stray[:5]}"
        )


_HEADS_HINT = "head counts are not stored in the weights: tiny or unusual models need overrides=HeadOverrides(...)"


def _single_file_configs(
    shapes: Mapping[str, tuple[int, ...]],
    found: FamilyDetection,
    text_names: Mapping[str, str],
    overrides: HeadOverrides,
    source: TensorSource,
) -> tuple[UNetConfig, VAEConfig | None, TextEncoderConfig | None]:
    where = source.description
    try:
        unet_config = detection.unet_config_from_shapes(strip_prefix(shapes, UNET_PREFIX), found.family, overrides)
        vae_shapes = strip_prefix(shapes, VAE_PREFIX)
        vae_config = None
        if vae_shapes:
            vae_config = detection.vae_config_from_shapes(vae_shapes, num_groups=overrides.num_groups or 32)
    except ValueError as error:  # CheckpointError, or a config refusing the widths found (GroupNorm groups)
        raise CheckpointError(f"{where}: {error}") from None
    try:
        for width, depth in zip(unet_config.level_widths, unet_config.transformer_depth):
            if depth:
                unet_config.heads_for(width)
    except ValueError as error:
        raise CheckpointError(f"{where}: UNet: {error} ({_HEADS_HINT})") from None
    # The file's own names and shapes (open_clip for SD2): the config reader knows both namings.
    text_shapes = {key[len(found.text_prefix):]: shapes[key] for key in set(text_names.values())}
    if not text_shapes:
        return unet_config, vae_config, None
    try:
        text_config = text_encoder_config_from_state_dict(
            text_shapes, base=TEXT_BASES[found.family], num_heads=overrides.text_num_heads
        )
    except ValueError as error:
        hint = f" ({_HEADS_HINT})" if "num_heads" in str(error) else ""
        raise CheckpointError(f"{where}: text encoder under {found.text_prefix}*: {error}{hint}") from None
    return unet_config, vae_config, text_config


def _text_encoder_names(shapes: Mapping[str, tuple[int, ...]], found: FamilyDetection) -> dict[str, str]:
    """Text encoder keys in transformers naming (without `text_model.`) -> the file's key.

    SD1 files store transformers names (some old ones without the `text_model.` level); SD2 files store
    open_clip names, renamed here by shape only (the fused in_proj is split when tensors are read).
    """
    prefix = found.text_prefix
    if found.family == "sd1":
        names = {}
        for key in shapes:
            if key.startswith(prefix) and not is_skipped_key(key):
                names[key[len(prefix):].removeprefix("text_model.")] = key
        return names
    return _open_clip_names(shapes, prefix)


def _open_clip_names(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, str]:
    names = {}
    for key, shape in shapes.items():
        if not key.startswith(prefix) or is_skipped_key(key):
            continue
        # Rename a meta stand-in (no data) per key to learn the transformers name(s) it becomes.
        placeholder = torch.empty(shape, device="meta")
        for renamed, _tensor in open_clip_to_transformers([(key[len(prefix):], placeholder)]):
            names[renamed.removeprefix("text_model.")] = key
    return names


def load_text_encoder(
    config: TextEncoderConfig,
    source: TensorSource,
    names: Mapping[str, str],
    *,
    open_clip_prefix: str | None,
    dtype: torch.dtype,
    device: torch.device,
) -> ClipTextEncoder:
    """Build the text encoder on meta and stream its tensors in; open_clip tensors are renamed and the fused
    in_proj split as each one is read."""
    encoder = ClipTextEncoder(config, dtype=dtype, device="meta")
    name_of = {file_key: name for name, file_key in names.items()}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file_key in dict.fromkeys(names.values()):
            tensor = source.get(file_key)
            if open_clip_prefix is None:
                pairs = [(name_of[file_key], tensor)]
            else:
                pairs = open_clip_to_transformers([(file_key[len(open_clip_prefix):], tensor)])
            converted = [(name, _convert(value, dtype, device)) for name, value in pairs]
            # Drop the file's tensor before the consumer asks for the next one: one file tensor alive at a time.
            del tensor, pairs
            yield from converted

    try:
        encoder.load_weights(tensors(), strict=True)
    except ValueError as error:
        raise CheckpointError(f"{source.description}: {error}") from None
    return encoder


# --- standalone VAE files -------------------------------------------------------------------------------------


def load_vae(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    num_groups: int = 32,
) -> AutoencoderKL:
    """A standalone VAE: an unprefixed LDM or diffusers-named file, a full checkpoint's `first_stage_model.`
    part, or a diffusers VAE folder. Latent scaling follows the latent width (4: SD1/SD2, 16: SD3)."""
    path = Path(path)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if path.is_dir():
        from diffusion.diffusers_folders import load_diffusers_vae

        return load_diffusers_vae(path, dtype=dtype, device=device)
    with open_tensor_file(path) as source:
        shapes = source.shapes()
        refuse_fp8_scaled(source)
        prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in shapes) else ""
        vae_shapes = {k: v for k, v in strip_prefix(shapes, prefix).items() if not is_skipped_key(k)}
        if "encoder.conv_in.weight" not in vae_shapes or "decoder.conv_in.weight" not in vae_shapes:
            layout = detection.unknown_layout_message(shapes)
            raise CheckpointError(f"{source.description}: not a VAE file (no encoder/decoder conv_in). {layout}")
        try:
            config = detection.vae_config_from_shapes(vae_shapes, num_groups=num_groups)
        except ValueError as error:
            raise CheckpointError(f"{source.description}: {error}") from None
        vae = AutoencoderKL(config, device="meta")
        if "decoder.up_blocks.0.resnets.0.norm1.weight" in vae_shapes:
            names = names_from_key_map(vae_diffusers_key_map(config), shapes, prefix)
        else:
            names = identity_names(vae.state_dict(), prefix)
        assign_weights(vae, source, names, dtype=dtype, device=device, what="VAE")
        if not prefix:
            parts = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
            check_unexpected(shapes, set(names.values()), parts, source.description)
    return vae
