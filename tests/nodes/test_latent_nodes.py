"""Latent nodes against hand-computed values: empty latents, upscales, batch slicing, composites, noise masks."""
import math

import pytest
import torch

from nodes.latent import (EmptyLatentImage, LatentComposite, LatentFromBatch, LatentUpscale, LatentUpscaleBy,
                          RepeatLatentBatch, SetLatentNoiseMask, bislerp, feather_ramp, upscale_samples)


def _numbered(batch, height, width, channels=1):
    """A latent whose every value is its own flat index: shows exactly where each value went."""
    return torch.arange(batch * channels * height * width, dtype=torch.float32).reshape(batch, channels, height,
                                                                                        width)


def test_empty_latent_is_four_channel_float32_zeros_at_an_eighth_of_the_size():
    (latent,) = EmptyLatentImage(520, 136, 3)
    samples = latent["samples"]
    assert samples.shape == (3, 4, 17, 65)
    assert samples.dtype == torch.float32 and samples.device.type == "cpu"
    assert not samples.any() and set(latent) == {"samples"}


def test_empty_latent_schema_is_comfyuis():
    info = EmptyLatentImage.object_info()
    assert info["input_order"]["required"] == ["width", "height", "batch_size"]
    assert info["input"]["required"]["width"][1] == {"default": 512, "min": 16, "max": 16384, "step": 8,
                                                     "tooltip": "The width of the latent images in pixels."}
    assert info["output"] == ["LATENT"] and info["output_name"] == ["LATENT"]


def test_nearest_exact_doubling_repeats_each_value_in_a_2x2_block():
    samples = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], dtype=torch.float32)
    assert torch.equal(upscale_samples(samples, 4, 4, "nearest-exact")[0, 0], expected)


