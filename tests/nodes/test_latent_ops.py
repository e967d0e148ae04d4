"""Latent arithmetic, transforms, batching and .latent files against hand-computed values."""
import json
import math

import pytest
import safetensors.torch
import torch

import cli
from engine import Executor
from nodes.latent_ops import (LatentAdd, LatentBatch, LatentBatchSeedBehavior, LatentBlend, LatentCrop, LatentFlip,
                              LatentInterpolate, LatentMultiply, LatentRotate, LatentSubtract, LoadLatent,
                              SaveLatent, fit_to)

GRID = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [1, 1, 2, 2]


def _latent(samples, **extra):
    return {"samples": samples, **extra}


def _numbered(batch, height, width, channels=1):
    return torch.arange(batch * channels * height * width, dtype=torch.float32).reshape(batch, channels, height,
                                                                                        width)


# --- arithmetic -------------------------------------------------------------------------------------------

def test_latent_add_sums_elementwise_and_keeps_samples1s_extras():
    first = _latent(GRID, batch_index=[5])
    (summed,) = LatentAdd(first, _latent(torch.full((1, 1, 2, 2), 10.0)))
    assert torch.equal(summed["samples"], torch.tensor([[[[11.0, 12.0], [13.0, 14.0]]]]))
    assert summed["batch_index"] == [5]
    assert torch.equal(first["samples"], GRID) and set(first) == {"samples", "batch_index"}


def test_latent_subtract_takes_samples2_from_samples1():
    (difference,) = LatentSubtract(_latent(GRID), _latent(torch.ones(1, 1, 2, 2)))
    assert torch.equal(difference["samples"], torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]))


def test_latent_add_repeats_a_single_samples2_over_the_batch():
    (summed,) = LatentAdd(_latent(torch.zeros(3, 1, 2, 2)), _latent(GRID))
    assert torch.equal(summed["samples"], GRID.repeat(3, 1, 1, 1))


def test_latent_add_resizes_samples2_to_samples1s_size():
    # A constant latent stays that constant whatever the bilinear resize does.
    (summed,) = LatentAdd(_latent(torch.zeros(1, 1, 4, 6)), _latent(torch.full((1, 1, 2, 2), 7.0)))
    assert torch.equal(summed["samples"], torch.full((1, 1, 4, 6), 7.0))


def test_latents_with_different_channel_counts_are_refused_naming_samples2():
    with pytest.raises(ValueError, match=r"samples2: 16-channel latents .* samples1's 4 channels"):
        LatentAdd(_latent(torch.zeros(1, 4, 2, 2)), _latent(torch.zeros(1, 16, 2, 2)))


def test_fit_to_cuts_a_longer_batch_to_the_reference_as_comfyui_does():
    fitted = fit_to(torch.zeros(2, 1, 1, 1), _numbered(3, 1, 1), "samples2", "samples1")
    assert fitted.flatten().tolist() == [0.0, 1.0]


def test_latent_multiply_scales_every_value():
    (scaled,) = LatentMultiply(_latent(GRID, noise_mask=torch.ones(1, 1, 2, 2)), -0.5)
    assert torch.equal(scaled["samples"], torch.tensor([[[[-0.5, -1.0], [-1.5, -2.0]]]]))
    assert "noise_mask" in scaled


def test_latent_multiply_schema_is_comfyuis():
    info = LatentMultiply.object_info()
    assert info["input"]["required"]["multiplier"] == ["FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0,
                                                                 "step": 0.01}]
    assert info["category"] == "latent/advanced"


def test_latent_interpolate_mixes_directions_and_lengths_separately():
    # Channel vectors (3, 0) and (0, 1) half way: direction (1, 1)/sqrt(2), length (3 + 1) / 2 = 2.
    first = torch.tensor([3.0, 0.0]).reshape(1, 2, 1, 1)
    second = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    (mixed,) = LatentInterpolate(_latent(first), _latent(second), 0.5)
    torch.testing.assert_close(mixed["samples"].flatten(), torch.tensor([math.sqrt(2.0), math.sqrt(2.0)]))


