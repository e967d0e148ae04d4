"""Text encoders against transformers' CLIPTextModel and an independent open_clip-style oracle.

Tiny towers keep the real layout (full 49408 vocabulary, 77 positions) with width 32, 4 heads, 3 layers,
every weight random and every norm perturbed, so a swapped or dropped key shows (model-formats 10.1-10.2).
"""
import copy
import dataclasses
from collections import OrderedDict

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffusion.text_encoders import (
    SD1_CLIP_L,
    SD2_OPENCLIP_H,
    ClipTextEncoder,
    SDTextEncoder,
    embedding_folder_lookup,
    load_textual_inversion,
    open_clip_to_transformers,
    resolve_layer,
    text_encoder_config_from_state_dict,
    transformers_to_open_clip,
)
from diffusion.tokenizer import ClipTokenizer

BOS, EOS = 49406, 49407
TINY = dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64)
TINY_CLIP_L = dataclasses.replace(SD1_CLIP_L, **TINY)
TINY_OPENCLIP_H = dataclasses.replace(SD2_OPENCLIP_H, **TINY, projection_dim=24)
TOLERANCE = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Max abs error normalised by the reference's scale (model-formats 10.4)."""
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error < TOLERANCE, f"normalised max abs error {error:.2e}"


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        is_norm = "norm" in name or "ln_" in name
        p.copy_((1 + 0.1 * noise) if is_norm and name.endswith("weight") else (0.1 if is_norm else 0.3) * noise)
    return model.eval()


@pytest.fixture(scope="module")
def clip_l_reference() -> CLIPTextModel:
    return randomize(CLIPTextModel(TINY_CLIP_L.to_transformers()), seed=1)


@pytest.fixture(scope="module")
def openclip_reference() -> CLIPTextModelWithProjection:
    return randomize(CLIPTextModelWithProjection(TINY_OPENCLIP_H.to_transformers()), seed=2)


@pytest.fixture(scope="module")
def clip_l(clip_l_reference) -> ClipTextEncoder:
    encoder = ClipTextEncoder(TINY_CLIP_L)
    encoder.load_weights(clip_l_reference.state_dict().items())
    return encoder


@pytest.fixture(scope="module")
def openclip_h(openclip_reference) -> ClipTextEncoder:
    encoder = ClipTextEncoder(TINY_OPENCLIP_H)
    encoder.load_weights(openclip_reference.state_dict().items())
    return encoder


def framed(prompt: str, pad: int) -> list[int]:
    ids = [BOS, *ClipTokenizer.default().encode(prompt), EOS]
    return ids + [pad] * (77 - len(ids))


@torch.no_grad()
def reference_run(model: nn.Module, ids: list[int]):
    return model(torch.tensor([ids]), output_hidden_states=True)


CAT_SD1 = framed("a photo of a cat", pad=49407)
CAT_SD2 = framed("a photo of a cat", pad=0)


def test_last_layer_with_final_norm_matches_transformers(clip_l, clip_l_reference):
    hidden, _ = clip_l.encode_tokens([CAT_SD1], layer=-1)
    assert_close(hidden, reference_run(clip_l_reference, CAT_SD1).last_hidden_state)


@pytest.mark.parametrize("layer", [-1, -2, -3])
def test_each_clip_skip_layer_is_that_hidden_state_with_final_norm(clip_l, clip_l_reference, layer):
    states = reference_run(clip_l_reference, CAT_SD1).hidden_states
    hidden, _ = clip_l.encode_tokens([CAT_SD1], layer=layer)
    with torch.no_grad():
        assert_close(hidden, clip_l_reference.final_layer_norm(states[layer]))


def test_sd2_default_is_the_penultimate_layer_with_final_norm(openclip_h, openclip_reference):
    states = reference_run(openclip_reference, CAT_SD2).hidden_states
    hidden, _ = openclip_h.encode_tokens([CAT_SD2])
    with torch.no_grad():
        assert_close(hidden, openclip_reference.text_model.final_layer_norm(states[-2]))


def test_penultimate_layer_without_final_norm_is_the_raw_hidden_state(openclip_reference):
    sdxl_style = ClipTextEncoder(dataclasses.replace(TINY_OPENCLIP_H, final_norm=False))
    sdxl_style.load_weights(openclip_reference.state_dict().items())
    hidden, _ = sdxl_style.encode_tokens([CAT_SD2], layer=-2)
    assert_close(hidden, reference_run(openclip_reference, CAT_SD2).hidden_states[-2])


