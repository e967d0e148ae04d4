"""Image nodes: LoadImage/LoadImageMask (alpha, EXIF, frames, 16 bits, fingerprint, safe paths), SaveImage and
PreviewImage (ComfyUI's naming, PNG chunks, sub-folders, prefix tokens), and the image transforms."""
from __future__ import annotations

import json
import os
import re
from datetime import datetime

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cli
from engine import Executor, ResultCache
from engine.workflow import png_text_chunks, read_workflow_file
from nodes.image import (EmptyImage, ImageBatch, ImageCompositeMasked, ImageCrop, ImageFromBatch, ImageInvert, ImagePadForOutpaint,
                         ImageScale, ImageScaleBy, LoadImage, LoadImageMask, PreviewImage, RepeatImageBatch,
                         SaveImage, expand_filename_prefix, input_images)

RNG = np.random.default_rng(0)


def random_rgba(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 4), dtype=np.uint8)


def saved_image(settings, name: str, pixels: np.ndarray, mode: str | None = None, **save: object):
    path = settings.input_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path, **save)
    return path


# --- LoadImage / LoadImageMask ------------------------------------------------------------------------------

def test_load_image_gives_rgb_in_0_1_and_comfyuis_64px_zero_mask_without_alpha(fresh_settings, make_context):
    pixels = random_rgba(6, 10)[..., :3]
    saved_image(fresh_settings, "rgb.png", pixels)
    image, mask = LoadImage("rgb.png", context=make_context(fresh_settings))
    assert image.dtype == torch.float32 and image.shape == (1, 6, 10, 3)
    assert torch.equal(image[0], torch.from_numpy(pixels).float() / 255)
    assert torch.equal(mask, torch.zeros(1, 64, 64))


def test_load_image_mask_output_is_one_minus_alpha(fresh_settings, make_context):
    pixels = random_rgba(5, 7)
    saved_image(fresh_settings, "rgba.png", pixels)
    image, mask = LoadImage("rgba.png", context=make_context(fresh_settings))
    assert torch.equal(image[0], torch.from_numpy(pixels[..., :3]).float() / 255)
    assert torch.allclose(mask[0], 1 - torch.from_numpy(pixels[..., 3]).float() / 255)