def test_latent_interpolate_ratio_one_is_samples1_for_every_item_of_a_batch():
    first, second = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    (mixed,) = LatentInterpolate(_latent(first), _latent(second), 1.0)
    torch.testing.assert_close(mixed["samples"], first)


def test_latent_interpolate_of_zero_vectors_is_zero_not_nan():
    (mixed,) = LatentInterpolate(_latent(torch.zeros(1, 2, 1, 1)), _latent(torch.zeros(1, 2, 1, 1)), 0.3)
    assert torch.equal(mixed["samples"], torch.zeros(1, 2, 1, 1))


def test_latent_blend_weights_samples1_by_blend_factor():
    (blended,) = LatentBlend(_latent(torch.full((2, 1, 2, 2), 10.0)), _latent(torch.full((1, 1, 2, 2), 20.0)), 0.25)
    assert torch.equal(blended["samples"], torch.full((2, 1, 2, 2), 17.5))


def test_latent_blend_refuses_a_batch_it_cannot_line_up():
    with pytest.raises(ValueError, match="samples2: a batch of 2 cannot be blended into samples1's batch of 3"):
        LatentBlend(_latent(torch.zeros(3, 1, 2, 2)), _latent(torch.zeros(2, 1, 2, 2)), 0.5)


def test_latent_blend_schema_has_no_blend_mode_input_as_comfyuis():
    info = LatentBlend.object_info()
    assert info["input_order"]["required"] == ["samples1", "samples2", "blend_factor"]
    assert info["category"] == "_for_testing"


# --- transforms -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rotation, expected", [
    ("none", [[1.0, 2.0], [3.0, 4.0]]),
    ("90 degrees", [[3.0, 1.0], [4.0, 2.0]]),
    ("180 degrees", [[4.0, 3.0], [2.0, 1.0]]),
    ("270 degrees", [[2.0, 4.0], [1.0, 3.0]]),
])
def test_latent_rotate_turns_clockwise(rotation, expected):
    (rotated,) = LatentRotate(_latent(GRID), rotation)
    assert rotated["samples"][0, 0].tolist() == expected


def test_latent_rotate_turns_a_wide_latent_tall_and_its_noise_mask_with_it():
    mask = torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])  # top-left corner masked
    (rotated,) = LatentRotate(_latent(torch.zeros(1, 4, 2, 4), noise_mask=mask), "90 degrees")
    assert rotated["samples"].shape == (1, 4, 4, 2)
    assert rotated["noise_mask"][0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("method, expected", [
    ("x-axis: vertically", [[3.0, 4.0], [1.0, 2.0]]),
    ("y-axis: horizontally", [[2.0, 1.0], [4.0, 3.0]]),
])
def test_latent_flip_mirrors_about_the_named_axis(method, expected):
    latent = _latent(GRID)
    (flipped,) = LatentFlip(latent, method)
    assert flipped["samples"][0, 0].tolist() == expected
    assert torch.equal(latent["samples"], GRID)


def test_latent_crop_counts_in_pixels():
    # 16x16 latent; x=16, y=8 pixels -> column 2, row 1; 64x32 pixels -> 8 wide, 4 tall.
    samples = _numbered(1, 16, 16)
    (cropped,) = LatentCrop(_latent(samples), 64, 32, 16, 8)
    assert torch.equal(cropped["samples"], samples[:, :, 1:5, 2:10])


def test_latent_crop_keeps_its_corner_8_latent_pixels_from_the_far_edge():
    samples = _numbered(1, 10, 12)
    (cropped,) = LatentCrop(_latent(samples), 512, 512, 4000, 4000)
    assert torch.equal(cropped["samples"], samples[:, :, 2:, 4:])


def test_latent_crop_crops_a_pixel_sized_noise_mask_to_the_same_region():
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 8:40, 16:80] = 1.0  # exactly the cropped region, in pixels
    (cropped,) = LatentCrop(_latent(torch.zeros(1, 4, 16, 16), noise_mask=mask), 64, 32, 16, 8)
    assert cropped["noise_mask"].shape == (1, 1, 32, 64)
    assert bool(cropped["noise_mask"].all())


# --- batches ----------------------------------------------------------------------------------------------