def test_pooled_output_is_the_projected_first_eos_state(openclip_h, openclip_reference):
    _, pooled = openclip_h.encode_tokens([CAT_SD2])
    assert pooled.shape == (1, 24)
    assert_close(pooled, reference_run(openclip_reference, CAT_SD2).text_embeds)


def test_pooled_output_without_projection_is_transformers_pooler_output(clip_l, clip_l_reference):
    _, pooled = clip_l.encode_tokens([CAT_SD1])
    assert_close(pooled, reference_run(clip_l_reference, CAT_SD1).pooler_output)


@pytest.mark.parametrize("layer", [-4, -24])
def test_clip_skip_beyond_the_layer_count_falls_back_to_the_last_layer(clip_l, layer):
    assert torch.equal(clip_l.encode_tokens([CAT_SD1], layer=layer)[0], clip_l.encode_tokens([CAT_SD1], layer=-1)[0])


def test_every_block_changes_the_output_far_beyond_the_tolerance(clip_l_reference):
    baseline = reference_run(clip_l_reference, CAT_SD1).last_hidden_state
    for i in range(3):
        ablated = copy.deepcopy(clip_l_reference)
        layer = ablated.encoder.layers[i]
        with torch.no_grad():
            layer.self_attn.out_proj.weight.zero_()
            layer.mlp.fc2.weight.zero_()
        change = (reference_run(ablated, CAT_SD1).last_hidden_state - baseline).abs().max()
        assert change > 1e3 * TOLERANCE * baseline.abs().max()


def test_weighting_moves_weighted_tokens_from_the_empty_prompt_encoding(clip_l):
    tokens = SDTextEncoder(clip_l).tokenize("a (photo:1.5) of a (cat:0.5)")
    (chunk,) = tokens
    ids = [t for t, _ in chunk]
    z, pooled_plain = clip_l.encode_tokens([ids])
    z_empty, _ = clip_l.encode_tokens([[BOS, EOS] + [EOS] * 75])
    cond, pooled = clip_l.encode_token_chunks(tokens)
    assert [w for _, w in chunk[:7]] == [1.0, 1.0, 1.5, 1.0, 1.0, 0.5, 1.0]
    for j, w in [(2, 1.5), (5, 0.5)]:
        torch.testing.assert_close(cond[0, j], z_empty[0, j] + w * (z[0, j] - z_empty[0, j]), rtol=0, atol=1e-6)
    unweighted = [j for j in range(77) if j not in (2, 5)]
    assert torch.equal(cond[0, unweighted], z[0, unweighted])
    assert torch.equal(pooled, pooled_plain)


def test_unweighted_prompt_is_encoded_without_the_empty_prompt(clip_l, clip_l_reference):
    cond, pooled = SDTextEncoder(clip_l).encode("a photo of a cat")
    reference = reference_run(clip_l_reference, CAT_SD1)
    assert cond.shape == (1, 77, 32) and cond.dtype == torch.float32
    assert_close(cond, reference.last_hidden_state)
    assert_close(pooled, reference.pooler_output)


def test_sd2_prompt_is_padded_with_zeros_and_read_at_the_penultimate_layer(openclip_h, openclip_reference):
    encoder = SDTextEncoder(openclip_h)
    assert [t for t, _ in encoder.tokenize("a photo of a cat")[0]] == CAT_SD2
    cond, pooled = encoder.encode("a photo of a cat")
    reference = reference_run(openclip_reference, CAT_SD2)
    with torch.no_grad():
        assert_close(cond, openclip_reference.text_model.final_layer_norm(reference.hidden_states[-2]))
    assert_close(pooled, reference.text_embeds)


def test_long_prompt_concatenates_per_chunk_encodings_and_pools_the_first(clip_l, clip_l_reference):
    encoder = SDTextEncoder(clip_l)
    chunks = encoder.tokenize("a castle on a hill at sunset, " * 15)
    cond, pooled = encoder.encode("a castle on a hill at sunset, " * 15)
    assert len(chunks) == 2 and cond.shape == (1, 154, 32)
    first, second = (reference_run(clip_l_reference, [t for t, _ in c]) for c in chunks)
    assert_close(cond[:, :77], first.last_hidden_state)
    assert_close(cond[:, 77:], second.last_hidden_state)
    assert_close(pooled, first.pooler_output)


def test_with_layer_shares_weights_and_stops_earlier(clip_l, clip_l_reference):
    encoder = SDTextEncoder(clip_l)
    skipped = encoder.with_layer(-2)
    assert skipped.encoder is encoder.encoder and skipped.layer == -2 and encoder.layer == -1
    cond, _ = skipped.encode("a photo of a cat")
    with torch.no_grad():
        expected = clip_l_reference.final_layer_norm(reference_run(clip_l_reference, CAT_SD1).hidden_states[-2])
    assert_close(cond, expected)