def test_a_palette_image_with_a_transparent_index_has_a_mask(fresh_settings, make_context):
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(fresh_settings.input_dir / "p.png", transparency=1)
    image, mask = LoadImage("p.png", context=make_context(fresh_settings))
    assert mask[0].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert image[0, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_load_image_turns_the_picture_upright_by_its_exif_orientation(fresh_settings, make_context):
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # top-left is white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display it turned 90 degrees clockwise
    saved_image(fresh_settings, "turned.png", pixels, exif=exif)
    image, _ = LoadImage("turned.png", context=make_context(fresh_settings))
    assert image.shape == (1, 4, 2, 3)
    assert image[0, 0, 1].tolist() == [1.0, 1.0, 1.0]  # after a clockwise turn, top-left lands top-right
    assert image[0].sum() == 3.0


def test_frames_of_the_first_frames_size_become_a_batch_others_are_dropped(fresh_settings, make_context):
    frames = [Image.fromarray(random_rgba(4, 6)[..., :3]) for _ in range(3)] + [Image.new("RGB", (5, 5))]
    frames[0].save(fresh_settings.input_dir / "frames.tiff", save_all=True, append_images=frames[1:])
    image, mask = LoadImage("frames.tiff", context=make_context(fresh_settings))
    assert image.shape == (3, 4, 6, 3) and mask.shape == (3, 64, 64)
    assert torch.equal(image[2], torch.from_numpy(np.array(frames[2])).float() / 255)


def test_sixteen_bit_images_keep_their_precision(fresh_settings, make_context):
    grey = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(fresh_settings.input_dir / "deep.png")
    image, _ = LoadImage("deep.png", context=make_context(fresh_settings))
    assert torch.allclose(image[0, 0, :, 0], torch.tensor([0.0, 32768 / 65535, 1.0]))


def test_the_fingerprint_follows_the_file_contents(fresh_settings):
    path = saved_image(fresh_settings, "x.png", random_rgba(3, 3))
    first = LoadImage.fingerprint({"image": "x.png"}, fresh_settings)
    assert LoadImage.fingerprint({"image": "x.png"}, fresh_settings) == first
    path.write_bytes(path.read_bytes() + b"changed")
    assert LoadImage.fingerprint({"image": "x.png"}, fresh_settings) != first


def test_the_image_options_are_the_pictures_in_the_input_folder_and_its_sub_folders(fresh_settings):
    saved_image(fresh_settings, "b.png", random_rgba(2, 2))
    saved_image(fresh_settings, "pasted/a.jpg", random_rgba(2, 2)[..., :3])
    (fresh_settings.input_dir / "notes.txt").write_text("not a picture")
    assert input_images(fresh_settings) == ["b.png", "pasted/a.jpg"]


def test_load_image_refuses_names_that_leave_the_input_folder(fresh_settings, make_context, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(outside)
    os.symlink(outside, fresh_settings.input_dir / "link.png")
    for name in ("../secret.png", str(outside), "link.png"):
        with pytest.raises(ValueError, match="image: cannot open"):
            LoadImage(name, context=make_context(fresh_settings))
    assert "link.png" not in input_images(fresh_settings)


@pytest.mark.parametrize("channel, index", [("red", 0), ("green", 1), ("blue", 2)])
def test_load_image_mask_reads_one_colour_channel(fresh_settings, make_context, channel, index):
    pixels = random_rgba(4, 5)
    saved_image(fresh_settings, "m.png", pixels)
    (mask,) = LoadImageMask("m.png", channel, context=make_context(fresh_settings))
    assert mask.shape == (1, 4, 5)
    assert torch.equal(mask[0], torch.from_numpy(pixels[..., index]).float() / 255)


def test_load_image_mask_alpha_is_inverted_and_zero_for_an_opaque_picture(fresh_settings, make_context):
    pixels = random_rgba(4, 5)
    saved_image(fresh_settings, "a.png", pixels)
    saved_image(fresh_settings, "opaque.png", pixels[..., :3])
    (alpha,) = LoadImageMask("a.png", "alpha", context=make_context(fresh_settings))
    (opaque,) = LoadImageMask("opaque.png", "alpha", context=make_context(fresh_settings))
    assert torch.allclose(alpha[0], 1 - torch.from_numpy(pixels[..., 3]).float() / 255)
    assert torch.equal(opaque, torch.zeros(1, 4, 5))


# --- SaveImage / PreviewImage -----------------------------------------------------------------------------

def test_save_image_numbers_files_after_the_highest_existing_counter(fresh_settings, make_context):
    (fresh_settings.output_dir / "ComfyUI_00007_.png").write_bytes(b"")
    (fresh_settings.output_dir / "ComfyUIx_00042_.png").write_bytes(b"")
    result = SaveImage(torch.rand(2, 8, 8, 3), "ComfyUI", None, None, context=make_context(fresh_settings))
    assert result.ui == {"images": [{"filename": "ComfyUI_00008_.png", "subfolder": "", "type": "output"},
                                    {"filename": "ComfyUI_00009_.png", "subfolder": "", "type": "output"}]}
    assert (fresh_settings.output_dir / "ComfyUI_00009_.png").stat().st_size > 0


def test_save_image_never_overwrites_a_file_that_appeared_meanwhile(fresh_settings, make_context, monkeypatch):
    (fresh_settings.output_dir / "race_00001_.png").write_bytes(b"another run's image")
    monkeypatch.setattr("nodes.image.next_file_counter", lambda folder, filename: 1)  # as if it landed after the scan
    result = SaveImage(torch.rand(1, 4, 4, 3), "race", None, None, context=make_context(fresh_settings))
    assert result.ui["images"][0]["filename"] == "race_00002_.png"
    assert (fresh_settings.output_dir / "race_00001_.png").read_bytes() == b"another run's image"


def test_saved_pixels_are_the_image_rounded_to_8_bits(fresh_settings, make_context):
    image = torch.rand(1, 5, 6, 3)
    SaveImage(image, "px", None, None, context=make_context(fresh_settings))
    saved = np.asarray(Image.open(fresh_settings.output_dir / "px_00001_.png"))
    assert np.array_equal(saved, (image[0] * 255).round().to(torch.uint8).numpy())


def test_save_image_writes_the_prompt_and_every_extra_pnginfo_key_as_text_chunks(fresh_settings, make_context):
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "ü.png"}}}
    extra = {"workflow": {"nodes": [], "links": []}, "note": "hi"}
    SaveImage(torch.rand(1, 4, 4, 3), "meta", prompt, extra, context=make_context(fresh_settings))
    chunks = png_text_chunks((fresh_settings.output_dir / "meta_00001_.png").read_bytes())
    assert {key: json.loads(text) for key, text in chunks.items()} == {"prompt": prompt, **extra}


