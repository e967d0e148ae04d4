"""diffusers <-> LDM names and configs for the UNet and the VAE (model-formats.md 2.2, 2.3, 4).

Our modules carry LDM names, so single-file checkpoints load as they are; diffusers folders go through the
maps here. Each map is generated from the config by walking the same block layout the model builds, and
covers every tensor of that model exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch

from diffusion.unet import SDXL_ADM_TIME_EMBED_DIM, UNetConfig, UNetModel
from diffusion.vae import SD_VAE, AutoencoderKL, VAEConfig

_UNET_RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET_NAMES = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Old diffusers VAE folders (before the Attention refactor) name the mid attention tensors like this.
_VAE_LEGACY_ATTENTION_NAMES = {"q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}


def _rename(key: str, blocks: Mapping[str, tuple[str, Mapping[str, str]]]) -> str:
    """LDM key -> diffusers key, using the longest block prefix of ``key`` found in ``blocks``."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in blocks:
            target, inner_names = blocks[prefix]
            module, leaf = ".".join(parts[cut:-1]), parts[-1]
            module = inner_names.get(module, module)
            return ".".join(p for p in (target, module, leaf) if p)
    raise KeyError(f"no diffusers name for LDM key {key!r}")


def _unet_blocks(config: UNetConfig) -> dict[str, tuple[str, Mapping[str, str]]]:
    """LDM block prefix -> (diffusers block prefix, renames inside the block), after section 2.2's table."""
    resnet, plain = _UNET_RESNET_NAMES, {}
    blocks: dict[str, tuple[str, Mapping[str, str]]] = {
        "time_embed.0": ("time_embedding.linear_1", plain),
        "time_embed.2": ("time_embedding.linear_2", plain),
        "label_emb.0.0": ("add_embedding.linear_1", plain),
        "label_emb.0.2": ("add_embedding.linear_2", plain),
        "input_blocks.0.0": ("conv_in", plain),
        "out.0": ("conv_norm_out", plain),
        "out.2": ("conv_out", plain),
    }
    per_level = config.num_res_blocks + 1
    levels = len(config.channel_mult)
    for i, depth in enumerate(config.transformer_depth):
        for j in range(config.num_res_blocks):
            index = 1 + i * per_level + j
            blocks[f"input_blocks.{index}.0"] = (f"down_blocks.{i}.resnets.{j}", resnet)
            if depth:
                blocks[f"input_blocks.{index}.1"] = (f"down_blocks.{i}.attentions.{j}", plain)
        if i < levels - 1:
            blocks[f"input_blocks.{(i + 1) * per_level}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", plain)
    for k, depth in enumerate(reversed(config.transformer_depth)):
        for j in range(per_level):
            index = k * per_level + j
            blocks[f"output_blocks.{index}.0"] = (f"up_blocks.{k}.resnets.{j}", resnet)
            if depth:
                blocks[f"output_blocks.{index}.1"] = (f"up_blocks.{k}.attentions.{j}", plain)
        if k < levels - 1:
            upsample = f"output_blocks.{k * per_level + config.num_res_blocks}.{2 if depth else 1}.conv"
            blocks[upsample] = (f"up_blocks.{k}.upsamplers.0.conv", plain)
    blocks["middle_block.0"] = ("mid_block.resnets.0", resnet)
    if config.transformer_depth_middle:
        blocks["middle_block.1"] = ("mid_block.attentions.0", plain)
        blocks["middle_block.2"] = ("mid_block.resnets.1", resnet)
    else:
        blocks["middle_block.1"] = ("mid_block.resnets.1", resnet)
    return blocks