@pytest.mark.parametrize("layer", [0, 1])
def test_with_layer_rejects_non_negative_layers(clip_l, layer):
    with pytest.raises(ValueError, match="negative"):
        SDTextEncoder(clip_l).with_layer(layer)


def test_chunks_of_different_lengths_are_rejected(clip_l):
    with pytest.raises(ValueError, match=r"\[5, 77\]"):
        clip_l.encode_token_chunks([[(BOS, 1.0)] * 77, [(BOS, 1.0)] * 5])


def test_embedding_vector_is_injected_as_an_input_embedding(clip_l, clip_l_reference):
    vector = torch.randn(32, generator=torch.Generator().manual_seed(3))
    patched = copy.deepcopy(clip_l_reference)
    with torch.no_grad():
        patched.embeddings.token_embedding.weight[1000] = vector
    encoder = SDTextEncoder(clip_l, embeddings=lambda name: vector[None] if name == "style" else None)
    (chunk,) = encoder.tokenize("a photo embedding:style cat")
    assert torch.equal(chunk[3][0], vector)
    ids = [BOS, 320, 1125, 1000, 2368, EOS] + [EOS] * 71
    cond, pooled = encoder.encode("a photo embedding:style cat")
    reference = reference_run(patched, ids)
    assert_close(cond, reference.last_hidden_state)
    assert_close(pooled, reference.pooler_output)


def test_embedding_of_another_width_is_left_out_of_the_encoding(clip_l):
    encoder = SDTextEncoder(clip_l, embeddings=lambda name: torch.ones(2, 1024))
    cond, _ = encoder.encode("a photo embedding:sd2style cat")
    expected, _ = encoder.encode("a photo cat")
    assert torch.equal(cond, expected)


def test_load_weights_accepts_the_text_model_prefix_and_ignores_position_ids(clip_l_reference):
    state = {"text_model." + k: v for k, v in clip_l_reference.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77.0)[None] + 0.3  # inexact floats, as some merges
    encoder = ClipTextEncoder(TINY_CLIP_L)
    encoder.load_weights(state.items())
    assert_close(encoder.encode_tokens([CAT_SD1])[0], reference_run(clip_l_reference, CAT_SD1).last_hidden_state)


def test_load_weights_lists_every_missing_unexpected_and_misshaped_key(clip_l_reference):
    state = dict(clip_l_reference.state_dict())
    del state["encoder.layers.1.mlp.fc1.bias"]
    state["encoder.layers.7.mlp.fc1.bias"] = torch.zeros(64)
    state["final_layer_norm.weight"] = torch.ones(48)
    with pytest.raises(ValueError) as error:
        ClipTextEncoder(TINY_CLIP_L).load_weights(state.items())
    message = str(error.value)
    assert "final_layer_norm.weight: expected (32,), found (48,)" in message
    assert "missing keys: encoder.layers.1.mlp.fc1.bias" in message
    assert "unexpected keys: encoder.layers.7.mlp.fc1.bias" in message


def test_non_strict_load_keeps_initial_weights_for_missing_keys_but_not_on_meta(clip_l_reference):
    state = dict(clip_l_reference.state_dict())
    del state["final_layer_norm.bias"]
    encoder = ClipTextEncoder(TINY_CLIP_L)
    encoder.load_weights(state.items(), strict=False)
    assert torch.equal(encoder.transformer.final_layer_norm.bias, torch.zeros(32))
    with pytest.raises(ValueError, match=r"meta device\): final_layer_norm.bias"):
        ClipTextEncoder(TINY_CLIP_L, device="meta").load_weights(state.items(), strict=False)


def test_meta_built_encoder_takes_the_loaded_tensors_without_copying(clip_l_reference):
    state = clip_l_reference.state_dict()
    encoder = ClipTextEncoder(TINY_CLIP_L, device="meta")
    assert encoder.transformer.final_layer_norm.weight.is_meta
    encoder.load_weights(state.items())
    token_table = encoder.transformer.embeddings.token_embedding.weight
    assert token_table.data_ptr() == state["embeddings.token_embedding.weight"].data_ptr()
    assert torch.equal(encoder.transformer.embeddings.position_ids, torch.arange(77)[None])
    assert_close(encoder.encode_tokens([CAT_SD1])[0], reference_run(clip_l_reference, CAT_SD1).last_hidden_state)