def test_a_prefix_with_folders_saves_into_that_sub_folder(fresh_settings, make_context):
    result = SaveImage(torch.rand(1, 4, 4, 3), "portraits/2024/face", None, None,
                       context=make_context(fresh_settings))
    assert result.ui["images"] == [{"filename": "face_00001_.png", "subfolder": "portraits/2024", "type": "output"}]
    assert (fresh_settings.output_dir / "portraits" / "2024" / "face_00001_.png").is_file()


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/absolute", "a/../../b"])
def test_a_prefix_leaving_the_output_folder_fails_validation_and_saving(fresh_settings, make_context, prefix):
    assert SaveImage.validate({"filename_prefix": prefix}).startswith("filename_prefix: ")
    with pytest.raises(ValueError, match="filename_prefix: .*inside the output folder"):
        SaveImage(torch.rand(1, 4, 4, 3), prefix, None, None, context=make_context(fresh_settings))
    assert not any(fresh_settings.output_dir.parent.glob("*.png"))


def test_a_symlinked_sub_folder_leading_outside_is_refused(fresh_settings, make_context, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, fresh_settings.output_dir / "out")
    with pytest.raises(ValueError, match="filename_prefix"):
        SaveImage(torch.rand(1, 4, 4, 3), "out/x", None, None, context=make_context(fresh_settings))
    assert list(outside.iterdir()) == []


def test_prefix_tokens_expand_from_the_date_the_size_and_the_prompt():
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 42, "model": ["4", 0]}},
              "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512}, "_meta": {"title": "Size"}},
              "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a/b"}}}
    now = datetime(2024, 3, 7, 9, 5, 2)
    expanded = expand_filename_prefix(
        "%date:yyyy-MM-dd_hh-mm-ss%/%year%%month%%day%_%width%x%height%_s%KSampler.seed%_%Size.width%_"
        "%CLIPTextEncode.text%_%KSampler.model%_%batch_num%_%unknown%", width=64, height=32, prompt=prompt, now=now)
    assert expanded == ("2024-03-07_09-05-02/20240307_64x32_s42_512_a_b_%KSampler.model%_%batch_num%_%unknown%")


def test_batch_num_names_each_image_of_the_batch(fresh_settings, make_context):
    result = SaveImage(torch.rand(2, 4, 4, 3), "frame%batch_num%", None, None, context=make_context(fresh_settings))
    assert [entry["filename"] for entry in result.ui["images"]] == ["frame0_00001_.png", "frame1_00002_.png"]


def test_preview_image_writes_to_the_temp_folder_with_a_random_prefix(fresh_settings, make_context):
    result = PreviewImage(torch.rand(1, 4, 4, 3), None, None, context=make_context(fresh_settings))
    (entry,) = result.ui["images"]
    assert re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", entry["filename"])
    assert (entry["subfolder"], entry["type"]) == ("", "temp")
    assert (fresh_settings.temp_dir / entry["filename"]).is_file()