def _vae_blocks(config: VAEConfig) -> dict[str, tuple[str, Mapping[str, str]]]:
    """LDM block prefix -> (diffusers block prefix, renames inside the block), after section 2.3's table."""
    plain: Mapping[str, str] = {}
    blocks: dict[str, tuple[str, Mapping[str, str]]] = {}
    levels = len(config.ch_mult)
    for part in ("encoder", "decoder"):
        blocks[f"{part}.conv_in"] = (f"{part}.conv_in", plain)
        blocks[f"{part}.conv_out"] = (f"{part}.conv_out", plain)
        blocks[f"{part}.norm_out"] = (f"{part}.conv_norm_out", plain)
        blocks[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", _VAE_RESNET_NAMES)
        blocks[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", _VAE_RESNET_NAMES)
        blocks[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", _VAE_ATTENTION_NAMES)
    for i in range(levels):
        for j in range(config.num_res_blocks):
            blocks[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET_NAMES)
        if i < levels - 1:
            blocks[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", plain)
    for k in range(levels):
        ldm = f"decoder.up.{levels - 1 - k}"
        for j in range(config.num_res_blocks + 1):
            blocks[f"{ldm}.block.{j}"] = (f"decoder.up_blocks.{k}.resnets.{j}", _VAE_RESNET_NAMES)
        if k < levels - 1:
            blocks[f"{ldm}.upsample.conv"] = (f"decoder.up_blocks.{k}.upsamplers.0.conv", plain)
    blocks["quant_conv"] = ("quant_conv", plain)
    blocks["post_quant_conv"] = ("post_quant_conv", plain)
    return blocks


def unet_diffusers_key_map(config: UNetConfig) -> dict[str, str]:
    """diffusers ``UNet2DConditionModel`` tensor name -> our (LDM) name, for every tensor of the model."""
    return dict(_unet_key_map(config))


@lru_cache(maxsize=16)
def _unet_key_map(config: UNetConfig) -> dict[str, str]:
    # Cached: walking a meta-device SDXL UNet takes a noticeable fraction of a second.
    blocks = _unet_blocks(config)
    ours = UNetModel(config, device="meta").state_dict()
    return {_rename(key, blocks): key for key in ours}


def vae_diffusers_key_map(config: VAEConfig) -> dict[str, str]:
    """diffusers ``AutoencoderKL`` tensor name -> our (LDM) name; also maps the old ``query/key/value/proj_attn``."""
    blocks = _vae_blocks(config)
    ours = AutoencoderKL(config, device="meta").state_dict()
    key_map = {_rename(key, blocks): key for key in ours}
    for part in ("encoder", "decoder"):
        for ldm_name, legacy_name in _VAE_LEGACY_ATTENTION_NAMES.items():
            for leaf in ("weight", "bias"):
                key_map[f"{part}.mid_block.attentions.0.{legacy_name}.{leaf}"] = f"{part}.mid.attn_1.{ldm_name}.{leaf}"
    return key_map


def fit_tensor_shape(tensor: torch.Tensor, target_shape: torch.Size | tuple[int, ...], key: str = "") -> torch.Tensor:
    """Adds or drops trailing 1x1 kernel dims (``[C, C]`` <-> ``[C, C, 1, 1]``, the VAE attention convs).

    Any other mismatch is an error naming the tensor and both shapes.
    """
    target = tuple(target_shape)
    found = tuple(tensor.shape)
    if found == target:
        return tensor
    if found[:2] == target[:2] and all(d == 1 for d in found[2:] + target[2:]):
        return tensor.reshape(target)
    raise ValueError(f"tensor {key or '<unnamed>'}: shape {list(found)} does not fit expected {list(target)}")


def _convert(
    state_dict: Mapping[str, torch.Tensor],
    key_map: Mapping[str, str],
    expected: Mapping[str, torch.Tensor],
    what: str,
) -> dict[str, torch.Tensor]:
    unknown = sorted(k for k in state_dict if k not in key_map)
    if unknown:
        raise KeyError(f"{what}: {len(unknown)} unexpected tensors, e.g. {unknown[:5]}")
    converted = {
        key_map[k]: fit_tensor_shape(t, expected[key_map[k]].shape, key=k) for k, t in state_dict.items()
    }
    missing = sorted(k for k in expected if k not in converted)
    if missing:
        raise KeyError(f"{what}: {len(missing)} tensors missing, e.g. {missing[:5]}")
    return converted


def unet_state_dict_from_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: UNetConfig
) -> dict[str, torch.Tensor]:
    """Renames a diffusers UNet state dict to our names; errors name unexpected and missing tensors."""
    expected = UNetModel(config, device="meta").state_dict()
    return _convert(state_dict, unet_diffusers_key_map(config), expected, "diffusers UNet")


def unet_state_dict_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: UNetConfig
) -> dict[str, torch.Tensor]:
    """Renames our UNet state dict to diffusers names (for writing diffusers folders)."""
    inverse = {ours: theirs for theirs, ours in unet_diffusers_key_map(config).items()}
    return {inverse[key]: tensor for key, tensor in state_dict.items()}


def vae_state_dict_from_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: VAEConfig
) -> dict[str, torch.Tensor]:
    """Renames a diffusers VAE state dict (new or old attention names) to ours, reshaping attention weights."""
    expected = AutoencoderKL(config, device="meta").state_dict()
    return _convert(state_dict, vae_diffusers_key_map(config), expected, "diffusers VAE")


def vae_state_dict_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], config: VAEConfig
) -> dict[str, torch.Tensor]:
    """Renames our VAE state dict to current diffusers names; attention 1x1 convs become ``[C, C]`` linears."""
    blocks = _vae_blocks(config)
    converted = {}
    for key, tensor in state_dict.items():
        name = _rename(key, blocks)
        if ".mid_block.attentions.0.to_" in name and tensor.ndim == 4:
            tensor = fit_tensor_shape(tensor, tensor.shape[:2], key=key)
        converted[name] = tensor
    return converted


