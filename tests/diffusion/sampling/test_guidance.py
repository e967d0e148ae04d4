"""Classifier-free guidance over ComfyUI CONDITIONING: batching, areas, masks, timestep ranges, rescale.

The stand-in network predicts the exact Gaussian eps shifted by gain * mean(context), so a prompt whose
context is filled with `a` predicts D = D_exact - sigma * gain * a.
"""
import math

import pytest
import torch
from gaussian_oracle import GaussianData, GaussianEpsNetwork

from diffusion.sampling.guidance import CFGDenoiser, CondBatcher, Condition, rescale_guidance

GAIN = 0.1
SHAPE = (2, 4, 8, 8)


def _prompt(value: float, tokens: int = 77, **extras):
    return [torch.full((1, tokens, 16), value), extras]


def _guider(sd_sampling, positive, negative, cfg=7.0, rescale=0.0, shape=SHAPE, encode_y=None):
    network = GaussianEpsNetwork(GaussianData(), sd_sampling, context_gain=GAIN)
    conds = [[Condition.from_comfy(c) for c in positive], [Condition.from_comfy(c) for c in negative]]
    batcher = CondBatcher(network, sd_sampling, conds, shape, encode_y)
    return CFGDenoiser(batcher, cfg, rescale), network


@pytest.fixture
def sigma(sd_sampling):
    return float(sd_sampling.sigmas[500])  # a table sigma, so the network's timestep names it exactly


@pytest.fixture
def x():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 2


def test_cfg_combines_cond_and_uncond_from_one_batched_call(sd_sampling, sigma, x):
    guider, network = _guider(sd_sampling, [_prompt(1.0)], [_prompt(0.0)], cfg=7.0)
    out = guider(x, sigma)
    expected = GaussianData().denoise(x, sigma) - 7.0 * sigma * GAIN * 1.0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert network.calls == [((4, 4, 8, 8), (4, 77, 16))]


def test_cfg_of_one_skips_the_uncond_pass(sd_sampling, sigma, x):
    guider, network = _guider(sd_sampling, [_prompt(1.0)], [_prompt(0.0)], cfg=1.0)
    out = guider(x, sigma)
    torch.testing.assert_close(out, GaussianData().denoise(x, sigma) - sigma * GAIN, rtol=1e-5, atol=1e-5)
    assert network.calls == [((2, 4, 8, 8), (2, 77, 16))]


def test_cfg_pp_evaluation_returns_the_uncond_prediction_even_at_cfg_one(sd_sampling, sigma, x):
    guider, network = _guider(sd_sampling, [_prompt(1.0)], [_prompt(0.5)], cfg=1.0)
    guided, uncond = guider.denoise_with_uncond(x, sigma)
    exact = GaussianData().denoise(x, sigma)
    torch.testing.assert_close(guided, exact - sigma * GAIN, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond, exact - sigma * GAIN * 0.5, rtol=1e-5, atol=1e-5)
    assert len(network.calls) == 1


def test_prompts_of_different_lengths_batch_at_their_least_common_multiple(sd_sampling, sigma, x):
    guider, network = _guider(sd_sampling, [_prompt(1.0, tokens=154)], [_prompt(0.0, tokens=77)], cfg=3.0)
    out = guider(x, sigma)
    assert network.calls == [((4, 4, 8, 8), (4, 154, 16))]
    torch.testing.assert_close(out, GaussianData().denoise(x, sigma) - 3.0 * sigma * GAIN, rtol=1e-5, atol=1e-5)


def test_prompts_whose_lengths_differ_more_than_fourfold_run_separately(sd_sampling, sigma, x):
    guider, network = _guider(sd_sampling, [_prompt(1.0, tokens=385)], [_prompt(0.0, tokens=77)], cfg=3.0)
    guider(x, sigma)
    assert sorted(network.calls) == [((2, 4, 8, 8), (2, 77, 16)), ((2, 4, 8, 8), (2, 385, 16))]


def test_area_prediction_is_feathered_and_averaged_with_the_full_prompt(sd_sampling):
    shape = (1, 4, 24, 24)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2
    sigma = float(sd_sampling.sigmas[500])
    area = _prompt(1.0, area=(16, 12, 4, 8), strength=1.0)
    guider, network = _guider(sd_sampling, [_prompt(0.0), area], [_prompt(0.0)], cfg=1.0, shape=shape)
    out = guider(x, sigma)
    exact = GaussianData().denoise(x, sigma)
    # ComfyUI fades each inner edge over min(8, size // 4) rows: 4 rows of (1/4, 2/4, 3/4, 1) for the
    # 16 rows, 3 columns of (1/3, 2/3, 1) for the 12 columns.
    rows = torch.tensor([1, 2, 3] + [4] * 10 + [3, 2, 1]) / 4
    cols = torch.tensor([1, 2] + [3] * 8 + [2, 1]) / 3
    weight = rows[:, None] * cols[None, :]
    expected = exact.clone()
    expected[:, :, 4:20, 8:20] = exact[:, :, 4:20, 8:20] - sigma * GAIN * weight / (1 + weight)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert sorted(shape for shape, _ in network.calls) == [(1, 4, 16, 12), (1, 4, 24, 24)]


