"""Conditioning nodes: what CLIPTextEncode produces, embeddings from the model folders, and the extras every
other node writes, as diffusion.sampling.guidance reads them."""
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.sampling.guidance import Condition
from nodes.conditioning import (CLIPTextEncode, ConditioningAverage, ConditioningCombine, ConditioningConcat,
                                ConditioningSetArea, ConditioningSetAreaPercentage, ConditioningSetMask,
                                ConditioningSetTimestepRange, ConditioningZeroOut)


def _cond(tokens, value, width=2, pooled=None):
    extras = {} if pooled is None else {"pooled_output": torch.full((1, width), float(pooled))}
    return [[torch.full((1, tokens, width), float(value)), extras]]


@pytest.fixture
def bare_clip(sd1_handles):
    """The checkpoint's CLIP without the loader's embeddings lookup: CLIPTextEncode must supply one."""
    clip = sd1_handles[1]
    return replace(clip, text=clip.text.with_embeddings(None))


@pytest.fixture
def style_embedding(fresh_settings):
    folder = fresh_settings.models_dir / "embeddings"
    folder.mkdir(parents=True)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    save_file({"emb_params": vectors}, str(folder / "style.safetensors"))
    return vectors


def test_clip_text_encode_gives_one_entry_with_the_pooled_output(sd1_handles, node_settings, make_context):
    (conditioning,) = CLIPTextEncode("a red chair", sd1_handles[1], context=make_context(node_settings))
    assert len(conditioning) == 1
    cond, extras = conditioning[0]
    assert cond.shape == (1, 77, 32) and cond.dtype == torch.float32
    assert set(extras) == {"pooled_output"} and extras["pooled_output"].shape == (1, 32)
    expected, pooled = sd1_handles[1].encode("a red chair")
    assert torch.equal(cond, expected) and torch.equal(extras["pooled_output"], pooled)


def test_clip_text_encode_finds_embeddings_in_the_models_folder(bare_clip, fresh_settings, make_context,
                                                                 style_embedding):
    context = make_context(fresh_settings)
    (with_style,) = CLIPTextEncode("a cat embedding:style", bare_clip, context=context)
    lookup = {"style": style_embedding}.get
    expected, _ = bare_clip.text.with_embeddings(lookup).encode("a cat embedding:style")
    assert torch.equal(with_style[0][0], expected)
    (plain,) = CLIPTextEncode("a cat", bare_clip, context=context)
    assert (with_style[0][0] - plain[0][0]).abs().max() > 1e-3


def test_an_unknown_embedding_is_a_warning_and_is_left_out(bare_clip, fresh_settings, make_context, caplog):
    context = make_context(fresh_settings)
    with caplog.at_level(logging.WARNING):
        (missing,) = CLIPTextEncode("a cat embedding:nowhere", bare_clip, context=context)
    (plain,) = CLIPTextEncode("a cat", bare_clip, context=context)
    assert "embedding:nowhere does not exist" in caplog.text
    assert torch.equal(missing[0][0], plain[0][0])


def test_clip_text_encode_cache_key_follows_the_embedding_files(fresh_settings, style_embedding):
    fingerprint = CLIPTextEncode.fingerprint
    assert fingerprint({"text": "a cat"}, fresh_settings) is None
    before = fingerprint({"text": "embedding:style"}, fresh_settings)
    save_file({"emb_params": torch.zeros(3, 32)}, str(fresh_settings.models_dir / "embeddings" / "style.safetensors"))
    assert fingerprint({"text": "embedding:style"}, fresh_settings) != before


def test_clip_text_encode_cache_key_skips_a_dangling_link(fresh_settings, style_embedding):
    folder = fresh_settings.models_dir / "embeddings"
    (folder / "gone.safetensors").symlink_to(folder / "deleted.safetensors")
    state = CLIPTextEncode.fingerprint({"text": "embedding:style"}, fresh_settings)
    assert [Path(entry[0]).name for entry in state] == ["style.safetensors"]


def test_clip_text_encode_refuses_a_missing_clip(node_settings, make_context):
    with pytest.raises(ValueError, match="clip: the input is not a text encoder"):
        CLIPTextEncode("a cat", None, context=make_context(node_settings))


def test_combine_lists_both_conditionings_in_order():
    first, second = _cond(77, 1.0), _cond(77, 2.0) + _cond(154, 3.0)
    (combined,) = ConditioningCombine(first, second)
    assert [entry[0] for entry in combined] == [first[0][0], second[0][0], second[1][0]]


def test_average_mixes_tokens_and_zero_pads_a_shorter_from():
    (averaged,) = ConditioningAverage(_cond(3, 1.0, pooled=1.0), _cond(2, 3.0, pooled=5.0), 0.25)
    cond, extras = averaged[0]
    # tokens 0-1: 0.25 * 1 + 0.75 * 3; token 2: conditioning_from has none, so 0.25 * 1 + 0.75 * 0
    assert cond[0, :, 0].tolist() == [2.5, 2.5, 0.25]
    assert extras["pooled_output"].flatten().tolist() == [4.0, 4.0]  # 0.25 * 1 + 0.75 * 5