# diffusers UNet settings our architecture hard-codes; a config asking for anything else is refused
# (a list value, e.g. per-level only_cross_attention, must hold accepted values only).
_UNET_FIXED_FIELDS = {
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "attention_type": "default",
    "cross_attention_norm": None,
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": False,
    "reverse_transformer_layers_per_block": None,
}
_VAE_FIXED_FIELDS = {"act_fn": "silu", "mid_block_add_attention": True}


def _check_fixed(config_json: Mapping, fixed: Mapping, what: str) -> None:
    """Refuses fields set to values our architecture does not build; a tuple lists several accepted values."""
    for field, expected in fixed.items():
        accepted = expected if isinstance(expected, tuple) else (expected,)
        value = config_json.get(field, accepted[0])
        values = value if isinstance(value, list) else [value]
        if any(v not in accepted for v in values):
            raise ValueError(f"{what} config: {field}={value!r} is not supported (expected {expected!r})")


def _per_level(value: int | list | tuple, levels: int, field: str) -> list[int]:
    values = [value] * levels if isinstance(value, int) else list(value)
    if len(values) != levels or not all(isinstance(v, int) for v in values):
        raise ValueError(f"diffusers UNet config: {field}={value!r} is not one int or {levels} ints")
    return values


def _channel_mult(widths: list[int], what: str) -> tuple[int, ...]:
    base = widths[0]
    if any(w % base for w in widths):
        raise ValueError(f"{what} config: block_out_channels {widths} are not multiples of {base}")
    return tuple(w // base for w in widths)


def _unet_head_config(heads: list[int], widths: list[int], attention_levels: list[int]) -> dict:
    """Head counts per level -> ``num_heads`` (one count) or ``head_width`` (one width), whichever fits."""
    counts = {heads[i] for i in attention_levels}
    if len(counts) == 1:
        return {"num_heads": counts.pop(), "head_width": None}
    head_widths = {widths[i] // heads[i] for i in attention_levels if widths[i] % heads[i] == 0}
    if len(head_widths) == 1 and all(widths[i] % heads[i] == 0 for i in attention_levels):
        return {"num_heads": None, "head_width": head_widths.pop()}
    raise ValueError(f"diffusers UNet config: heads {heads} for widths {widths} are neither one count nor one width")


def unet_config_from_diffusers(config_json: Mapping) -> UNetConfig:
    """A diffusers ``UNet2DConditionModel`` ``config.json`` -> :class:`UNetConfig`."""
    _check_fixed(config_json, _UNET_FIXED_FIELDS, "diffusers UNet")
    widths = list(config_json["block_out_channels"])
    levels = len(widths)
    down_types = list(config_json["down_block_types"])
    attention = [t == "CrossAttnDownBlock2D" for t in down_types]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down_types):
        raise ValueError(f"diffusers UNet config: unsupported down_block_types {down_types}")
    if list(config_json["up_block_types"]) != expected_up:
        raise ValueError(f"diffusers UNet config: up_block_types {config_json['up_block_types']} != {expected_up}")
    res_blocks = set(_per_level(config_json.get("layers_per_block", 2), levels, "layers_per_block"))
    if len(res_blocks) != 1:
        raise ValueError(f"diffusers UNet config: layers_per_block must be equal on every level, got {res_blocks}")
    depths = _per_level(config_json.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    # The legacy misnomer: `attention_head_dim` holds head counts unless `num_attention_heads` is given.
    heads_value = config_json.get("num_attention_heads") or config_json.get("attention_head_dim", 8)
    heads = _per_level(heads_value, levels, "attention_head_dim")
    context = config_json.get("cross_attention_dim", 1280)
    if not isinstance(context, int):
        raise ValueError(f"diffusers UNet config: cross_attention_dim={context!r} must be one int")
    attention_levels = [i for i in range(levels) if attention[i]] + [levels - 1]
    return UNetConfig(
        in_channels=config_json.get("in_channels", 4),
        out_channels=config_json.get("out_channels", 4),
        model_channels=widths[0],
        channel_mult=_channel_mult(widths, "diffusers UNet"),
        num_res_blocks=res_blocks.pop(),
        transformer_depth=tuple(d if a else 0 for d, a in zip(depths, attention)),
        transformer_depth_middle=depths[-1],
        context_dim=context,
        use_linear_proj=bool(config_json.get("use_linear_projection", False)),
        adm_in_channels=_unet_adm_from_diffusers(config_json),
        num_groups=config_json.get("norm_num_groups", 32),
        upcast_attention=bool(config_json.get("upcast_attention", False)),
        **_unet_head_config(heads, widths, attention_levels),
    )


def _unet_adm_from_diffusers(config_json: Mapping) -> int | None:
    kind = config_json.get("addition_embed_type")
    if kind is None:
        return None
    time_dim = config_json.get("addition_time_embed_dim")
    if kind != "text_time" or time_dim != SDXL_ADM_TIME_EMBED_DIM:
        raise ValueError(
            f"diffusers UNet config: addition_embed_type={kind!r} with addition_time_embed_dim={time_dim!r} "
            f"is not supported (expected 'text_time' with {SDXL_ADM_TIME_EMBED_DIM})"
        )
    return int(config_json["projection_class_embeddings_input_dim"])


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """:class:`UNetConfig` -> keyword arguments / ``config.json`` of a diffusers ``UNet2DConditionModel``."""
    widths = list(config.level_widths)
    depths = [d if d else 1 for d in config.transformer_depth]
    # diffusers derives the middle block's depth from the last level's entry.
    if config.transformer_depth_middle == 0:
        raise ValueError("diffusers has no UNet middle block of two resnets without attention")
    if config.transformer_depth[-1] and config.transformer_depth[-1] != config.transformer_depth_middle:
        raise ValueError(
            f"diffusers cannot express a middle depth {config.transformer_depth_middle} different from the "
            f"last level's depth {config.transformer_depth[-1]}"
        )
    depths[-1] = config.transformer_depth_middle
    heads = [max(1, w // config.head_width) if config.head_width else config.num_heads for w in widths]
    result = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in config.transformer_depth],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(config.transformer_depth)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "transformer_layers_per_block": depths,
        "attention_head_dim": config.num_heads if config.num_heads is not None else heads,
        "cross_attention_dim": config.context_dim,
        "use_linear_projection": config.use_linear_proj,
        "upcast_attention": config.upcast_attention,
        "norm_num_groups": config.num_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }
    if config.adm_in_channels is not None:
        result["addition_embed_type"] = "text_time"
        result["addition_time_embed_dim"] = SDXL_ADM_TIME_EMBED_DIM
        result["projection_class_embeddings_input_dim"] = config.adm_in_channels
    return result


def vae_config_from_diffusers(config_json: Mapping) -> VAEConfig:
    """A diffusers ``AutoencoderKL`` ``config.json`` -> :class:`VAEConfig`."""
    _check_fixed(config_json, _VAE_FIXED_FIELDS, "diffusers VAE")
    widths = list(config_json["block_out_channels"])
    for field, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = config_json.get(field, [block] * len(widths))
        if list(types) != [block] * len(widths):
            raise ValueError(f"diffusers VAE config: {field}={types!r} is not {len(widths)} x {block!r}")
    quant = config_json.get("use_quant_conv", True)
    if config_json.get("use_post_quant_conv", True) != quant:
        raise ValueError("diffusers VAE config: use_quant_conv and use_post_quant_conv must agree")
    shift = config_json.get("shift_factor")
    return VAEConfig(
        ch=widths[0],
        ch_mult=_channel_mult(widths, "diffusers VAE"),
        num_res_blocks=config_json.get("layers_per_block", 2),
        z_channels=config_json.get("latent_channels", 4),
        in_channels=config_json.get("in_channels", 3),
        out_channels=config_json.get("out_channels", 3),
        use_quant_conv=bool(quant),
        num_groups=config_json.get("norm_num_groups", 32),
        scale_factor=float(config_json.get("scaling_factor", SD_VAE.scale_factor)),
        shift_factor=0.0 if shift is None else float(shift),
    )


def vae_config_to_diffusers(config: VAEConfig) -> dict:
    """:class:`VAEConfig` -> keyword arguments / ``config.json`` of a diffusers ``AutoencoderKL``."""
    levels = len(config.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.level_widths),
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.num_groups,
        "scaling_factor": config.scale_factor,
        "shift_factor": config.shift_factor or None,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_quant_conv,
        "mid_block_add_attention": True,
    }
