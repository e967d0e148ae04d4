"""Tiny random-weight SD1/SD2 checkpoints in the real file formats, for tests (model-formats 10).

The layouts are the real ones at small width: a single file with LDM names and the right prefixes, and a
diffusers folder that diffusers and transformers themselves load. Weights come from one seeded generator per
component, drawn in the module's own key order, so the same seed gives the same tensors in every form (the
round-trip tests depend on it). Norm weights are `1 + 0.1 randn` and biases `0.1 randn`, so a swapped or
dropped norm key changes outputs (10.2).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from diffusion.detection import HeadOverrides
from diffusion.key_maps import (
    unet_config_to_diffusers,
    unet_diffusers_key_map,
    unet_state_dict_to_diffusers,
    vae_config_to_diffusers,
    vae_state_dict_to_diffusers,
)
from diffusion.sampling.model_sampling import DiscreteConfig, scaled_linear_betas
from diffusion.text_encoders import (
    SD1_CLIP_L,
    SD2_OPENCLIP_H,
    ClipTextEncoder,
    TextEncoderConfig,
    transformers_to_open_clip,
)
from diffusion.tokenizer import write_tokenizer_folder
from diffusion.unet import TINY_SD1_UNET, TINY_SD2_UNET, UNetConfig, UNetModel
from diffusion.vae import TINY_VAE, AutoencoderKL

FAMILIES = ("sd1", "sd2")

# Text towers at width 32 with the full vocabulary and 77 positions; 3 layers so CLIP skip has room. SD2's
# projection is deliberately non-square so a missed transpose shows.
TINY_SD1_TEXT = dataclasses.replace(SD1_CLIP_L, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=128)
TINY_SD2_TEXT = dataclasses.replace(
    SD2_OPENCLIP_H, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=128, projection_dim=24
)

# Offsets added to the seed per component, so a standalone VAE written with seed s equals the VAE inside
# a checkpoint written with seed s.
_UNET_STREAM, _VAE_STREAM, _TEXT_STREAM = 0, 1, 2
_NORMS = (nn.GroupNorm, nn.LayerNorm)

# The SD training schedule ("scaled_linear", 1000 steps): written as real files carry it, for the loader
# to skip, and into the diffusers scheduler config.
_SCHEDULE = DiscreteConfig()

#: Safetensors metadata key under which tiny single files record their head layout (HeadOverrides as JSON):
#: head counts are not in the weights, and the family rule assumes real widths.
HEAD_OVERRIDES_METADATA = "sdgraph.head_overrides"
_OVERRIDE_FIELDS = frozenset(field.name for field in dataclasses.fields(HeadOverrides))


def tiny_unet_config(family: str, *, inpaint: bool = False) -> UNetConfig:
    config = {"sd1": TINY_SD1_UNET, "sd2": TINY_SD2_UNET}[_check_family(family)]
    return dataclasses.replace(config, in_channels=9) if inpaint else config


def tiny_text_config(family: str) -> TextEncoderConfig:
    return {"sd1": TINY_SD1_TEXT, "sd2": TINY_SD2_TEXT}[_check_family(family)]


def tiny_overrides(family: str) -> HeadOverrides:
    """The head layout tiny single files need (the family rule assumes real widths)."""
    text_heads = tiny_text_config(family).num_heads
    unet = tiny_unet_config(family)
    if unet.num_heads is not None:
        return HeadOverrides(unet_num_heads=unet.num_heads, text_num_heads=text_heads)
    return HeadOverrides(unet_head_width=unet.head_width, text_num_heads=text_heads)


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"tiny models exist for {FAMILIES}, not {family!r}")
    return family


def random_weights(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights for every tensor of a (meta-built) module, in its state-dict order.

    Matrices and kernels get std 1/sqrt(fan_in) so activations stay of order one through the tiny nets.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = {name for name, sub in module.named_modules() if isinstance(sub, _NORMS)}
    weights = {}
    for key, target in module.state_dict(keep_vars=True).items():
        if not target.is_floating_point():
            raise TypeError(f"random_weights: {key} is a {target.dtype} buffer; give it a value explicitly")
        owner, _, leaf = key.rpartition(".")
        noise = torch.randn(target.shape, generator=generator)
        if owner in norms and leaf == "weight":
            weights[key] = 1 + 0.1 * noise
        elif leaf == "bias" or noise.ndim < 2:
            weights[key] = 0.1 * noise
        else:
            weights[key] = noise / math.sqrt(math.prod(target.shape[1:]))
    return weights


def tiny_unet_weights(family: str, seed: int = 0, *, inpaint: bool = False) -> dict[str, torch.Tensor]:
    return random_weights(UNetModel(tiny_unet_config(family, inpaint=inpaint), device="meta"), seed + _UNET_STREAM)


def tiny_vae_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_weights(AutoencoderKL(TINY_VAE, device="meta"), seed + _VAE_STREAM)


def tiny_text_weights(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Text encoder weights in transformers naming, without the `text_model.` level."""
    weights = random_weights(ClipTextEncoder(tiny_text_config(family), device="meta"), seed + _TEXT_STREAM)
    return {key.removeprefix("transformer.").removeprefix("text_model."): v for key, v in weights.items()}