def test_latent_batch_puts_samples2_after_samples1_with_their_positions():
    first = _latent(torch.zeros(2, 1, 2, 2))
    second = _latent(torch.ones(1, 1, 2, 2), batch_index=[7])
    (batched,) = LatentBatch(first, second)
    assert batched["samples"][:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert batched["batch_index"] == [0, 1, 7]


def test_latent_batch_resizes_samples2_to_samples1():
    (batched,) = LatentBatch(_latent(torch.zeros(1, 4, 8, 8)), _latent(torch.full((2, 4, 4, 4), 3.0)))
    assert batched["samples"].shape == (3, 4, 8, 8)
    assert torch.equal(batched["samples"][1:], torch.full((2, 4, 8, 8), 3.0))


def test_latent_batch_gives_each_half_its_own_noise_mask():
    mask = torch.zeros(1, 1, 16, 16)
    (batched,) = LatentBatch(_latent(torch.zeros(2, 4, 2, 2), noise_mask=mask), _latent(torch.zeros(1, 4, 2, 2)))
    assert batched["noise_mask"].shape == (3, 1, 16, 16)
    assert batched["noise_mask"].flatten(1).mean(1).tolist() == [0.0, 0.0, 1.0]


def test_latent_batch_refuses_latents_of_other_channels():
    with pytest.raises(ValueError, match="samples2: 16-channel"):
        LatentBatch(_latent(torch.zeros(1, 4, 2, 2)), _latent(torch.zeros(1, 16, 2, 2)))


def test_seed_behavior_fixed_gives_every_latent_the_first_position():
    (fixed,) = LatentBatchSeedBehavior(_latent(torch.zeros(3, 4, 2, 2), batch_index=[4, 5, 6]), "fixed")
    assert fixed["batch_index"] == [4, 4, 4]
    (plain,) = LatentBatchSeedBehavior(_latent(torch.zeros(2, 4, 2, 2)), "fixed")
    assert plain["batch_index"] == [0, 0]


def test_seed_behavior_random_drops_the_batch_index():
    latent = _latent(torch.zeros(2, 4, 2, 2), batch_index=[3, 3])
    (random,) = LatentBatchSeedBehavior(latent, "random")
    assert "batch_index" not in random and latent["batch_index"] == [3, 3]


def test_seed_behavior_defaults_to_fixed():
    assert LatentBatchSeedBehavior.object_info()["input"]["required"]["seed_behavior"] == [
        ["random", "fixed"], {"default": "fixed"}]


# --- files ------------------------------------------------------------------------------------------------

def test_save_latent_writes_comfyuis_keys_and_counts_up(fresh_settings, make_context):
    samples = torch.randn(2, 4, 3, 5)
    context = make_context(fresh_settings)
    first = SaveLatent(_latent(samples), "latents/ComfyUI", {"1": {}}, {"workflow": {"nodes": []}}, context=context)
    second = SaveLatent(_latent(samples), "latents/ComfyUI", None, None, context=context)
    assert first.ui == {"latents": [{"filename": "ComfyUI_00001_.latent", "subfolder": "latents", "type": "output"}]}
    assert second.ui["latents"][0]["filename"] == "ComfyUI_00002_.latent"
    path = fresh_settings.output_dir / "latents" / "ComfyUI_00001_.latent"
    tensors = safetensors.torch.load_file(path)
    assert set(tensors) == {"latent_tensor", "latent_format_version_0"}
    assert torch.equal(tensors["latent_tensor"], samples)
    with safetensors.safe_open(path, "pt") as handle:
        assert json.loads(handle.metadata()["workflow"]) == {"nodes": []}


def test_save_latent_refuses_a_prefix_that_leaves_the_output_folder(fresh_settings, make_context):
    with pytest.raises(ValueError, match=r"filename_prefix: .*'\.\.'"):
        SaveLatent(_latent(GRID), "../escape", None, None, context=make_context(fresh_settings))
    assert not list(fresh_settings.output_dir.parent.glob("escape*"))
    assert SaveLatent.validate({"filename_prefix": "a/../../b"}) is not None


def test_load_latent_undoes_the_old_formats_scaling(fresh_settings, make_context):
    safetensors.torch.save_file({"latent_tensor": torch.full((1, 4, 2, 2), 0.18215)},
                                fresh_settings.input_dir / "old.latent")
    (latent,) = LoadLatent("old.latent", context=make_context(fresh_settings))
    torch.testing.assert_close(latent["samples"], torch.ones(1, 4, 2, 2))


def test_load_latent_names_a_file_without_a_latent_tensor(fresh_settings, make_context):
    safetensors.torch.save_file({"other": torch.zeros(1)}, fresh_settings.input_dir / "wrong.latent")
    with pytest.raises(ValueError, match="latent: 'wrong.latent' holds no 'latent_tensor'"):
        LoadLatent("wrong.latent", context=make_context(fresh_settings))


def test_load_latent_refuses_a_file_that_is_not_safetensors(fresh_settings, make_context):
    (fresh_settings.input_dir / "pickle.latent").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="latent: 'pickle.latent' cannot be read as a .latent"):
        LoadLatent("pickle.latent", context=make_context(fresh_settings))