def test_half_precision_encoder_casts_loaded_weights_and_returns_float32(clip_l_reference):
    encoder = ClipTextEncoder(TINY_CLIP_L, dtype=torch.bfloat16)
    encoder.load_weights(clip_l_reference.state_dict().items())
    assert encoder.transformer.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    cond, _ = encoder.encode_tokens([CAT_SD1])
    reference = reference_run(clip_l_reference, CAT_SD1).last_hidden_state
    assert cond.dtype == torch.float32
    assert (cond - reference).abs().max() / reference.abs().max() < 5e-2


def test_config_from_tiny_state_dict_reads_widths_depth_and_projection(openclip_reference):
    config = text_encoder_config_from_state_dict(openclip_reference.state_dict(), base=SD2_OPENCLIP_H, num_heads=4)
    assert config == TINY_OPENCLIP_H


def _shapes(config):
    return {k: v.shape for k, v in ClipTextEncoder(config, device="meta").state_dict().items()}


def test_config_from_real_clip_l_shapes_is_the_sd1_preset():
    shapes = {"text_model." + k.removeprefix("transformer."): v for k, v in _shapes(SD1_CLIP_L).items()}
    assert text_encoder_config_from_state_dict(shapes, base=SD1_CLIP_L) == SD1_CLIP_L


def test_config_from_real_open_clip_shapes_is_the_sd2_preset():
    meta = ClipTextEncoder(SD2_OPENCLIP_H, device="meta").state_dict()
    open_clip_shapes = {k: v.shape for k, v in transformers_to_open_clip(
        {k.removeprefix("transformer."): v for k, v in meta.items()}).items()}
    assert open_clip_shapes["text_projection"] == (1024, 1024)
    assert text_encoder_config_from_state_dict(open_clip_shapes, base=SD2_OPENCLIP_H) == SD2_OPENCLIP_H


def test_config_from_state_dict_needs_explicit_heads_for_widths_not_a_multiple_of_64(clip_l_reference):
    with pytest.raises(ValueError, match="width 32"):
        text_encoder_config_from_state_dict(clip_l_reference.state_dict(), base=SD1_CLIP_L)