def _schedule_buffers() -> dict[str, torch.Tensor]:
    betas = scaled_linear_betas(_SCHEDULE.num_timesteps, _SCHEDULE.linear_start, _SCHEDULE.linear_end)
    return {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float()}


def _cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def tiny_checkpoint_tensors(
    family: str, *, seed: int = 0, v_prediction: bool = False, inpaint: bool = False
) -> dict[str, torch.Tensor]:
    """The full single-file key set (fp32), as written by write_tiny_checkpoint."""
    tensors = {f"model.diffusion_model.{k}": v for k, v in tiny_unet_weights(family, seed, inpaint=inpaint).items()}
    tensors |= {f"first_stage_model.{k}": v for k, v in tiny_vae_weights(seed).items()}
    text = tiny_text_weights(family, seed)
    if family == "sd1":
        tensors |= {f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.items()}
        # Real SD1 files store the position ids; the loader must skip them.
        tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        tensors |= {f"cond_stage_model.model.{k}": v for k, v in transformers_to_open_clip(text).items()}
        tensors["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    tensors |= _schedule_buffers()
    tensors |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0, dtype=torch.int32)}
    if v_prediction:
        tensors["v_pred"] = torch.tensor([])  # ComfyUI's marker: an empty tensor
    return tensors


def write_tiny_checkpoint(
    path: str | os.PathLike,
    family: str = "sd1",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    v_prediction: bool = False,
    inpaint: bool = False,
) -> Path:
    """A single `.safetensors` file in LDM layout: UNet, VAE, text encoder, schedule and EMA leftovers."""
    path = Path(path)
    tensors = tiny_checkpoint_tensors(family, seed=seed, v_prediction=v_prediction, inpaint=inpaint)
    save_file(_cast(tensors, dtype), str(path), metadata=_head_metadata(family))
    return path


def _head_metadata(family: str) -> dict[str, str]:
    return {"format": "pt", HEAD_OVERRIDES_METADATA: json.dumps(dataclasses.asdict(tiny_overrides(family)))}


def write_tiny_unet(path: str | os.PathLike, family: str = "sd1", *, seed: int = 0, prefixed: bool = False) -> Path:
    """A standalone UNet file (ComfyUI's diffusion_models folder): LDM names, the checkpoint's UNet for `seed`."""
    path = Path(path)
    prefix = "model.diffusion_model." if prefixed else ""
    tensors = {prefix + k: v for k, v in tiny_unet_weights(family, seed).items()}
    save_file(_cast(tensors, torch.float32), str(path), metadata=_head_metadata(family))
    return path


def write_tiny_text_encoder(path: str | os.PathLike, family: str = "sd1", *, seed: int = 0) -> Path:
    """A standalone text encoder file (ComfyUI's text_encoders folder): transformers names (`text_model.*`)
    for SD1's CLIP-L, unprefixed open_clip names for SD2's OpenCLIP-H; the checkpoint's tower for `seed`."""
    path = Path(path)
    text = tiny_text_weights(family, seed)
    tensors = {f"text_model.{k}": v for k, v in text.items()} if family == "sd1" else transformers_to_open_clip(text)
    save_file(_cast(tensors, torch.float32), str(path), metadata=_head_metadata(family))
    return path


