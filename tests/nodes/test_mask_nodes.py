"""Mask nodes: SolidMask, InvertMask and GrowMask (against scipy's grey morphology, which ComfyUI uses)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from nodes.mask import (CropMask, GrowMask, ImageToMask, InvertMask, MaskComposite, MaskToImage, SolidMask,
                        ThresholdMask)

SQUARE = np.ones((3, 3), dtype=bool)
PLUS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def test_solid_mask_is_one_value_everywhere():
    (mask,) = SolidMask(0.25, 7, 3)
    assert mask.shape == (1, 3, 7) and mask.dtype == torch.float32
    assert torch.all(mask == 0.25)


def test_invert_mask_flips_values_and_accepts_a_single_hw_mask():
    mask = torch.rand(5, 6)
    (inverted,) = InvertMask(mask)
    assert torch.equal(inverted, (1.0 - mask).unsqueeze(0))


def scipy_grown(mask: np.ndarray, expand: int, tapered_corners: bool) -> np.ndarray:
    footprint = PLUS if tapered_corners else SQUARE
    operation = ndimage.grey_dilation if expand > 0 else ndimage.grey_erosion
    for _ in range(abs(expand)):
        mask = operation(mask, footprint=footprint)
    return mask


@pytest.mark.parametrize("expand", [1, 3, -1, -2])
@pytest.mark.parametrize("tapered_corners", [True, False])
def test_grow_mask_matches_grey_dilation_and_erosion(expand, tapered_corners):
    masks = torch.rand(2, 9, 11)
    (grown,) = GrowMask(masks, expand, tapered_corners)
    expected = np.stack([scipy_grown(m.numpy(), expand, tapered_corners) for m in masks])
    assert torch.equal(grown, torch.from_numpy(expected))


def test_tapered_corners_grow_a_point_into_a_diamond_and_square_corners_into_a_square():
    point = torch.zeros(1, 5, 5)
    point[0, 2, 2] = 1.0
    (diamond,) = GrowMask(point, 2, True)
    (square,) = GrowMask(point, 2, False)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    assert torch.equal(diamond[0], ((rows - 2).abs() + (cols - 2).abs() <= 2).float())
    assert torch.equal(square[0], torch.ones(5, 5))


def test_grow_mask_by_zero_leaves_the_mask_and_a_huge_expand_stops_once_full():
    mask = torch.rand(1, 4, 4)
    assert torch.equal(GrowMask(mask, 0, True)[0], mask)
    (full,) = GrowMask(mask, 16384, False)
    assert torch.all(full == mask.max())


def test_mask_nodes_name_an_input_that_is_not_a_mask():
    with pytest.raises(ValueError, match="mask: a MASK must be"):
        GrowMask(torch.rand(2, 3, 4, 5), 1, True)


@pytest.mark.parametrize("channel, index", [("red", 0), ("green", 1), ("blue", 2), ("alpha", 3)])
def test_image_to_mask_takes_one_channel(channel, index):
    image = torch.rand(2, 3, 4, 4)
    assert torch.equal(ImageToMask(image, channel)[0], image[..., index])


def test_image_to_mask_names_a_missing_alpha_channel():
    with pytest.raises(ValueError, match="channel: the image has 3 channels"):
        ImageToMask(torch.rand(1, 2, 2, 3), "alpha")


def test_mask_to_image_repeats_the_mask_in_three_channels():
    mask = torch.rand(2, 3, 4)
    (image,) = MaskToImage(mask)
    assert image.shape == (2, 3, 4, 3) and all(torch.equal(image[..., c], mask) for c in range(3))


def test_threshold_mask_is_one_strictly_above_the_value():
    assert ThresholdMask(torch.tensor([[[0.2, 0.5, 0.7]]]), 0.5)[0].tolist() == [[[0.0, 0.0, 1.0]]]


def test_crop_mask_cuts_the_region():
    mask = torch.rand(1, 6, 8)
    assert torch.equal(CropMask(mask, 2, 1, 3, 4)[0], mask[:, 1:5, 2:5])


@pytest.mark.parametrize("operation, at_offset, at_edge", [
    ("multiply", 0.125, 0.6), ("add", 0.75, 1.0), ("subtract", 0.25, 0.0),
    ("and", 0.0, 1.0), ("or", 0.0, 1.0), ("xor", 0.0, 0.0)])
def test_mask_composite_combines_the_source_at_its_offset_clipped_and_clamped(operation, at_offset, at_edge):
    # destination 0.5 (0.6 in its last column) under a 1x3 source [0.25, 1.0, 1.0] at x=2, y=1: the source's
    # third column falls off the edge; and/or/xor round first (0.5 rounds to 0, as torch.round does).
    destination = torch.full((1, 3, 4), 0.5)
    destination[0, 1, 3] = 0.6
    (result,) = MaskComposite(destination, torch.tensor([[[0.25, 1.0, 1.0]]]), 2, 1, operation)
    untouched = torch.ones(3, 4, dtype=torch.bool)
    untouched[1, 2:] = False
    assert torch.all(result[0][untouched] == 0.5)
    assert result[0, 1, 2].item() == pytest.approx(at_offset)
    assert result[0, 1, 3].item() == pytest.approx(at_edge)
