"""diffusers <-> LDM names and configs for the UNet and VAE (model-formats.md 2.2, 2.3, 4)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel

from diffusion.key_maps import (
    fit_tensor_shape,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_diffusers_key_map,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_diffusers_key_map,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)
from diffusion.unet import (
    SD1_UNET,
    SD2_UNET,
    SDXL_BASE_UNET,
    SDXL_REFINER_UNET,
    TINY_SD1_UNET,
    TINY_SD2_UNET,
    TINY_SDXL_REFINER_UNET,
    TINY_SDXL_UNET,
    UNetConfig,
    UNetModel,
)
from diffusion.vae import SD3_VAE, SD_VAE, SDXL_VAE, TINY_SD3_VAE, TINY_VAE, AutoencoderKL

UNET_CONFIGS = {
    "sd1": SD1_UNET,
    "sd2": SD2_UNET,
    "sdxl": SDXL_BASE_UNET,
    "sdxl_refiner": SDXL_REFINER_UNET,
    "tiny_sd1": TINY_SD1_UNET,
    "tiny_sd2": TINY_SD2_UNET,
    "tiny_sdxl": TINY_SDXL_UNET,
    "tiny_sdxl_refiner": TINY_SDXL_REFINER_UNET,
}
VAE_CONFIGS = {"sd": SD_VAE, "sd3": SD3_VAE, "tiny": TINY_VAE, "tiny_sd3": TINY_SD3_VAE}
LEGACY_VAE_NAMES = ("query", "key", "value", "proj_attn")

_DOWN, _CROSS_DOWN = "DownBlock2D", "CrossAttnDownBlock2D"
_UP, _CROSS_UP = "UpBlock2D", "CrossAttnUpBlock2D"
# The fields of the published configs (runwayml SD1.5, stabilityai SD2.1, SDXL base and refiner) that matter.
PUBLISHED_UNET_JSON = {
    "sd1": {
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
        "down_block_types": [_CROSS_DOWN] * 3 + [_DOWN], "up_block_types": [_UP] + [_CROSS_UP] * 3,
        "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_eps": 1e-05, "norm_num_groups": 32,
        "flip_sin_to_cos": True, "freq_shift": 0, "sample_size": 64,
    },
    "sd2": {
        "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024, "down_block_types": [_CROSS_DOWN] * 3 + [_DOWN],
        "up_block_types": [_UP] + [_CROSS_UP] * 3, "layers_per_block": 2, "use_linear_projection": True,
        "upcast_attention": False, "num_class_embeds": None, "dual_cross_attention": False,
    },
    "sdxl": {
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
        "down_block_types": [_DOWN, _CROSS_DOWN, _CROSS_DOWN], "up_block_types": [_CROSS_UP, _CROSS_UP, _UP],
        "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn", "num_attention_heads": None,
        "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
        "upcast_attention": None, "use_linear_projection": True, "mid_block_only_cross_attention": None,
    },
    "sdxl_refiner": {
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [6, 12, 24, 24],
        "block_out_channels": [384, 768, 1536, 1536], "cross_attention_dim": 1280,
        "down_block_types": [_DOWN, _CROSS_DOWN, _CROSS_DOWN, _DOWN],
        "up_block_types": [_UP, _CROSS_UP, _CROSS_UP, _UP],
        "layers_per_block": 2, "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
        "use_linear_projection": True,
    },
}


def _meta_diffusers_unet(config: UNetConfig) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config_to_diffusers(config))


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_key_map_is_a_bijection_between_the_two_state_dicts(name):
    config = UNET_CONFIGS[name]
    key_map = unet_diffusers_key_map(config)
    theirs = _meta_diffusers_unet(config).state_dict()
    ours = UNetModel(config, device="meta").state_dict()
    assert set(key_map) == set(theirs)
    assert sorted(key_map.values()) == sorted(ours)
    mismatched = [k for k, v in key_map.items() if theirs[k].shape != ours[v].shape]
    assert mismatched == []


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_key_map_is_a_bijection_between_the_two_state_dicts_plus_legacy_names(name):
    config = VAE_CONFIGS[name]
    key_map = vae_diffusers_key_map(config)
    with torch.device("meta"):
        theirs = DiffusersAutoencoderKL.from_config(vae_config_to_diffusers(config)).state_dict()
    ours = AutoencoderKL(config, device="meta").state_dict()
    current = {k: v for k, v in key_map.items() if k.split(".")[-2] not in LEGACY_VAE_NAMES}
    assert set(current) == set(theirs)
    assert sorted(current.values()) == sorted(ours)
    assert len(key_map) - len(current) == 2 * 4 * 2  # encoder/decoder x q,k,v,proj_out x weight/bias
    for key, ours_key in current.items():
        assert fit_tensor_shape(theirs[key], ours[ours_key].shape, key=key).shape == ours[ours_key].shape


UNET_NAME_EXAMPLES = [
    (SD1_UNET, "input_blocks.4.1.proj_in.weight", "down_blocks.1.attentions.0.proj_in.weight"),
    (SD1_UNET, "input_blocks.6.0.op.weight", "down_blocks.1.downsamplers.0.conv.weight"),
    (SD1_UNET, "output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
    (SD1_UNET, "output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
    (SD1_UNET, "output_blocks.11.0.skip_connection.weight", "up_blocks.3.resnets.2.conv_shortcut.weight"),
    (SD1_UNET, "input_blocks.1.0.emb_layers.1.weight", "down_blocks.0.resnets.0.time_emb_proj.weight"),
    (SD1_UNET, "middle_block.2.out_layers.3.weight", "mid_block.resnets.1.conv2.weight"),
    (SD1_UNET, "time_embed.2.bias", "time_embedding.linear_2.bias"),
    (SD1_UNET, "out.0.weight", "conv_norm_out.weight"),
    (
        SDXL_BASE_UNET,
        "input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight",
        "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.0.proj.weight",
    ),
    (SDXL_BASE_UNET, "output_blocks.2.2.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
    (SDXL_BASE_UNET, "label_emb.0.0.weight", "add_embedding.linear_1.weight"),
]


@pytest.mark.parametrize(
    ("config", "ldm", "diffusers"), UNET_NAME_EXAMPLES, ids=[ldm for _, ldm, _ in UNET_NAME_EXAMPLES]
)
def test_unet_key_map_matches_the_documented_examples(config, ldm, diffusers):
    assert unet_diffusers_key_map(config)[diffusers] == ldm


@pytest.mark.parametrize(
    ("diffusers", "ldm"),
    [
        ("encoder.down_blocks.2.downsamplers.0.conv.weight", "encoder.down.2.downsample.conv.weight"),
        ("encoder.down_blocks.1.resnets.0.conv_shortcut.bias", "encoder.down.1.block.0.nin_shortcut.bias"),
        ("decoder.up_blocks.0.resnets.2.norm2.weight", "decoder.up.3.block.2.norm2.weight"),
        ("decoder.up_blocks.2.upsamplers.0.conv.weight", "decoder.up.1.upsample.conv.weight"),
        ("decoder.mid_block.attentions.0.to_out.0.weight", "decoder.mid.attn_1.proj_out.weight"),
        ("encoder.mid_block.attentions.0.group_norm.bias", "encoder.mid.attn_1.norm.bias"),
        ("encoder.mid_block.attentions.0.query.weight", "encoder.mid.attn_1.q.weight"),
        ("decoder.mid_block.attentions.0.proj_attn.bias", "decoder.mid.attn_1.proj_out.bias"),
        ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
        ("post_quant_conv.weight", "post_quant_conv.weight"),
    ],
)
def test_vae_key_map_matches_the_documented_table(diffusers, ldm):
    assert vae_diffusers_key_map(SD_VAE)[diffusers] == ldm


def test_fit_tensor_shape_adds_and_drops_1x1_kernel_dims():
    linear = torch.arange(6.0).reshape(2, 3)
    conv = fit_tensor_shape(linear, (2, 3, 1, 1))
    assert conv.shape == (2, 3, 1, 1) and torch.equal(conv.flatten(1), linear)
    assert torch.equal(fit_tensor_shape(conv, torch.Size([2, 3])), linear)
    assert fit_tensor_shape(linear, (2, 3)) is linear


def test_fit_tensor_shape_names_the_tensor_and_both_shapes_on_mismatch():
    with pytest.raises(ValueError, match=r"tensor decoder\.mid\.attn_1\.q\.weight: shape \[4, 4\] .* \[8, 8, 1, 1\]"):
        fit_tensor_shape(torch.zeros(4, 4), (8, 8, 1, 1), key="decoder.mid.attn_1.q.weight")
    with pytest.raises(ValueError, match=r"shape \[4, 4, 3, 3\] does not fit expected \[4, 4\]"):
        fit_tensor_shape(torch.zeros(4, 4, 3, 3), (4, 4))


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_config_round_trips_through_diffusers(name):
    assert unet_config_from_diffusers(unet_config_to_diffusers(UNET_CONFIGS[name])) == UNET_CONFIGS[name]


@pytest.mark.parametrize("name", list(PUBLISHED_UNET_JSON))
def test_published_diffusers_unet_configs_give_our_presets(name):
    assert unet_config_from_diffusers(PUBLISHED_UNET_JSON[name]) == UNET_CONFIGS[name]


def test_sd21_upcast_attention_is_read():
    config_json = {**PUBLISHED_UNET_JSON["sd2"], "upcast_attention": True}
    assert unet_config_from_diffusers(config_json).upcast_attention is True


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"time_cond_proj_dim": 256}, "time_cond_proj_dim=256 is not supported"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type='UNetMidBlock2DSimpleCrossAttn'"),
        ({"only_cross_attention": [False, True, False, False]}, "only_cross_attention"),
        ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "unsupported down_block_types"),
        ({"up_block_types": [_CROSS_UP] * 4}, "up_block_types"),
        ({"block_out_channels": [320, 480, 1280, 1280]}, r"block_out_channels \[320, 480, 1280, 1280\]"),
        ({"attention_head_dim": [5, 7, 20, 20]}, "neither one count nor one width"),
        ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
    ],
)
def test_unsupported_diffusers_unet_configs_are_refused_by_field(changes, message):
    with pytest.raises(ValueError, match=message):
        unet_config_from_diffusers({**PUBLISHED_UNET_JSON["sd1"], **changes})


def test_unet_config_to_diffusers_refuses_what_diffusers_cannot_build():
    with pytest.raises(ValueError, match="two resnets without attention"):
        unet_config_to_diffusers(UNetConfig(transformer_depth_middle=0))
    with pytest.raises(ValueError, match="middle depth 2 different from the last level's depth 1"):
        unet_config_to_diffusers(UNetConfig(transformer_depth=(1, 1, 1, 1), transformer_depth_middle=2))


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_config_round_trips_through_diffusers(name):
    assert vae_config_from_diffusers(vae_config_to_diffusers(VAE_CONFIGS[name])) == VAE_CONFIGS[name]


def test_published_diffusers_vae_configs_give_our_presets():
    base = {
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "layers_per_block": 2,
        "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512,
    }
    assert vae_config_from_diffusers(base) == SD_VAE  # SD1.5's config predates scaling_factor
    assert vae_config_from_diffusers({**base, "scaling_factor": 0.13025, "force_upcast": True}) == SDXL_VAE
    sd3 = {**base, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
           "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True}
    assert vae_config_from_diffusers(sd3) == SD3_VAE


def test_vae_config_with_one_quant_conv_is_refused():
    with pytest.raises(ValueError, match="use_quant_conv and use_post_quant_conv must agree"):
        vae_config_from_diffusers({**vae_config_to_diffusers(SD_VAE), "use_post_quant_conv": False})


def _random_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=generator) for k, v in module.state_dict().items()}


def test_unet_state_dict_round_trips_through_diffusers_names():
    ours = _random_state_dict(UNetModel(TINY_SDXL_UNET, device="meta"))
    back = unet_state_dict_from_diffusers(unet_state_dict_to_diffusers(ours, TINY_SDXL_UNET), TINY_SDXL_UNET)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_vae_state_dict_round_trips_through_diffusers_names_with_linear_attention():
    ours = _random_state_dict(AutoencoderKL(TINY_VAE, device="meta"))
    theirs = vae_state_dict_to_diffusers(ours, TINY_VAE)
    assert theirs["decoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
    back = vae_state_dict_from_diffusers(theirs, TINY_VAE)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_old_diffusers_vae_attention_names_load_like_the_new_ones():
    theirs = vae_state_dict_to_diffusers(_random_state_dict(AutoencoderKL(TINY_VAE, device="meta")), TINY_VAE)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, tensor in theirs.items():
        for new_name, old_name in renames.items():
            key = key.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        old[key] = tensor
    new_loaded = vae_state_dict_from_diffusers(theirs, TINY_VAE)
    old_loaded = vae_state_dict_from_diffusers(old, TINY_VAE)
    assert all(torch.equal(old_loaded[k], new_loaded[k]) for k in new_loaded)


def test_state_dict_conversion_names_unexpected_and_missing_tensors():
    theirs = unet_state_dict_to_diffusers(_random_state_dict(UNetModel(TINY_SD1_UNET, device="meta")), TINY_SD1_UNET)
    with pytest.raises(KeyError, match=r"1 unexpected tensors, e.g. \['down_blocks.9.resnets.0.norm1.weight'\]"):
        extra = {**theirs, "down_blocks.9.resnets.0.norm1.weight": torch.zeros(1)}
        unet_state_dict_from_diffusers(extra, TINY_SD1_UNET)
    del theirs["conv_out.bias"]
    with pytest.raises(KeyError, match=r"1 tensors missing, e.g. \['out.2.bias'\]"):
        unet_state_dict_from_diffusers(theirs, TINY_SD1_UNET)