def test_areas_narrower_than_four_latent_pixels_are_not_feathered(sd_sampling, sigma, x):
    area = _prompt(1.0, area=(3, 4, 2, 2), strength=1.0)
    guider, _ = _guider(sd_sampling, [_prompt(0.0), area], [_prompt(0.0)], cfg=1.0)
    out = guider(x, sigma)
    exact = GaussianData().denoise(x, sigma)
    # 3 // 4 = 0 rows of fade; 4 // 4 = 1 column of fade at weight 1/1: the area weighs 1 everywhere.
    expected = exact.clone()
    expected[:, :, 2:5, 2:6] = exact[:, :, 2:5, 2:6] - sigma * GAIN * 0.5
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_area_edges_on_the_latent_border_are_not_feathered(sd_sampling, sigma, x):
    guider, _ = _guider(sd_sampling, [_prompt(1.0, area=(8, 4, 0, 0))], [_prompt(0.0)], cfg=1.0)
    out = guider(x, sigma)
    exact = GaussianData().denoise(x, sigma)
    # Only the right edge (x + w = 4 < 8) fades; the prediction alone covers the area, so the weights
    # cancel inside it, and outside it nothing predicts: ComfyUI returns 0 there.
    torch.testing.assert_close(out[..., :4], exact[..., :4] - sigma * GAIN, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[..., 4:]) == 0


def test_percentage_area_resolves_to_latent_pixels(sd_sampling, sigma, x):
    guider, network = _guider(
        sd_sampling, [_prompt(0.0), _prompt(1.0, area=("percentage", 0.5, 0.25, 0.5, 0.0))], [_prompt(0.0)], cfg=1.0
    )
    guider(x, sigma)
    assert sorted(shape for shape, _ in network.calls) == [(2, 4, 4, 2), (2, 4, 8, 8)]


def test_mask_weights_the_prediction_by_mask_times_strengths_without_feathering(sd_sampling, sigma, x):
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1.0  # right half, at pixel resolution; resized bilinearly to the 8x8 latent
    masked = _prompt(1.0, mask=mask, mask_strength=0.5, strength=2.0)
    guider, _ = _guider(sd_sampling, [_prompt(0.0), masked], [_prompt(0.0)], cfg=1.0)
    out = guider(x, sigma)
    exact = GaussianData().denoise(x, sigma)
    torch.testing.assert_close(out[..., :4], exact[..., :4], rtol=1e-5, atol=1e-5)
    weight = 0.5 * 2.0
    expected = exact[..., 4:] - sigma * GAIN * weight / (1 + weight)
    torch.testing.assert_close(out[..., 4:], expected, rtol=1e-5, atol=1e-5)