def test_load_latent_lists_only_latent_files(fresh_settings):
    (fresh_settings.input_dir / "a.latent").write_bytes(b"")
    (fresh_settings.input_dir / "b.png").write_bytes(b"")
    options = LoadLatent.object_info(fresh_settings)["input"]["required"]["latent"][0]
    assert options == ["a.latent"]


def test_saved_latent_loads_back_through_the_executor(fresh_settings):
    values = torch.arange(2 * 4 * 3 * 5, dtype=torch.float32).reshape(2, 4, 3, 5) / 7
    safetensors.torch.save_file({"latent_tensor": values, "latent_format_version_0": torch.tensor([])},
                                fresh_settings.input_dir / "start.latent")
    executor = Executor(cli.load_registry([]), settings=fresh_settings)
    doubled = executor.execute({
        "1": {"class_type": "LoadLatent", "inputs": {"latent": "start.latent"}},
        "2": {"class_type": "LatentMultiply", "inputs": {"samples": ["1", 0], "multiplier": 2.0}},
        "3": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 0], "filename_prefix": "round/trip"}}})
    assert doubled.status == "success", doubled.error
    entry = doubled.outputs["3"]["latents"][0]
    assert (entry["subfolder"], entry["filename"]) == ("round", "trip_00001_.latent")
    written = fresh_settings.output_dir / "round" / "trip_00001_.latent"
    (fresh_settings.input_dir / "trip.latent").write_bytes(written.read_bytes())
    resaved = executor.execute({
        "1": {"class_type": "LoadLatent", "inputs": {"latent": "trip.latent"}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "again"}}})
    assert resaved.status == "success", resaved.error
    again = safetensors.torch.load_file(fresh_settings.output_dir / "again_00001_.latent")
    assert torch.equal(again["latent_tensor"], values * 2)


def test_save_latent_counts_past_every_file_of_its_prefix(fresh_settings, make_context):
    folder = fresh_settings.output_dir
    (folder / "clash_00001_.png").write_bytes(b"image")
    (folder / "clash_00002_.latent").write_bytes(b"kept")
    result = SaveLatent(_latent(GRID), "clash", None, None, context=make_context(fresh_settings))
    assert result.ui["latents"][0]["filename"] == "clash_00003_.latent"


def test_save_latent_skips_a_name_taken_since_the_count_and_never_overwrites(fresh_settings, make_context,
                                                                           monkeypatch):
    monkeypatch.setattr("nodes.latent_ops.next_file_counter", lambda folder, filename: 1)
    (fresh_settings.output_dir / "race_00001_.latent").write_bytes(b"kept")
    result = SaveLatent(_latent(GRID), "race", None, None, context=make_context(fresh_settings))
    assert result.ui["latents"][0]["filename"] == "race_00002_.latent"
    assert (fresh_settings.output_dir / "race_00001_.latent").read_bytes() == b"kept"


def test_a_prompt_saving_latents_outside_the_output_folder_is_invalid_before_anything_runs(fresh_settings):
    executor = Executor(cli.load_registry([]), settings=fresh_settings)
    result = executor.execute({
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "../../etc/x"}}})
    assert result.status == "invalid" and result.executed == ()
    assert "filename_prefix" in json.dumps(result.validation.node_errors["2"].to_json())