def test_a_saved_png_replays_as_the_prompt_that_made_it(fresh_settings):
    saved_image(fresh_settings, "in.png", random_rgba(8, 8))
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
              "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "run"}}}
    registry = cli.load_registry([])
    executor = Executor(registry, cache=ResultCache(), settings=fresh_settings)
    ui = {"nodes": [], "links": [], "version": 0.4}
    result = executor.execute(prompt, extra_data={"extra_pnginfo": {"workflow": ui}})
    assert result.ok, result.error
    saved = fresh_settings.output_dir / result.outputs["3"]["images"][0]["filename"]
    assert read_workflow_file(saved, registry) == prompt
    assert json.loads(png_text_chunks(saved.read_bytes())["workflow"]) == ui
    original = np.asarray(Image.open(fresh_settings.input_dir / "in.png"))[..., :3]
    assert np.array_equal(np.asarray(Image.open(saved)), 255 - original)


# --- transforms -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic"])
def test_image_scale_matches_torch_interpolation(method):
    image = torch.rand(2, 6, 9, 3)
    (scaled,) = ImageScale(image, method, 13, 5, "disabled")
    expected = F.interpolate(image.movedim(-1, 1), size=(5, 13), mode=method).movedim(1, -1)
    assert scaled.shape == (2, 5, 13, 3)
    assert torch.allclose(scaled, expected)


def test_image_scale_center_crop_keeps_the_middle_at_the_new_aspect():
    image = torch.arange(8 * 4, dtype=torch.float32).reshape(1, 4, 8, 1).repeat(1, 1, 1, 3)
    (scaled,) = ImageScale(image, "nearest-exact", 4, 4, "center")
    assert torch.equal(scaled, image[:, :, 2:6])


def test_image_scale_with_one_side_zero_keeps_the_aspect_ratio():
    (scaled,) = ImageScale(torch.rand(1, 10, 20, 3), "bilinear", 0, 5, "disabled")
    (unchanged,) = ImageScale(image := torch.rand(1, 3, 3, 3), "bilinear", 0, 0, "disabled")
    assert scaled.shape == (1, 5, 10, 3)
    assert unchanged is image