def test_set_area_to_bounds_crops_the_model_input_to_the_mask(sd_sampling, sigma):
    shape = (1, 4, 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(16, 16)
    mask[1:11, 2:11] = 1.0
    guider, network = _guider(
        sd_sampling, [_prompt(0.0), _prompt(1.0, mask=mask, set_area_to_bounds=True)], [_prompt(0.0)],
        cfg=1.0, shape=shape,
    )
    guider(x, sigma)
    assert sorted(shape for shape, _ in network.calls) == [(1, 4, 10, 9), (1, 4, 16, 16)]


def test_set_area_to_bounds_grows_a_small_mask_box_to_eight_latent_pixels(sd_sampling):
    # ComfyUI's minimum area (64 px = 8 latent px), clipped where the box would leave the latent.
    shape = (1, 4, 16, 16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(16, 16)
    mask[2:5, 11:14] = 1.0
    guider, network = _guider(
        sd_sampling, [_prompt(0.0), _prompt(1.0, mask=mask, set_area_to_bounds=True)], [_prompt(0.0)],
        cfg=1.0, shape=shape,
    )
    guider(x, float(sd_sampling.sigmas[500]))
    assert sorted(shape for shape, _ in network.calls) == [(1, 4, 8, 5), (1, 4, 16, 16)]


def test_timestep_range_switches_a_prompt_on_only_inside_its_percent_window(sd_sampling, x):
    late = _prompt(1.0, start_percent=0.5, end_percent=1.0)
    guider, _ = _guider(sd_sampling, [_prompt(0.0), late], [_prompt(0.0)], cfg=1.0)
    exact = GaussianData()
    early_sigma, late_sigma = float(sd_sampling.sigmas[900]), float(sd_sampling.sigmas[100])
    torch.testing.assert_close(guider(x, early_sigma), exact.denoise(x, early_sigma), rtol=1e-5, atol=1e-5)
    expected_late = exact.denoise(x, late_sigma) - late_sigma * GAIN * 0.5
    torch.testing.assert_close(guider(x, late_sigma), expected_late, rtol=1e-5, atol=1e-5)


def test_y_comes_from_extras_or_the_model_encoder(sd_sampling, sigma, x):
    seen = []

    def encode_y(extras, shape):
        seen.append((extras["pooled_output"].shape, tuple(shape)))
        return torch.full((1, 6), 2.0)

    positive = [torch.zeros(1, 77, 16), {"pooled_output": torch.zeros(1, 5)}]
    negative = [torch.zeros(1, 77, 16), {"y": torch.full((1, 6), -1.0)}]
    guider, network = _guider(sd_sampling, [positive], [negative], cfg=2.0, encode_y=encode_y)
    guider(x, sigma)
    assert seen == [((1, 5), SHAPE)]
    assert network.ys[0][:, 0].tolist() == [2.0, 2.0, -1.0, -1.0]


def test_guidance_rescale_matches_the_conditional_v_std_per_sample(sigma, x):
    data = GaussianData()
    cond = data.denoise(x, sigma)
    guided = cond + torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 3
    full = rescale_guidance(x, sigma, guided, cond, 1.0)

    def v(denoised):
        return (x / (sigma**2 + 1) - denoised) * math.sqrt(sigma**2 + 1) / sigma

    torch.testing.assert_close(v(full).std(dim=(1, 2, 3)), v(cond).std(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)
    half = rescale_guidance(x, sigma, guided, cond, 0.5)
    torch.testing.assert_close(v(half), 0.5 * v(full) + 0.5 * v(guided), rtol=1e-4, atol=1e-4)
    assert torch.equal(rescale_guidance(x, sigma, guided, cond, 0.0), guided)


def test_malformed_conditioning_entry_is_rejected_with_its_shape():
    with pytest.raises(ValueError, match=r"\[B, T, C\], got shape \(77, 16\)"):
        Condition.from_comfy([torch.zeros(77, 16), {}])


def test_a_lone_full_frame_prompt_is_normalised_by_its_own_strength(sd_sampling, sigma, x):
    # D is a weighted average over a list's prompts, so one prompt's strength divides out (as in ComfyUI);
    # the batcher returns such a prediction as it is, without accumulating weights.
    plain, _ = _guider(sd_sampling, [_prompt(1.0)], [_prompt(0.0)])
    weak, _ = _guider(sd_sampling, [_prompt(1.0, strength=0.25)], [_prompt(0.0)])
    torch.testing.assert_close(weak(x, sigma), plain(x, sigma), rtol=0, atol=0)


def test_a_prompt_switched_off_by_its_timestep_range_leaves_its_list_at_zero(sd_sampling, sigma, x):
    conds = [[Condition.from_comfy(_prompt(1.0, start_percent=0.9, end_percent=1.0))],
             [Condition.from_comfy(_prompt(0.0))]]
    network = GaussianEpsNetwork(GaussianData(), sd_sampling, context_gain=GAIN)
    cond, uncond = CondBatcher(network, sd_sampling, conds, SHAPE)(x, sigma, [0, 1])
    assert torch.equal(cond, torch.zeros_like(x))
    torch.testing.assert_close(uncond, GaussianData().denoise(x, sigma), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weighted_average_is_accumulated_in_float32_for_half_precision_latents(sd_sampling, dtype):
    # A lone area's feathered weights cancel exactly, even where they are small (1/64 in its corners):
    # the result inside the area is the area's own prediction, bit for bit.
    shape = (1, 4, 48, 48)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    sigma = float(sd_sampling.sigmas[500])
    area, _ = _guider(sd_sampling, [_prompt(1.0, area=(32, 32, 8, 8))], [_prompt(0.0)], cfg=1.0, shape=shape)
    region = x[:, :, 8:40, 8:40]
    alone, _ = _guider(sd_sampling, [_prompt(1.0)], [_prompt(0.0)], cfg=1.0, shape=region.shape)
    out = area(x, sigma)
    assert out.dtype == dtype
    assert torch.equal(out[:, :, 8:40, 8:40], alone(region, sigma))