def test_average_cuts_a_longer_from_and_takes_its_pooled_output_when_to_has_none():
    (averaged,) = ConditioningAverage(_cond(2, 1.0), _cond(4, 3.0, pooled=5.0), 0.5)
    assert averaged[0][0].shape == (1, 2, 2) and averaged[0][0][0, :, 0].tolist() == [2.0, 2.0]
    assert averaged[0][1]["pooled_output"].flatten().tolist() == [5.0, 5.0]


def test_average_warns_that_only_the_first_from_entry_counts(caplog):
    with caplog.at_level(logging.WARNING):
        ConditioningAverage(_cond(2, 1.0), _cond(2, 3.0) + _cond(2, 9.0), 0.5)
    assert "conditioning_from has 2 entries; only the first is used" in caplog.text


def test_average_refuses_an_empty_conditioning_from():
    with pytest.raises(ValueError, match="conditioning_from: expected a non-empty CONDITIONING list"):
        ConditioningAverage(_cond(2, 1.0), [], 0.5)


def test_concat_appends_from_tokens_and_copies_the_extras():
    to = _cond(77, 1.0, pooled=1.0)
    (joined,) = ConditioningConcat(to, _cond(77, 2.0))
    cond, extras = joined[0]
    assert cond.shape == (1, 154, 2) and cond[0, 76, 0] == 1.0 and cond[0, 77, 0] == 2.0
    assert extras == {"pooled_output": to[0][1]["pooled_output"]} and extras is not to[0][1]


def test_concat_refuses_prompts_of_different_widths():
    with pytest.raises(ValueError, match="conditioning_from: width 4 does not match conditioning_to's 2"):
        ConditioningConcat(_cond(77, 1.0), _cond(77, 1.0, width=4))


def test_set_area_stores_latent_pixels_as_guidance_reads_them():
    source = _cond(77, 1.0)
    (area,) = ConditioningSetArea(source, 200, 104, 24, 16, 0.7)
    condition = Condition.from_comfy(area[0])
    assert condition.area == (13, 25, 2, 3)  # (h // 8, w // 8, y // 8, x // 8)
    assert condition.strength == 0.7 and condition.set_area_to_bounds is False
    assert source[0][1] == {}  # the upstream entry is untouched


def test_set_area_percentage_stores_fractions():
    (area,) = ConditioningSetAreaPercentage(_cond(77, 1.0), 0.5, 0.25, 0.1, 0.2, 1.5)
    assert area[0][1]["area"] == ("percentage", 0.25, 0.5, 0.2, 0.1)
    assert Condition.from_comfy(area[0]).strength == 1.5


def test_set_mask_adds_a_batch_axis_and_reads_mask_bounds():
    mask = torch.zeros(64, 64)
    (masked,) = ConditioningSetMask(_cond(77, 1.0), mask, 0.8, "mask bounds")
    condition = Condition.from_comfy(masked[0])
    assert condition.mask.shape == (1, 64, 64)
    assert condition.mask_strength == 0.8 and condition.set_area_to_bounds is True
    (plain,) = ConditioningSetMask(_cond(77, 1.0), mask, 1.0, "default")
    assert plain[0][1]["set_area_to_bounds"] is False


def test_timestep_range_is_a_fraction_of_the_run():
    (ranged,) = ConditioningSetTimestepRange(_cond(77, 1.0), 0.2, 0.6)
    condition = Condition.from_comfy(ranged[0])
    assert (condition.start_percent, condition.end_percent) == (0.2, 0.6)


def test_zero_out_zeroes_embeddings_and_pooled_output_keeping_shapes():
    (zeroed,) = ConditioningZeroOut(_cond(154, 3.0, pooled=2.0) + _cond(77, 1.0))
    assert zeroed[0][0].shape == (1, 154, 2) and not zeroed[0][0].any()
    assert zeroed[0][1]["pooled_output"].shape == (1, 2) and not zeroed[0][1]["pooled_output"].any()
    assert zeroed[1][1] == {}


def test_conditioning_schemas_match_comfyui():
    assert ConditioningSetArea.object_info()["input"]["required"]["width"] == [
        "INT", {"default": 64, "min": 64, "max": 16384, "step": 8}]
    assert ConditioningSetMask.object_info()["input_order"]["required"] == [
        "conditioning", "mask", "strength", "set_cond_area"]
    assert ConditioningAverage.object_info()["input_order"]["required"] == [
        "conditioning_to", "conditioning_from", "conditioning_to_strength"]
    assert CLIPTextEncode.object_info()["input"]["required"]["text"][1] == {
        "default": "", "multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}
    assert ConditioningZeroOut.category == ConditioningSetTimestepRange.category == "advanced/conditioning"