def test_image_scale_lanczos_is_pillows_at_8_bits():
    pixels = random_rgba(7, 9)[..., :3]
    (scaled,) = ImageScale(torch.from_numpy(pixels).float().unsqueeze(0) / 255, "lanczos", 5, 4, "disabled")
    expected = np.asarray(Image.fromarray(pixels).resize((5, 4), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    assert torch.equal(scaled[0], torch.from_numpy(expected))


def test_image_scale_by_rounds_the_new_size():
    (scaled,) = ImageScaleBy(torch.rand(1, 10, 15, 3), "bicubic", 1.5)
    assert scaled.shape == (1, 15, 22, 3)  # 15 * 1.5 = 22.5 rounds to even, as Python's round


def test_image_invert_flips_every_value():
    image = torch.rand(1, 3, 4, 3)
    assert torch.equal(ImageInvert(image)[0], 1.0 - image)


def test_image_batch_resizes_the_second_image_to_the_first():
    first, second = torch.rand(1, 8, 8, 3), torch.rand(2, 4, 8, 3)
    (batch,) = ImageBatch(first, second)
    expected = F.interpolate(second[:, :, 2:6].movedim(-1, 1), size=(8, 8), mode="bilinear").movedim(1, -1)
    assert batch.shape == (3, 8, 8, 3)
    assert torch.equal(batch[0], first[0]) and torch.allclose(batch[1:], expected)


def test_image_batch_names_a_channel_mismatch():
    with pytest.raises(ValueError, match="image2: 4 channels"):
        ImageBatch(torch.rand(1, 4, 4, 3), torch.rand(1, 4, 4, 4))


def test_image_nodes_name_the_input_that_is_not_an_image():
    with pytest.raises(ValueError, match=r"image: an IMAGE must be a \[B, H, W, C\] tensor, got \(4, 4\)"):
        ImageInvert(torch.rand(4, 4))


def reference_outpaint_mask(height, width, top, bottom, left, right, feathering):
    """ComfyUI's feathering rule, pixel by pixel."""
    mask = torch.zeros(height, width)
    if not (feathering > 0 and feathering * 2 < height and feathering * 2 < width):
        return mask
    for i in range(height):
        for j in range(width):
            d = min(i if top else height, height - i if bottom else height,
                    j if left else width, width - j if right else width)
            if d < feathering:
                mask[i, j] = ((feathering - d) / feathering) ** 2
    return mask


@pytest.mark.parametrize("left, top, right, bottom, feathering",
                         [(8, 0, 16, 8, 5), (0, 8, 0, 8, 3), (8, 8, 8, 8, 0), (16, 0, 0, 0, 20)])
def test_pad_for_outpaint_adds_grey_borders_and_a_feathered_mask(left, top, right, bottom, feathering):
    image = torch.rand(2, 20, 24, 3)
    padded, mask = ImagePadForOutpaint(image, left, top, right, bottom, feathering)
    assert padded.shape == (2, 20 + top + bottom, 24 + left + right, 3) and mask.shape == (1, *padded.shape[1:3])
    assert torch.equal(padded[:, top:top + 20, left:left + 24], image)
    border = torch.ones(padded.shape[1:3], dtype=torch.bool)
    border[top:top + 20, left:left + 24] = False
    assert torch.all(padded[:, border] == 0.5) and torch.all(mask[0, border] == 1.0)
    inner = mask[0, top:top + 20, left:left + 24]
    assert torch.allclose(inner, reference_outpaint_mask(20, 24, top, bottom, left, right, feathering))


def test_image_crop_cuts_the_region_and_stops_at_the_edges():
    image = torch.rand(2, 10, 12, 3)
    assert torch.equal(ImageCrop(image, 4, 3, 5, 2)[0], image[:, 2:5, 5:9])
    assert torch.equal(ImageCrop(image, 8, 8, 20, 9)[0], image[:, 9:, 11:])  # offsets past the edge clamp


def test_repeat_image_batch_repeats_the_whole_batch():
    image = torch.rand(2, 3, 3, 3)
    (repeated,) = RepeatImageBatch(image, 3)
    assert repeated.shape == (6, 3, 3, 3) and torch.equal(repeated[4:], image)


def test_image_from_batch_clamps_index_and_length_to_the_batch():
    image = torch.rand(4, 2, 2, 3)
    assert torch.equal(ImageFromBatch(image, 1, 2)[0], image[1:3])
    assert torch.equal(ImageFromBatch(image, 9, 5)[0], image[3:])


def test_empty_image_is_filled_with_the_rgb_colour():
    (image,) = EmptyImage(5, 4, 2, 0xFF8000)
    assert image.shape == (2, 4, 5, 3)
    assert torch.equal(image.reshape(-1, 3).unique(dim=0), torch.tensor([[1.0, 128 / 255, 0.0]]))


def test_image_composite_masked_pastes_the_source_clipped_at_the_edges():
    destination, source = torch.zeros(2, 6, 8, 3), torch.ones(1, 4, 4, 3)
    (result,) = ImageCompositeMasked(destination, source, 6, 3, False)
    expected = torch.zeros(2, 6, 8, 3)
    expected[:, 3:, 6:] = 1.0
    assert torch.equal(result, expected) and torch.all(destination == 0)


def test_image_composite_masked_blends_by_the_mask_resized_to_the_source():
    destination, source = torch.zeros(1, 4, 4, 3), torch.ones(1, 4, 4, 3)
    mask = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    (result,) = ImageCompositeMasked(destination, source, 0, 0, False, mask)
    weight = F.interpolate(mask.unsqueeze(1), size=(4, 4), mode="bilinear")[0, 0]
    assert torch.allclose(result[0, ..., 0], weight)


def test_image_composite_masked_can_resize_the_source_to_the_destination():
    (result,) = ImageCompositeMasked(torch.zeros(1, 6, 6, 3), torch.ones(1, 2, 3, 3), 0, 0, True)
    assert torch.equal(result, torch.ones(1, 6, 6, 3))