def test_bilinear_upscale_samples_at_half_pixel_centres():
    # Output x at (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to the input: 0, 0.25, 0.75, 1.
    resized = upscale_samples(torch.tensor([[[[0.0, 1.0]]]]), 4, 1, "bilinear")
    torch.testing.assert_close(resized[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_area_downscale_averages_blocks():
    resized = upscale_samples(_numbered(1, 2, 4), 2, 1, "area")
    torch.testing.assert_close(resized[0, 0, 0], torch.tensor([(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4]))


def test_bislerp_turns_between_vectors_and_interpolates_their_length():
    # Channel vectors (1, 0) and (0, 3): a quarter of the way is 22.5 degrees at length 1.5, not the
    # straight line's (0.75, 0.75) of length 1.06.
    samples = torch.tensor([[[[1.0, 0.0]], [[0.0, 3.0]]]])  # [1, 2, 1, 2]
    resized = bislerp(samples, 4, 1)
    angle = math.radians(22.5)
    torch.testing.assert_close(resized[0, :, 0, 1], 1.5 * torch.tensor([math.cos(angle), math.sin(angle)]))
    torch.testing.assert_close(resized[0, :, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(resized[0, :, 0, 3], torch.tensor([0.0, 3.0]))


def test_bislerp_of_parallel_vectors_keeps_the_first_and_zero_vectors_stay_finite():
    samples = torch.tensor([[[[2.0, 2.0, 0.0]], [[0.0, 0.0, 0.0]]]])  # vectors (2,0), (2,0), (0,0)
    resized = bislerp(samples, 6, 2)
    assert torch.isfinite(resized).all()
    torch.testing.assert_close(resized[0, :, 0, 1], torch.tensor([2.0, 0.0]))
    assert resized.shape == (1, 2, 2, 6)


def test_latent_upscale_counts_in_pixels():
    latent = {"samples": _numbered(1, 4, 4), "batch_index": [3]}
    (resized,) = LatentUpscale(latent, "nearest-exact", 64, 64, "disabled")
    assert resized["samples"].shape == (1, 1, 8, 8)
    assert resized["batch_index"] == [3]


def test_latent_upscale_with_a_zero_side_keeps_the_aspect_ratio():
    (resized,) = LatentUpscale({"samples": torch.zeros(1, 4, 8, 16)}, "bilinear", 0, 128, "disabled")
    assert resized["samples"].shape == (1, 4, 16, 32)


def test_latent_upscale_with_both_sides_zero_returns_the_latent_unchanged():
    latent = {"samples": torch.ones(1, 4, 3, 5)}
    assert LatentUpscale(latent, "bicubic", 0, 0, "disabled")[0] is latent


def test_latent_upscale_center_crop_cuts_the_sides_to_the_new_aspect():
    samples = _numbered(1, 8, 16)
    (resized,) = LatentUpscale({"samples": samples}, "nearest-exact", 64, 64, "center")
    # 16 wide to square: round((16 - 16 * 0.5) / 2) = 4 columns off each side, the middle 8 stay.
    assert torch.equal(resized["samples"], samples[..., 4:12])


def test_latent_upscale_by_rounds_the_scaled_size_and_leaves_the_input_alone():
    samples = torch.rand(2, 4, 5, 7)
    latent = {"samples": samples, "noise_mask": torch.ones(1, 1, 40, 56)}
    (resized,) = LatentUpscaleBy(latent, "bilinear", 1.5)
    assert resized["samples"].shape == (2, 4, 8, 10)  # round(7.5) = 8, round(10.5) = 10
    assert resized["noise_mask"] is latent["noise_mask"]
    assert latent["samples"] is samples and samples.shape == (2, 4, 5, 7)


def test_latent_from_batch_takes_a_slice_and_keeps_its_batch_positions():
    latent = {"samples": _numbered(5, 1, 1), "noise_mask": torch.rand(5, 1, 8, 8)}
    (picked,) = LatentFromBatch(latent, 1, 2)
    assert picked["samples"].flatten().tolist() == [1.0, 2.0]
    assert picked["batch_index"] == [1, 2]
    assert torch.equal(picked["noise_mask"], latent["noise_mask"][1:3])


def test_latent_from_batch_clamps_past_the_end_and_slices_existing_positions():
    latent = {"samples": _numbered(5, 1, 1), "batch_index": [10, 11, 12, 13, 14],
              "noise_mask": torch.rand(1, 1, 8, 8)}
    (picked,) = LatentFromBatch(latent, 3, 4)
    assert picked["samples"].flatten().tolist() == [3.0, 4.0]
    assert picked["batch_index"] == [13, 14]
    assert torch.equal(picked["noise_mask"], latent["noise_mask"])  # one mask serves every item
    (last,) = LatentFromBatch(latent, 60, 1)
    assert last["samples"].flatten().tolist() == [4.0] and last["batch_index"] == [14]


def test_repeat_latent_batch_continues_batch_positions_after_each_copy():
    latent = {"samples": _numbered(2, 1, 1), "batch_index": [3, 4], "noise_mask": torch.rand(2, 1, 4, 4)}
    (repeated,) = RepeatLatentBatch(latent, 3)
    assert repeated["samples"].flatten().tolist() == [0.0, 1.0] * 3
    assert repeated["batch_index"] == [3, 4, 5, 6, 7, 8]
    assert torch.equal(repeated["noise_mask"], latent["noise_mask"].repeat(3, 1, 1, 1))


def test_repeat_latent_batch_without_positions_adds_none():
    (repeated,) = RepeatLatentBatch({"samples": torch.zeros(1, 4, 2, 2)}, 4)
    assert repeated["samples"].shape == (4, 4, 2, 2) and "batch_index" not in repeated


def test_feather_ramp_fades_only_inner_edges():
    assert feather_ramp(4, 2, True, True).tolist() == [0.5, 1.0, 1.0, 0.5]
    assert feather_ramp(4, 2, False, True).tolist() == [1.0, 1.0, 1.0, 0.5]
    assert feather_ramp(5, 4, True, False).tolist() == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_latent_composite_pastes_at_pixel_offsets():
    target = {"samples": torch.zeros(1, 1, 8, 8), "batch_index": [2]}
    (result,) = LatentComposite(target, {"samples": torch.ones(1, 1, 4, 4)}, 16, 8, 0)
    expected = torch.zeros(8, 8)
    expected[1:5, 2:6] = 1.0
    assert torch.equal(result["samples"][0, 0], expected)
    assert result["batch_index"] == [2]
    assert not target["samples"].any()  # the input is not written to


def test_latent_composite_cuts_what_falls_outside_the_target():
    target = {"samples": torch.zeros(1, 1, 8, 8)}
    (result,) = LatentComposite(target, {"samples": torch.ones(1, 1, 4, 4)}, 48, 56, 0)
    assert result["samples"][0, 0].sum() == 2.0 * 1.0  # 2 columns x 1 row left inside
    assert result["samples"][0, 0, 7, 6:].tolist() == [1.0, 1.0]
    (outside,) = LatentComposite(target, {"samples": torch.ones(1, 1, 4, 4)}, 800, 0, 0)
    assert not outside["samples"].any()


def test_latent_composite_feathers_edges_inside_the_target():
    target = {"samples": torch.full((1, 1, 8, 8), 2.0)}
    (result,) = LatentComposite(target, {"samples": torch.ones(1, 1, 4, 4)}, 16, 16, 16)
    ramp = torch.tensor([0.5, 1.0, 1.0, 0.5])
    weight = ramp[:, None] * ramp[None, :]
    torch.testing.assert_close(result["samples"][0, 0, 2:6, 2:6], 1.0 * weight + 2.0 * (1 - weight))
    assert (result["samples"][0, 0, :2] == 2.0).all()


def test_latent_composite_refuses_batches_that_do_not_fit():
    with pytest.raises(ValueError, match="samples_from: a batch of 2 cannot be pasted into a batch of 3"):
        LatentComposite({"samples": torch.zeros(3, 4, 8, 8)}, {"samples": torch.zeros(2, 4, 4, 4)}, 0, 0, 0)


def test_set_latent_noise_mask_stores_a_pixel_mask_as_b1hw():
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    (masked,) = SetLatentNoiseMask(latent, torch.ones(64, 64))
    assert masked["noise_mask"].shape == (1, 1, 64, 64)
    assert "noise_mask" not in latent


def test_set_latent_noise_mask_refuses_a_mask_of_another_aspect():
    with pytest.raises(ValueError, match="mask: the mask is 64x32 but the latent"):
        SetLatentNoiseMask({"samples": torch.zeros(1, 4, 8, 8)}, torch.ones(32, 64))


def test_set_latent_noise_mask_takes_loadimages_empty_mask_for_a_picture_without_alpha():
    (masked,) = SetLatentNoiseMask({"samples": torch.zeros(1, 4, 8, 16)}, torch.zeros(1, 64, 64))
    assert masked["noise_mask"].shape == (1, 1, 64, 64) and not masked["noise_mask"].any()


def test_latent_nodes_refuse_an_empty_batch():
    with pytest.raises(ValueError, match="samples: the latent batch is empty"):
        LatentFromBatch({"samples": torch.zeros(0, 4, 8, 8)}, 0, 1)