def write_tiny_legacy_checkpoint(
    path: str | os.PathLike, family: str = "sd1", *, seed: int = 0, v_prediction: bool = False
) -> Path:
    """The same tensors as write_tiny_checkpoint as a legacy `.ckpt` pickle (`{"state_dict": ...}`), the
    layout CompVis-era files have; diffusion/legacy_pickle.py reads it with the restricted unpickler."""
    path = Path(path)
    tensors = tiny_checkpoint_tensors(family, seed=seed, v_prediction=v_prediction)
    torch.save({"state_dict": tensors, "global_step": 0}, path)
    return path


def head_overrides_from_metadata(metadata: Mapping[str, str]) -> HeadOverrides | None:
    """The head layout a file written by write_tiny_checkpoint records in its safetensors metadata."""
    recorded = metadata.get(HEAD_OVERRIDES_METADATA)
    if recorded is None:
        return None
    try:
        fields = json.loads(recorded)
        return HeadOverrides(**{name: fields[name] for name in fields if name in _OVERRIDE_FIELDS})
    except (ValueError, TypeError) as error:
        raise ValueError(f"metadata {HEAD_OVERRIDES_METADATA} is not a head layout: {error}") from None


def tiny_overrides_for_widths(shapes: Mapping[str, tuple[int, ...]], family: str) -> HeadOverrides | None:
    """tiny_overrides(family) when a file's text encoder and UNet have exactly the tiny widths (32, which
    no real model has): files without metadata (legacy pickles, older tiny files) still load unaided."""
    text_widths = {shape[-1] for key, shape in shapes.items() if key.endswith("token_embedding.weight")}
    unet_width = shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0,))[0]
    tiny_width = tiny_text_config(family).hidden_size if family in FAMILIES else None
    if text_widths == {tiny_width} and unet_width == tiny_unet_config(family).model_channels:
        return tiny_overrides(family)
    return None


