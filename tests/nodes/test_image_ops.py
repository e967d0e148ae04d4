"""Image filter and transform nodes (ImageBlur, ImageSharpen, ImageBlend, ImageQuantize, ImageFlip, ImageRotate)
and FeatherMask, checked against values worked out by hand from ComfyUI's formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cli
from engine import Executor, ResultCache
from nodes.image_ops import (BLEND_MODES, DITHER_METHODS, FeatherMask, ImageBlend, ImageBlur, ImageFlip,
                             ImageQuantize, ImageRotate, ImageSharpen, bayer_dithered, bayer_thresholds,
                             gaussian_kernel)


def flat(value: float, height: int = 4, width: int = 5, channels: int = 3, batch: int = 1) -> torch.Tensor:
    return torch.full((batch, height, width, channels), value)


def delta_image(size: int = 7, background: float = 0.0, peak: float = 1.0) -> torch.Tensor:
    image = flat(background, size, size, 1)
    image[0, size // 2, size // 2, 0] = peak
    return image


# --- blur -------------------------------------------------------------------------------------------------

def test_gaussian_kernel_spaces_its_taps_over_minus_one_to_one():
    # Radius 1, sigma 1: taps at -1, 0, 1, so edge weights exp(-1/2) and corner weights exp(-1).
    edge, corner = math.exp(-0.5), math.exp(-1.0)
    total = 1.0 + 4 * edge + 4 * corner
    expected = torch.tensor([[corner, edge, corner], [edge, 1.0, edge], [corner, edge, corner]]) / total
    assert torch.allclose(gaussian_kernel(1, 1.0), expected, atol=1e-7)


def test_blur_of_a_delta_image_is_the_normalised_gaussian_kernel():
    (blurred,) = ImageBlur(delta_image(9), 2, 0.5)
    taps = [-1.0, -0.5, 0.0, 0.5, 1.0]
    weights = torch.tensor([[math.exp(-(x * x + y * y) / (2 * 0.25)) for x in taps] for y in taps])
    assert torch.allclose(blurred[0, 2:7, 2:7, 0], weights / weights.sum(), atol=1e-7)
    assert blurred[0, :2].abs().max() == 0 and blurred[0, :, 7:].abs().max() == 0


@pytest.mark.parametrize("radius, sigma, alpha", [(1, 1.0, 1.0), (5, 0.3, 2.0), (12, 4.0, 0.5)])
def test_blur_and_sharpen_equal_one_2d_convolution_by_comfyuis_kernel(radius, sigma, alpha):
    # ComfyUI convolves once with the square kernel; sdgraph runs two 1D passes (the Gaussian separates).
    image = torch.rand(2, 30, 40, 3, generator=torch.Generator().manual_seed(2))
    padded = F.pad(image.movedim(-1, 1), (radius,) * 4, mode="reflect")
    kernel = gaussian_kernel(radius, sigma)
    sharpening = kernel * -(alpha * 10)
    sharpening[radius, radius] += 1 - sharpening.sum()

    def convolved(weights: torch.Tensor) -> torch.Tensor:
        return F.conv2d(padded, weights.expand(3, 1, *weights.shape), groups=3).movedim(1, -1)
    assert torch.allclose(ImageBlur(image, radius, sigma)[0], convolved(kernel), atol=2e-6)
    assert torch.allclose(ImageSharpen(image, radius, sigma, alpha)[0], convolved(sharpening).clamp(0, 1), atol=1e-5)


def test_blur_mirrors_the_edges_so_a_flat_image_stays_flat_to_its_border():
    (blurred,) = ImageBlur(flat(0.3, 6, 7), 3, 2.0)
    assert torch.allclose(blurred, flat(0.3, 6, 7), atol=1e-6)


def test_blur_mirrors_rather_than_repeats_the_edge_pixel():
    # One bright first column: mirroring puts the dark column 1 beyond the edge, so an edge pixel gets only
    # the kernel's middle column (repeating the edge pixel would add the left column too).
    image = flat(0.0, 5, 5, 1)
    image[0, :, 0, 0] = 1.0
    (blurred,) = ImageBlur(image, 1, 1.0)
    middle_column = gaussian_kernel(1, 1.0)[:, 1].sum()
    assert torch.allclose(blurred[0, 2, 0, 0], middle_column, atol=1e-7)


def test_blur_radius_larger_than_the_image_is_refused_naming_the_input():
    with pytest.raises(ValueError, match="blur_radius: a radius of 4 needs an image of at least 5 pixels"):
        ImageBlur(flat(0.5, 4, 8), 4, 1.0)


# --- sharpen ----------------------------------------------------------------------------------------------

def test_sharpen_leaves_a_flat_image_unchanged():
    (sharpened,) = ImageSharpen(flat(0.42, 5, 6, 4), 2, 1.0, 3.0)
    assert torch.allclose(sharpened, flat(0.42, 5, 6, 4), atol=1e-6)


def test_sharpen_pushes_a_bump_away_from_its_surroundings_by_ten_alpha_times_the_blur_difference():
    # Kernel = -10 alpha G plus (1 + 10 alpha) at the centre; alpha 0.1 makes it 2 - G at the centre, -G
    # elsewhere; a 0.02 bump on 0.5 grey gives 0.5 + 0.02 (2 - G_centre) there and 0.5 - 0.02 G_edge next to it.
    kernel = gaussian_kernel(1, 1.0)
    (sharpened,) = ImageSharpen(delta_image(5, 0.5, 0.52), 1, 1.0, 0.1)
    assert torch.isclose(sharpened[0, 2, 2, 0], 0.5 + 0.02 * (2 - kernel[1, 1]), atol=1e-6)
    assert torch.isclose(sharpened[0, 2, 3, 0], 0.5 - 0.02 * kernel[1, 2], atol=1e-6)


def test_sharpen_clamps_to_the_unit_range():
    (sharpened,) = ImageSharpen(delta_image(5, 0.0, 1.0), 1, 1.0, 5.0)
    assert sharpened.min() == 0.0 and sharpened.max() == 1.0


# --- blend ------------------------------------------------------------------------------------------------

# (mode, image1, image2, formula's value); soft light's lift of 0.2 is ((16*0.2 - 12)*0.2 + 4)*0.2 = 0.448.
BLEND_CASES = [
    ("normal", 0.2, 0.7, 0.7),
    ("multiply", 0.2, 0.7, 0.14),
    ("screen", 0.2, 0.7, 1 - 0.8 * 0.3),
    ("overlay", 0.2, 0.7, 2 * 0.2 * 0.7),
    ("overlay", 0.7, 0.2, 1 - 2 * 0.3 * 0.8),
    ("soft_light", 0.2, 0.7, 0.2 + (2 * 0.7 - 1) * (0.448 - 0.2)),
    ("soft_light", 0.7, 0.2, 0.7 - (1 - 2 * 0.2) * 0.7 * 0.3),
    ("soft_light", 0.64, 0.9, 0.64 + (2 * 0.9 - 1) * (0.8 - 0.64)),
    ("difference", 0.7, 0.2, 0.5),
    ("difference", 0.2, 0.7, 0.0),  # signed, then clamped: not |0.2 - 0.7|
]


@pytest.mark.parametrize("mode, base, top, expected", BLEND_CASES)
def test_each_blend_mode_on_flat_images_gives_its_formulas_value(mode, base, top, expected):
    (blended,) = ImageBlend(flat(base), flat(top), 1.0, mode)
    assert torch.allclose(blended, flat(expected), atol=1e-6)


def test_blend_factor_mixes_the_blended_image_with_image1():
    (blended,) = ImageBlend(flat(0.2), flat(0.7), 0.25, "multiply")
    assert torch.allclose(blended, flat(0.75 * 0.2 + 0.25 * 0.14), atol=1e-6)


def test_blend_every_mode_is_covered_by_the_cases():
    assert {case[0] for case in BLEND_CASES} == set(BLEND_MODES)


def test_blend_resizes_image2_to_image1():
    (blended,) = ImageBlend(flat(0.2, 6, 8), flat(0.6, 3, 3), 1.0, "screen")
    assert blended.shape == (1, 6, 8, 3)
    assert torch.allclose(blended, flat(1 - 0.8 * 0.4, 6, 8), atol=1e-6)


def test_blend_crops_image2_to_image1s_aspect_from_its_centre():
    # A wide image2 whose middle half is white: cropped to image1's square from the centre it is all white.
    image2 = flat(0.0, 4, 8)
    image2[:, :, 2:6] = 1.0
    (blended,) = ImageBlend(flat(0.3, 4, 4), image2, 1.0, "normal")
    assert torch.allclose(blended, flat(1.0, 4, 4), atol=1e-6)


def test_blend_keeps_image1s_alpha_and_gives_an_rgb_image2_an_opaque_one():
    image1 = torch.cat([flat(0.2), flat(0.25, channels=1)], dim=-1)
    (blended,) = ImageBlend(image1, flat(0.7), 1.0, "normal")
    assert torch.allclose(blended[..., :3], flat(0.7), atol=1e-6)
    assert torch.equal(blended[..., 3], image1[..., 3])


def test_blend_drops_image2s_alpha_for_an_rgb_image1():
    image2 = torch.cat([flat(0.7), flat(0.0, channels=1)], dim=-1)
    (blended,) = ImageBlend(flat(0.2), image2, 1.0, "multiply")
    assert blended.shape[-1] == 3 and torch.allclose(blended, flat(0.14), atol=1e-6)


def test_blend_applies_a_single_image2_to_every_image_of_the_batch():
    image1 = torch.stack([flat(0.2)[0], flat(0.4)[0]])
    (blended,) = ImageBlend(image1, flat(0.5), 1.0, "multiply")
    assert torch.allclose(blended[:, 0, 0, 0], torch.tensor([0.1, 0.2]), atol=1e-6)


def test_blend_refuses_batches_of_different_sizes_naming_image2():
    with pytest.raises(ValueError, match="image2: a batch of 3 cannot blend with image1's batch of 2"):
        ImageBlend(flat(0.2, batch=2), flat(0.5, batch=3), 0.5, "normal")


# --- quantize ---------------------------------------------------------------------------------------------

def distinct_colours(image: torch.Tensor) -> torch.Tensor:
    return torch.unique(image[..., :3].reshape(-1, 3), dim=0)


@pytest.mark.parametrize("dither", DITHER_METHODS)
def test_quantize_to_two_colours_leaves_exactly_two(dither):
    image = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    (quantized,) = ImageQuantize(image, 2, dither)
    assert quantized.shape == image.shape and len(distinct_colours(quantized)) == 2


def test_quantize_keeps_an_image_with_few_enough_colours_exactly():
    image = torch.tensor([[[0, 0, 0], [255, 0, 0]], [[0, 128, 255], [255, 255, 255]]], dtype=torch.float32)
    image = (image / 255.0).unsqueeze(0)
    (quantized,) = ImageQuantize(image, 4, "none")
    assert torch.equal(quantized, image)


def grey_between_black_and_white() -> torch.Tensor:
    # Two black columns, two white ones and 8x8 of grey 127 (0.5 cast down to 8 bits): median cut on two
    # colours keeps black and the mean of the rest, (64 * 127 + 16 * 255) / 80 = 152.6, so 153.
    image = flat(0.5, 8, 12)
    image[:, :, :2], image[:, :, -2:] = 0.0, 1.0
    return image


def test_quantize_without_dither_maps_each_pixel_to_the_nearest_palette_colour():
    (quantized,) = ImageQuantize(grey_between_black_and_white(), 2, "none")
    assert torch.equal(distinct_colours(quantized), torch.tensor([[0.0] * 3, [153 / 255] * 3]))
    assert torch.all(quantized[0, :, 2:] == 153 / 255) and torch.all(quantized[0, :, :2] == 0)


def test_bayer_2_thresholds_are_the_index_matrix_centred_on_zero():
    # Bayer's 2x2 index matrix [[0, 2], [3, 1]] as (i + 0.5) / 4 - 0.5.
    assert torch.equal(bayer_thresholds(2), torch.tensor([[-0.375, 0.125], [0.375, -0.125]], dtype=torch.float64))


@pytest.mark.parametrize("order", [4, 8, 16])
def test_bayer_thresholds_use_every_level_once(order):
    levels = (torch.arange(order * order, dtype=torch.float64) + 0.5) / order ** 2 - 0.5
    assert torch.equal(bayer_thresholds(order).flatten().sort().values, levels)


def test_bayer_2_dithers_grey_into_the_tiled_pattern():
    # Palette {0, 153}, spread 2 * 256 / 2 = 256: grey 127 plus 256 t + 0.5 gives 31, 159 / 223, 95, whose
    # nearest colours are 0, 153 / 153, 153.
    (quantized,) = ImageQuantize(grey_between_black_and_white(), 2, "bayer-2")
    pattern = torch.tensor([[0.0, 153 / 255], [153 / 255, 153 / 255]]).repeat(4, 6)
    assert torch.equal(quantized[0, :, 2:10, 0], pattern[:, 2:10])


def test_bayer_spreads_its_thresholds_over_twice_the_palette_spacing():
    # Black and white: spread 2 * 256 / 2 = 256, so grey 200 plus 256 t + 0.5 is 104, 232 / 255 (clamped),
    # 168: one pixel in four goes black (a spread of 128 would leave all four white).
    palette = Image.new("P", (1, 1))
    palette.putpalette([0, 0, 0, 255, 255, 255])
    grey = Image.new("RGB", (4, 4), (200, 200, 200))
    dithered = torch.from_numpy(np.asarray(bayer_dithered(grey, palette, 2).convert("L"), dtype=np.float32))
    assert torch.equal(dithered, torch.tensor([[0.0, 255.0], [255.0, 255.0]]).repeat(2, 2))


def test_floyd_steinberg_keeps_the_average_grey_closer_than_no_dither():
    image = grey_between_black_and_white()
    (plain,) = ImageQuantize(image, 2, "none")
    (diffused,) = ImageQuantize(image, 2, "floyd-steinberg")
    grey = 127 / 255
    assert abs(diffused[0, :, 2:10].mean() - grey) < abs(plain[0, :, 2:10].mean() - grey) / 2


def test_quantize_passes_alpha_through():
    image = torch.cat([grey_between_black_and_white(), flat(0.3, 8, 12, 1)], dim=-1)
    (quantized,) = ImageQuantize(image, 2, "none")
    assert torch.equal(quantized[..., 3], image[..., 3])


# --- flip and rotate --------------------------------------------------------------------------------------

PICTURE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).reshape(1, 2, 3, 1)


def test_flip_about_the_x_axis_turns_the_image_upside_down():
    (flipped,) = ImageFlip(PICTURE, "x-axis: vertically")
    assert flipped[0, ..., 0].tolist() == [[4, 5, 6], [1, 2, 3]]


def test_flip_about_the_y_axis_mirrors_left_and_right():
    (flipped,) = ImageFlip(PICTURE, "y-axis: horizontally")
    assert flipped[0, ..., 0].tolist() == [[3, 2, 1], [6, 5, 4]]


@pytest.mark.parametrize("rotation, expected", [
    ("none", [[1, 2, 3], [4, 5, 6]]),
    ("90 degrees", [[4, 1], [5, 2], [6, 3]]),
    ("180 degrees", [[6, 5, 4], [3, 2, 1]]),
    ("270 degrees", [[3, 6], [2, 5], [1, 4]]),
])
def test_rotate_turns_clockwise(rotation, expected):
    (rotated,) = ImageRotate(PICTURE, rotation)
    assert rotated[0, ..., 0].tolist() == expected


# --- feather ----------------------------------------------------------------------------------------------

def test_feather_left_and_top_ramp_linearly_from_the_edge():
    (feathered,) = FeatherMask(torch.ones(1, 4, 6), 3, 2, 0, 0)
    columns = torch.tensor([1 / 3, 2 / 3, 1, 1, 1, 1])
    rows = torch.tensor([0.5, 1, 1, 1])
    assert torch.allclose(feathered[0], rows[:, None] * columns[None, :], atol=1e-7)


def test_feather_right_and_bottom_keep_comfyuis_ramp_shifted_by_one_onto_the_first_pixel():
    # ComfyUI multiplies position -i by (i + 1) / n: i = 0 is position 0, so the last column gets 2/3,
    # the one before 3/3, and the first column 1/3.
    (feathered,) = FeatherMask(torch.ones(1, 3, 5), 0, 0, 3, 2)
    columns = torch.tensor([1 / 3, 1, 1, 1, 2 / 3])
    rows = torch.tensor([0.5, 1, 1])
    assert torch.allclose(feathered[0], rows[:, None] * columns[None, :], atol=1e-7)


def test_feather_wider_than_the_mask_is_clamped_to_its_size_and_ramps_multiply():
    (feathered,) = FeatherMask(torch.ones(4, 4), 10, 0, 0, 0)
    assert torch.allclose(feathered[0, 0], torch.tensor([0.25, 0.5, 0.75, 1.0]))
    (both,) = FeatherMask(torch.ones(1, 1, 4), 4, 0, 4, 0)
    # Left gives 1/4 .. 1; right gives 1/4 to column 0 and 2/4, 3/4, 4/4 to columns 3, 2, 1.
    assert torch.allclose(both[0, 0], torch.tensor([1 / 16, 0.5 * 1.0, 0.75 * 0.75, 1.0 * 0.5]))


def test_feather_scales_a_batch_of_masks_alike():
    masks = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(1))
    (feathered,) = FeatherMask(masks, 2, 0, 0, 0)
    assert torch.allclose(feathered[:, :, 0], masks[:, :, 0] * 0.5)
    assert torch.equal(feathered[:, :, 2:], masks[:, :, 2:])


# --- schema and inputs ------------------------------------------------------------------------------------

def test_the_nodes_are_registered_with_comfyuis_categories_and_input_order():
    registry = cli.load_registry([])
    info = {name: registry[name].object_info() for name in
            ("ImageBlur", "ImageSharpen", "ImageBlend", "ImageQuantize", "FeatherMask", "ImageFlip", "ImageRotate")}
    assert {name: entry["category"] for name, entry in info.items()} == {
        "ImageBlur": "image/filters", "ImageSharpen": "image/filters", "ImageBlend": "image/filters",
        "ImageQuantize": "image/filters", "FeatherMask": "mask", "ImageFlip": "image/transform",
        "ImageRotate": "image/transform"}
    assert info["ImageBlend"]["input_order"]["required"] == ["image1", "image2", "blend_factor", "blend_mode"]
    assert info["FeatherMask"]["input_order"]["required"] == ["mask", "left", "top", "right", "bottom"]
    assert info["ImageSharpen"]["input"]["required"]["alpha"] == ["FLOAT", {"default": 1.0, "min": 0.0,
                                                                            "max": 5.0, "step": 0.01}]


# --- inputs are never changed -----------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda image, mask: ImageBlur(image, 1, 1.0),
    lambda image, mask: ImageSharpen(image, 1, 1.0, 1.0),
    lambda image, mask: ImageBlend(image, image.flip(1), 0.5, "overlay"),
    lambda image, mask: ImageBlend(image[..., :3], image, 0.5, "normal"),
    lambda image, mask: ImageQuantize(image, 4, "bayer-4"),
    lambda image, mask: ImageFlip(image, "x-axis: vertically"),
    lambda image, mask: ImageRotate(image, "none"),
    lambda image, mask: FeatherMask(mask, 2, 2, 2, 2),
])
def test_no_node_changes_its_inputs(call):
    image = torch.rand(2, 6, 6, 4, generator=torch.Generator().manual_seed(5))
    mask = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(6))
    image_before, mask_before = image.clone(), mask.clone()
    (result,) = call(image, mask)
    result.add_(1.0)  # a result sharing memory with an input would change it here
    assert torch.equal(image, image_before) and torch.equal(mask, mask_before)


# --- in a workflow ----------------------------------------------------------------------------------------

def test_a_quarter_turn_then_a_mirror_saves_the_transposed_picture(fresh_settings):
    pixels = np.random.default_rng(4).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(fresh_settings.input_dir / "in.png")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
              "2": {"class_type": "ImageRotate", "inputs": {"image": ["1", 0], "rotation": "90 degrees"}},
              "3": {"class_type": "ImageFlip", "inputs": {"image": ["2", 0], "flip_method": "y-axis: horizontally"}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "turned"}}}
    result = Executor(cli.load_registry([]), cache=ResultCache(), settings=fresh_settings).execute(prompt)
    assert result.ok, result.error
    saved = fresh_settings.output_dir / result.outputs["4"]["images"][0]["filename"]
    assert np.array_equal(np.asarray(Image.open(saved)), pixels.transpose(1, 0, 2))


def test_an_unknown_blend_mode_is_refused_before_running_naming_the_node_and_input(fresh_settings):
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "2": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["1", 0],
                                                           "blend_factor": 0.5, "blend_mode": "lighten"}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    result = Executor(cli.load_registry([]), cache=ResultCache(), settings=fresh_settings).execute(prompt)
    assert result.status == "invalid" and not result.executed
    errors = result.validation.to_json()["node_errors"]
    assert list(errors) == ["2"]
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors["2"]["errors"]] == [
        ("value_not_in_list", "blend_mode")]
