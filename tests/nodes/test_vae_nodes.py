"""VAE nodes: parity with diffusers' AutoencoderKL on the same tiny weights, cropping, tiling, inpaint encode."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import cli
from diffusion.tiny_models import write_tiny_diffusers_folder
from engine import ExecutionContext, Executor, NodeResult, Socket, node
from engine.events import Progress
from nodes.values import VaeHandle
from diffusion.vae import blend_tiles
from nodes.vae import (VAEDecode, VAEDecodeTiled, VAEEncode, VAEEncodeForInpaint, VAEEncodeTiled, latent_tiling,
                       grow_mask)


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    # Seed 0, as the session's tiny-sd1 checkpoint: the very same VAE weights in diffusers' layout.
    folder = write_tiny_diffusers_folder(tmp_path_factory.mktemp("vae_nodes") / "tiny-sd1", "sd1")
    return AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval()


@pytest.fixture
def vae(sd1_handles):
    return sd1_handles[2]


@pytest.fixture
def recorded(node_settings):
    """(context, progress reports) for calling VAE nodes directly."""
    reports = []
    context = ExecutionContext("7", "prompt", "VAENode", node_settings,
                               lambda value, maximum, preview: reports.append((value, maximum)), lambda: False)
    return context, reports


def _image(batch, height, width, seed=0, channels=3):
    return torch.rand(batch, height, width, channels, generator=torch.Generator().manual_seed(seed))


def _latent(batch, height, width, seed=1):
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))


def test_vae_encode_equals_the_diffusers_posterior_mean(vae, diffusers_vae, recorded):
    pixels = _image(2, 32, 40)
    (latent,) = VAEEncode(pixels, vae, context=recorded[0])
    with torch.no_grad():
        reference = diffusers_vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()
    assert latent["samples"].shape == (2, 4, 4, 5) and latent["samples"].dtype == torch.float32
    # measured 4e-7 relative to the latent's scale; fp32 CPU parity is 1e-5 (model-formats.md 10.4)
    assert (latent["samples"] - reference).abs().max() < 1e-5 * reference.abs().max()


def test_vae_decode_equals_diffusers_mapped_to_an_image(vae, diffusers_vae, recorded):
    latent = _latent(1, 4, 6)
    (image,) = VAEDecode({"samples": latent}, vae, context=recorded[0])
    with torch.no_grad():
        reference = ((diffusers_vae.decode(latent).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert image.shape == (1, 32, 48, 3) and image.dtype == torch.float32 and image.device.type == "cpu"
    assert (image - reference).abs().max() < 1e-5
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_vae_encode_centre_crops_sizes_that_are_not_multiples_of_8(vae, recorded, caplog):
    pixels = _image(1, 38, 45)
    with caplog.at_level(logging.INFO, logger="nodes.vae"):
        (latent,) = VAEEncode(pixels, vae, context=recorded[0])
    # 38 % 8 = 6 -> rows 3..35; 45 % 8 = 5 -> columns 2..42 (ComfyUI's centring)
    (expected,) = VAEEncode(pixels[:, 3:35, 2:42].contiguous(), vae, context=recorded[0])
    assert torch.equal(latent["samples"], expected["samples"])
    assert "cropped pixels from 45x38 to 40x32" in caplog.text and "node 7" in caplog.text


def test_vae_encode_ignores_an_alpha_channel(vae, recorded):
    rgba = _image(1, 16, 16, channels=4)
    (with_alpha,) = VAEEncode(rgba, vae, context=recorded[0])
    (rgb,) = VAEEncode(rgba[..., :3].contiguous(), vae, context=recorded[0])
    assert torch.equal(with_alpha["samples"], rgb["samples"])


def test_a_bfloat16_vae_runs_in_its_dtype_and_returns_float32(vae, recorded):
    half = VaeHandle(copy.deepcopy(vae.vae).to(torch.bfloat16))
    latent = _latent(1, 4, 4)
    (image,) = VAEDecode({"samples": latent}, half, context=recorded[0])
    (full,) = VAEDecode({"samples": latent}, vae, context=recorded[0])
    assert image.dtype == torch.float32
    assert 0 < (image - full).abs().max() < 0.05  # bfloat16 round-off, not another computation


@pytest.mark.parametrize(("pixels", "message"), [
    (torch.rand(0, 16, 16, 3), "pixels: the image batch is empty"),
    (torch.rand(1, 6, 16, 3), "pixels: the image is 16x6; the VAE needs at least 8x8 pixels"),
    (torch.rand(1, 16, 16, 1), "pixels: the image has 1 channel"),
    (torch.rand(16, 16, 3), r"pixels: an IMAGE must be a \[B, H, W, C\] tensor"),
])
def test_vae_encode_refuses_images_it_cannot_take(vae, recorded, pixels, message):
    with pytest.raises(ValueError, match=message):
        VAEEncode(pixels, vae, context=recorded[0])


def test_vae_decode_refuses_a_latent_of_another_width(vae, recorded):
    with pytest.raises(ValueError, match="samples: the latent has 16 channels but this VAE decodes 4"):
        VAEDecode({"samples": torch.zeros(1, 16, 4, 4)}, vae, context=recorded[0])


def test_vae_nodes_refuse_a_missing_vae(recorded):
    with pytest.raises(ValueError, match="vae: the input is not a VAE"):
        VAEDecode({"samples": torch.zeros(1, 4, 4, 4)}, None, context=recorded[0])


def test_blended_tiles_reassemble_a_local_operation_exactly():
    # An 8x nearest upscale is local, so every tile agrees with the whole wherever tiles overlap.
    latent = _latent(2, 21, 13)
    upscale = lambda piece: F.interpolate(piece, scale_factor=8.0, mode="nearest")  # noqa: E731
    reports = []
    tiled = blend_tiles(upscale, latent, (21, 13), tile=8, overlap=3, source_scale=1, result_scale=8,
                        result_channels=4, on_tile=lambda done, total: reports.append((done, total)))
    torch.testing.assert_close(tiled, upscale(latent), rtol=0, atol=1e-6)
    # rows start at 0, 5, 10, 13 and columns at 0, 5: eight tiles, each reported once, in order
    assert reports == [(done, 8) for done in range(1, 9)]


def test_tiled_decode_stays_close_to_the_full_decode_and_reports_each_tile(vae, recorded):
    context, reports = recorded
    samples = {"samples": _latent(1, 16, 24)}
    (full,) = VAEDecode(samples, vae, context=context)
    # 128-pixel tiles = 16 latent with a 32-pixel (4 latent) overlap: tiles start at columns 0 and 8
    (tiled,) = VAEDecodeTiled(samples, vae, 128, 32, 64, 8, context=context)
    (hard,) = VAEDecodeTiled(samples, vae, 128, 0, 64, 8, context=context)
    assert tiled.shape == full.shape == (1, 128, 192, 3)
    # Loose: GroupNorm statistics and the mid attention see one tile only (diffusion/vae.py); measured
    # 0.087 std, and the blended overlap takes the worst pixel from 0.49 (hard edges) to 0.27.
    assert (tiled - full).abs().mean() < 0.15 * full.std()
    assert (tiled - full).abs().max() < 0.7 * (hard - full).abs().max()
    assert reports == [(1, 2), (2, 2), (1, 2), (2, 2)]


def test_tiling_counts_latent_pixels_and_cuts_an_overlap_over_a_quarter_of_the_tile():
    assert latent_tiling(512, 64, 8) == (64, 8)
    assert latent_tiling(128, 96, 8) == (16, 4)  # 96 > 128 / 4: the overlap becomes 32 pixels
    assert latent_tiling(64, 0, 8) == (8, 0)


def test_tiled_decode_with_a_tile_over_the_whole_latent_is_the_full_decode(vae, recorded):
    samples = {"samples": _latent(1, 6, 5)}
    (full,) = VAEDecode(samples, vae, context=recorded[0])
    (tiled,) = VAEDecodeTiled(samples, vae, 64, 0, 64, 8, context=recorded[0])
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-6)


def test_tiled_encode_stays_close_to_the_full_encode(vae, recorded):
    context, reports = recorded
    pixels = _image(1, 128, 192)
    (full,) = VAEEncode(pixels, vae, context=context)
    (tiled,) = VAEEncodeTiled(pixels, vae, 128, 32, 64, 8, context=context)
    assert tiled["samples"].shape == full["samples"].shape == (1, 4, 16, 24)
    # measured 0.072 std (the encoder's GroupNorms and mid attention see one tile)
    assert (tiled["samples"] - full["samples"]).abs().mean() < 0.15 * full["samples"].std()
    assert reports == [(1, 2), (2, 2)]


def test_an_encode_out_of_memory_retries_in_512_pixel_tiles(vae, recorded, monkeypatch, caplog):
    pixels = _image(1, 8, 600)
    (whole,) = VAEEncode(pixels, vae, context=recorded[0])
    full_encode, widths = vae.vae.encode, []

    def limited(batch):
        widths.append(batch.shape[-1])
        if batch.shape[-1] > 512:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return full_encode(batch)

    monkeypatch.setattr(vae.vae, "encode", limited)
    with caplog.at_level(logging.WARNING, logger="nodes.vae"):
        (tiled,) = VAEEncode(pixels, vae, context=recorded[0])
    assert widths == [600, 512, 512]  # the whole, then tiles at latent columns 0 and 11 of 75
    assert tiled["samples"].shape == whole["samples"].shape == (1, 4, 1, 75)
    assert (tiled["samples"] - whole["samples"]).abs().mean() < 0.15 * whole["samples"].std()  # measured 0.076
    assert "VAE encode ran out of memory; retrying in 512-pixel tiles" in caplog.text


def _square_mask(size, top, bottom):
    mask = torch.zeros(1, size, size)
    mask[:, top:bottom, top:bottom] = 1.0
    return mask


def test_grow_mask_extends_a_square_like_comfyui(recorded):
    # A 6-wide kernel padded by 3: output pixel i sees input i-3 .. i+2, so rows 8..15 grow to 6..18.
    grown = grow_mask(_square_mask(32, 8, 16)[:, None], 6)
    rows = grown[0, 0].nonzero()
    assert grown.shape == (1, 1, 32, 32)
    assert rows.min(dim=0).values.tolist() == [6, 6] and rows.max(dim=0).values.tolist() == [18, 18]
    assert grown.sum() == 13 * 13


def test_inpaint_encode_greys_the_masked_pixels_and_sets_the_grown_noise_mask(vae, recorded):
    pixels, mask = _image(1, 32, 32), _square_mask(32, 8, 16)
    (latent,) = VAEEncodeForInpaint(pixels, vae, mask, 6, context=recorded[0])
    greyed = pixels.clone()
    greyed[:, 8:16, 8:16] = 0.5
    (expected,) = VAEEncode(greyed, vae, context=recorded[0])
    torch.testing.assert_close(latent["samples"], expected["samples"], rtol=0, atol=1e-6)
    assert torch.equal(latent["noise_mask"], grow_mask(mask[:, None], 6))


def test_inpaint_encode_takes_a_smaller_mask_of_the_same_aspect(vae, recorded):
    pixels = _image(1, 32, 32)
    (small,) = VAEEncodeForInpaint(pixels, vae, _square_mask(16, 4, 8), 0, context=recorded[0])
    (full,) = VAEEncodeForInpaint(pixels, vae, _square_mask(32, 8, 16), 0, context=recorded[0])
    assert small["noise_mask"].shape == (1, 1, 32, 32)
    # bilinear upsampling then rounding recovers the full-size square but for its soft edge rows
    assert (small["noise_mask"] != full["noise_mask"]).float().mean() < 0.05


def test_inpaint_encode_refuses_a_mask_of_another_shape(vae, recorded):
    with pytest.raises(ValueError, match="mask: the mask is 32x16 but pixels is 32x32"):
        VAEEncodeForInpaint(_image(1, 32, 32), vae, torch.ones(1, 16, 32), 6, context=recorded[0])


def test_inpaint_encode_refuses_a_mask_batch_that_does_not_fit(vae, recorded):
    with pytest.raises(ValueError, match="mask: 2 masks for a batch of 3"):
        VAEEncodeForInpaint(_image(3, 16, 16), vae, torch.zeros(2, 16, 16), 6, context=recorded[0])


def test_vae_node_schemas_match_comfyui():
    assert VAEDecodeTiled.object_info()["input_order"]["required"] == [
        "samples", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap"]
    assert VAEDecodeTiled.object_info()["input"]["required"]["tile_size"] == [
        "INT", {"default": 512, "min": 64, "max": 4096, "step": 32}]
    assert VAEEncodeTiled.object_info()["input"]["required"]["tile_size"][1]["step"] == 64
    assert VAEEncodeForInpaint.object_info()["input"]["required"]["grow_mask_by"] == [
        "INT", {"default": 6, "min": 0, "max": 64, "step": 1}]
    assert [o.type for o in (VAEEncode.outputs + VAEDecode.outputs)] == ["LATENT", "IMAGE"]


@node(category="test", output_node=True)
def RecordDecodedShape(images: Socket("IMAGE")) -> NodeResult:
    return NodeResult(ui={"shape": list(images.shape)})


def test_an_old_tiled_decode_workflow_runs_through_the_executor_with_tile_progress(node_settings, tiny_names):
    registry = cli.load_registry([])
    registry.register(RecordDecodedShape)
    executor = Executor(registry, settings=node_settings)
    events = []
    executor.subscribe(events.append)
    # Saved before `overlap` and the temporal inputs existed: they take their defaults (overlap 64 -> 16).
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_names.sd1}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["2", 0], "vae": ["1", 2], "tile_size": 64}},
        "4": {"class_type": "RecordDecodedShape", "inputs": {"images": ["3", 0]}},
    }
    result = executor.execute(prompt)
    assert result.ok, result.error
    assert result.outputs["4"] == {"shape": [1, 64, 128, 3]}
    # 8-latent tiles with a 2-latent overlap over 16 columns start at 0, 6 and 8
    assert [(e.value, e.max) for e in events if isinstance(e, Progress) and e.node == "3"] == [(1, 3), (2, 3), (3, 3)]