def write_tiny_vae(
    path: str | os.PathLike, naming: str = "ldm", *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """A standalone VAE file with unprefixed LDM names or diffusers names (plus a `loss.*` leftover)."""
    path = Path(path)
    weights = tiny_vae_weights(seed)
    if naming == "diffusers":
        weights = vae_state_dict_to_diffusers(weights, TINY_VAE)
    elif naming != "ldm":
        raise ValueError(f"naming must be 'ldm' or 'diffusers', not {naming!r}")
    weights["loss.logvar"] = torch.zeros(())
    save_file(_cast(weights, dtype), str(path))
    return path


def write_tiny_diffusers_folder(
    folder: str | os.PathLike,
    family: str = "sd1",
    *,
    seed: int = 0,
    variant: str | None = None,
    sharded: bool = False,
    v_prediction: bool = False,
    inpaint: bool = False,
) -> Path:
    """A diffusers pipeline folder holding the same weights as write_tiny_checkpoint with the same seed
    (and the same `inpaint` choice: a 9-channel UNet).

    variant "fp16" stores fp16 tensors under `*.fp16.*` names; sharded splits each weight file in two with
    an index. SD2's text encoder is stored as real SD2 folders store it: a plain CLIPTextModel (no
    projection) without the last block.
    """
    folder = Path(folder)
    dtype = torch.float16 if variant == "fp16" else torch.float32
    unet_config = tiny_unet_config(family, inpaint=inpaint)
    unet_weights = unet_state_dict_to_diffusers(tiny_unet_weights(family, seed, inpaint=inpaint), unet_config)
    vae_weights = vae_state_dict_to_diffusers(tiny_vae_weights(seed), TINY_VAE)
    components = {
        "unet": (unet_config_to_diffusers(unet_config), unet_weights, "diffusion_pytorch_model"),
        "vae": (vae_config_to_diffusers(TINY_VAE), vae_weights, "diffusion_pytorch_model"),
        "text_encoder": (_text_encoder_config_json(family), _diffusers_text_weights(family, seed), "model"),
    }
    for name, (config, weights, base) in components.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
        _write_weights(folder / name, base, _cast(weights, dtype), variant=variant, sharded=sharded)
    _write_tokenizer(folder / "tokenizer", family)
    _write_scheduler(folder / "scheduler", family, v_prediction)
    (folder / "model_index.json").write_text(json.dumps(_model_index(family), indent=2))
    return folder


def _diffusers_text_weights(family: str, seed: int) -> dict[str, torch.Tensor]:
    weights = tiny_text_weights(family, seed)
    if family == "sd2":
        # Real SD2 folders store the tower without its last block, so that the last hidden state is SD2's
        # penultimate layer (model-formats 4), and without the projection (a plain CLIPTextModel).
        dropped = f"encoder.layers.{tiny_text_config(family).num_layers - 1}."
        weights = {k: v for k, v in weights.items() if not k.startswith((dropped, "text_projection"))}
    # Hub folders written before transformers 5.6 keep the `text_model.` level.
    return {f"text_model.{k}": v for k, v in weights.items()}


def _text_encoder_config_json(family: str) -> dict:
    config = tiny_text_config(family)
    if family == "sd2":
        config = dataclasses.replace(config, num_layers=config.num_layers - 1)  # the folder's tower, one block short
    # What transformers' save_pretrained writes for this configuration.
    return {**config.to_transformers().to_dict(), "architectures": ["CLIPTextModel"], "torch_dtype": "float32"}


def _write_weights(
    folder: Path, base: str, weights: dict[str, torch.Tensor], *, variant: str | None, sharded: bool
) -> None:
    tag = f".{variant}" if variant else ""
    if not sharded:
        save_file(weights, str(folder / f"{base}{tag}.safetensors"), metadata={"format": "pt"})
        return
    keys = list(weights)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for number, shard_keys in enumerate(shards, start=1):
        name = f"{base}{tag}-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: weights[k] for k in shard_keys}, str(folder / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in shard_keys}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    # diffusers' spelling of a variant index (`x.safetensors.index.fp16.json`).
    index = folder / f"{base}.safetensors.index{tag}.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write_tokenizer(folder: Path, family: str) -> None:
    # SD2's tokenizer pads with "!" (id 0) to imitate open_clip's zero padding; SD1 pads with end-of-text.
    write_tokenizer_folder(folder, pad_token="!" if family == "sd2" else "<|endoftext|>")


def _write_scheduler(folder: Path, family: str, v_prediction: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "_class_name": "PNDMScheduler" if family == "sd1" else "DDIMScheduler",
        "beta_start": _SCHEDULE.linear_start,
        "beta_end": _SCHEDULE.linear_end,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": _SCHEDULE.num_timesteps,
        "prediction_type": "v_prediction" if v_prediction else "epsilon",
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "clip_sample": False,
        "skip_prk_steps": True,
        "timestep_spacing": "leading",
    }
    (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2))


def _model_index(family: str) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler" if family == "sd1" else "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


# --- LoRA files ------------------------------------------------------------------------------------------------

LORA_STYLES = ("kohya", "peft", "loha", "lokr")
# What trainers adapt: attention and feed-forward projections (UNet, diffusers paths) and the text tower's
# attention and MLP (transformers paths); conv adds the resnet convolutions (LoCon).
_UNET_LORA_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out", ".ff.net.0.proj", ".ff.net.2")
_UNET_CONV_TARGETS = (".conv1", ".conv2")
_TEXT_LORA_TARGETS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


Shapes = dict[str, tuple[int, ...]]


def _is_lora_target(diffusers_path: str, conv: bool) -> bool:
    if diffusers_path.endswith(_UNET_LORA_TARGETS):
        return True
    return conv and ".resnets." in diffusers_path and diffusers_path.endswith(_UNET_CONV_TARGETS)


def tiny_lora_targets(family: str, *, conv: bool = False) -> tuple[Shapes, Shapes]:
    """(UNet diffusers module path -> weight shape, text `text_model.` module path -> weight shape)."""
    config = tiny_unet_config(family)
    unet_shapes = {k: tuple(v.shape) for k, v in UNetModel(config, device="meta").state_dict().items()}
    unet = {
        diffusers_key.removesuffix(".weight"): unet_shapes[ours]
        for diffusers_key, ours in sorted(unet_diffusers_key_map(config).items())
        if diffusers_key.endswith(".weight") and _is_lora_target(diffusers_key.removesuffix(".weight"), conv)
    }
    text_shapes = ClipTextEncoder(tiny_text_config(family), device="meta").state_dict()
    text = {
        "text_model." + key.removeprefix("transformer.").removesuffix(".weight"): tuple(value.shape)
        for key, value in sorted(text_shapes.items())
        if key.endswith(".weight") and key.removesuffix(".weight").endswith(_TEXT_LORA_TARGETS)
    }
    return unet, text