class OpenClipBlock(nn.Module):
    """open_clip's residual attention block: fused-qkv MultiheadAttention, ln_1/ln_2, c_fc/c_proj MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(mlp_width, width))
        )

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipTextTower(nn.Module):
    """An open_clip-named text tower written independently of transformers: the oracle for the key map."""

    def __init__(self, width=32, heads=4, layers=3, mlp_width=64, projection=24, vocab=49408, positions=77):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(positions, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(OpenClipBlock(width, heads, mlp_width) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, projection))
        self.logit_scale = nn.Parameter(torch.tensor(4.6055))
        self.register_buffer("attn_mask", torch.full((positions, positions), float("-inf")).triu(1))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        states = []
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask)
            states.append(x)
        eos = (ids == EOS).int().argmax(dim=-1)
        pooled = self.ln_final(x)[torch.arange(ids.shape[0]), eos] @ self.text_projection
        return states, pooled


@pytest.fixture(scope="module")
def open_clip_tower() -> OpenClipTextTower:
    return randomize(OpenClipTextTower(), seed=4)


@pytest.fixture(scope="module")
def converted(open_clip_tower) -> ClipTextEncoder:
    encoder = ClipTextEncoder(TINY_OPENCLIP_H)
    encoder.load_weights(open_clip_to_transformers(open_clip_tower.state_dict().items()))
    return encoder


@pytest.mark.parametrize("layer", [-1, -2, -3])
def test_converted_open_clip_tower_matches_the_oracle_at_each_layer(open_clip_tower, converted, layer):
    states, _ = open_clip_tower(torch.tensor([CAT_SD2]))
    hidden, _ = converted.encode_tokens([CAT_SD2], layer=layer)
    with torch.no_grad():
        assert_close(hidden, open_clip_tower.ln_final(states[layer]))


def test_converted_open_clip_tower_matches_the_oracle_pooled_projection(open_clip_tower, converted):
    _, expected = open_clip_tower(torch.tensor([CAT_SD2]))
    _, pooled = converted.encode_tokens([CAT_SD2])
    assert_close(pooled, expected)


def test_open_clip_mapping_splits_in_proj_into_q_k_v_thirds(open_clip_tower):
    mapped = dict(open_clip_to_transformers(open_clip_tower.state_dict().items()))
    fused = open_clip_tower.transformer.resblocks[1].attn.in_proj_weight
    assert torch.equal(mapped["encoder.layers.1.self_attn.q_proj.weight"], fused[:32])
    assert torch.equal(mapped["encoder.layers.1.self_attn.k_proj.weight"], fused[32:64])
    assert torch.equal(mapped["encoder.layers.1.self_attn.v_proj.weight"], fused[64:])
    assert torch.equal(mapped["text_projection.weight"], open_clip_tower.text_projection.t())
    assert "logit_scale" not in mapped and "attn_mask" not in mapped


def test_transformers_to_open_clip_inverts_the_mapping(open_clip_tower):
    original = {k: v for k, v in open_clip_tower.state_dict().items() if k not in ("logit_scale", "attn_mask")}
    round_trip = transformers_to_open_clip(dict(open_clip_to_transformers(original.items())))
    assert sorted(round_trip) == sorted(original)
    assert all(torch.equal(round_trip[k], original[k]) for k in original)


def test_transformers_to_open_clip_refuses_an_incomplete_qkv_triple(open_clip_tower):
    mapped = dict(open_clip_to_transformers(open_clip_tower.state_dict().items()))
    del mapped["encoder.layers.2.self_attn.v_proj.bias"]
    with pytest.raises(ValueError, match=r"encoder.layers.2 has no self_attn.v_proj.bias"):
        transformers_to_open_clip(mapped)


VECTORS = torch.arange(64.0).reshape(2, 32)


@pytest.mark.parametrize(
    ("file_name", "content", "key"),
    [
        ("a1111.pt", {"string_to_token": {"*": 265}, "string_to_param": {"*": VECTORS}, "name": "x", "step": 9}, None),
        ("a1111.safetensors", {"emb_params": VECTORS}, None),
        ("learned_embeds.bin", {"<cat-toy>": VECTORS}, None),
        ("sdxl.safetensors", {"clip_g": torch.zeros(2, 1280), "clip_l": VECTORS}, "clip_l"),
    ],
)
def test_textual_inversion_files_give_their_vectors(tmp_path, file_name, content, key):
    path = tmp_path / file_name
    if file_name.endswith(".safetensors"):
        safetensors.torch.save_file(content, path)
    else:
        torch.save(content, path)
    assert torch.equal(load_textual_inversion(path, key=key), VECTORS)


def test_single_vector_embedding_becomes_one_row(tmp_path):
    torch.save({"<token>": VECTORS[0]}, tmp_path / "one.bin")
    assert load_textual_inversion(tmp_path / "one.bin").shape == (1, 32)


class NotATensor:
    """A class that only unpickling with code execution could rebuild."""


def test_embedding_pickle_that_needs_code_is_refused_naming_the_global(tmp_path):
    torch.save({"string_to_param": {"*": NotATensor()}}, tmp_path / "evil.pt")
    path = tmp_path / "evil.pt"
    with pytest.raises(ValueError) as error:
        load_textual_inversion(path)
    # The global that blocked it, and not torch's advice to retry with weights_only=False (running the code).
    assert str(error.value) == (f"{path}: not an embedding file that can be read safely "
                                f"(unsafe or unsupported checkpoint: {path} wants {__name__}.NotATensor)")


def test_folder_lookup_tries_extensions_and_subfolders_but_never_leaves_the_folder(tmp_path):
    folder = tmp_path / "embeddings"
    (folder / "styles").mkdir(parents=True)
    safetensors.torch.save_file({"emb_params": VECTORS}, folder / "style.safetensors")
    torch.save({"<x>": VECTORS[:1]}, folder / "styles" / "nested.pt")
    safetensors.torch.save_file({"emb_params": VECTORS}, tmp_path / "outside.safetensors")
    lookup = embedding_folder_lookup([folder])
    assert torch.equal(lookup("style"), VECTORS)
    assert torch.equal(lookup("style.safetensors"), VECTORS)
    assert torch.equal(lookup("nested"), VECTORS[:1])
    assert lookup("../outside") is None
    assert lookup("missing") is None


@pytest.mark.parametrize(("layer", "missing", "block"), [
    (-1, 0, 2), (-3, 0, 0), (-9, 0, 2),  # counted from the end; beyond the start falls back to the last
    (-2, 1, 2), (-4, 1, 0),  # a tower missing its final block counts from the original tower
    (-1, 1, 2),  # the dropped block itself: the nearest block the tower keeps
])
def test_clip_layers_resolve_to_blocks_of_the_original_tower(layer, missing, block):
    assert resolve_layer(layer, 3, missing) == block