def _kohya_name(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def _lora_factors(shape: tuple[int, ...], rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down [r, in, (kh, kw)], up [out, r, (1, 1)]): at alpha / rank = 1/2 the delta is about a quarter of
    the weights' scale, enough to move every output and small enough to keep activations tame."""
    fan_in = math.prod(shape[1:])
    down = torch.randn(rank, *shape[1:], generator=generator) / math.sqrt(fan_in)
    up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=generator) * 0.5 / math.sqrt(rank)
    return down, up


def _loha_tensors(name: str, shape: tuple[int, ...], rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    fan_in = math.prod(shape[1:])
    parts = {}
    for i in (1, 2):
        parts[f"{name}.hada_w{i}_a"] = torch.randn(shape[0], rank, generator=generator) * 0.5 / math.sqrt(rank)
        parts[f"{name}.hada_w{i}_b"] = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.25
    return parts


def _lokr_tensors(name: str, shape: tuple[int, ...], rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    out1 = 4 if shape[0] % 4 == 0 else 1
    in1 = 4 if shape[1] % 4 == 0 else 1
    out2, in2 = shape[0] // out1, shape[1] // in1
    kernel = math.prod(shape[2:])
    return {
        f"{name}.lokr_w1": torch.randn(out1, in1, generator=generator) * 0.5,
        f"{name}.lokr_w2_a": torch.randn(out2, rank, generator=generator) / math.sqrt(rank),
        f"{name}.lokr_w2_b": torch.randn(rank, in2 * kernel, generator=generator) / math.sqrt(in2 * kernel),
    }


def tiny_lora_tensors(
    family: str = "sd1", style: str = "kohya", *, rank: int = 4, seed: int = 0, conv: bool = False, text: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA for the tiny model of `family`.

    kohya and peft files with the same seed and rank hold the same factors (and alpha = rank / 2, in the
    file or in peft's adapter metadata), so they describe the same deltas under two naming schemes.
    """
    if style not in LORA_STYLES:
        raise ValueError(f"style must be one of {LORA_STYLES}, not {style!r}")
    unet, text_targets = tiny_lora_targets(family, conv=conv)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    modules = [("unet", path, shape) for path, shape in unet.items()]
    modules += [("text", path, shape) for path, shape in text_targets.items()] if text else []
    for part, path, shape in modules:
        alpha = torch.tensor(rank / 2)  # one tensor per module: safetensors refuses shared storage
        kohya = _kohya_name("lora_unet_" if part == "unet" else "lora_te_", path)
        if style in ("kohya", "peft"):
            down, up = _lora_factors(shape, rank, generator)
            if style == "kohya":
                tensors |= {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up, f"{kohya}.alpha": alpha}
            else:
                peft = ("unet." if part == "unet" else "text_encoder.") + path
                tensors |= {f"{peft}.lora_A.weight": down, f"{peft}.lora_B.weight": up}
        elif style == "loha":
            tensors |= _loha_tensors(kohya, shape, rank, generator) | {f"{kohya}.alpha": alpha}
        else:
            tensors |= _lokr_tensors(kohya, shape, rank // 2, generator) | {f"{kohya}.alpha": alpha}
    metadata = {"format": "pt"}
    if style == "peft":
        adapter = {f"{part}.{field}": value for part in ("unet", "text_encoder")
                   for field, value in (("lora_alpha", rank / 2), ("r", rank))}
        metadata["lora_adapter_metadata"] = json.dumps(adapter, sort_keys=True)
    return tensors, metadata


def write_tiny_lora(
    path: str | os.PathLike, family: str = "sd1", style: str = "kohya", *, rank: int = 4, seed: int = 0,
    conv: bool = False, text: bool = True,
) -> Path:
    """A tiny LoRA file (tiny_lora_tensors): `.safetensors`, or a plain pickle of the tensors for `.pt`."""
    path = Path(path)
    tensors, metadata = tiny_lora_tensors(family, style, rank=rank, seed=seed, conv=conv, text=text)
    if path.suffix.lower() == ".safetensors":
        save_file(_cast(tensors, torch.float32), str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
    return path
