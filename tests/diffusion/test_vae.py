"""The LDM AutoencoderKL against diffusers' AutoencoderKL on the same (perturbed, random) weights, fp32 CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from unet_vae_support import (
    PARITY_TOLERANCE,
    ablated_outputs,
    normalised_error,
    reference_vae,
    vae_from_reference,
)

from diffusion.vae import SD3_VAE, SD_VAE, TINY_SD3_VAE, TINY_VAE, AttnBlock, AutoencoderKL, ResnetBlock, VAEConfig

TINY_VAES = {"sd": TINY_VAE, "sd3": TINY_SD3_VAE}


@pytest.fixture(scope="module", params=list(TINY_VAES), ids=list(TINY_VAES))
def vae_pair(request):
    config = TINY_VAES[request.param]
    reference = reference_vae(config)
    return config, reference, vae_from_reference(reference, config)


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    return vae_from_reference(reference_vae(TINY_VAE), TINY_VAE)


def _pixels(batch: int, height: int, width: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latent(config: VAEConfig, batch: int, height: int, width: int, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.z_channels, height, width, generator=generator)


@torch.no_grad()
@pytest.mark.parametrize("size", [(32, 32), (24, 40)], ids=["32x32", "24x40"])
def test_encoded_mean_and_logvar_match_diffusers(vae_pair, size):
    config, reference, ours = vae_pair
    pixels = _pixels(2, *size)
    posterior = reference.encode(pixels).latent_dist
    mean, logvar = ours.encode_distribution(pixels)
    assert normalised_error(mean, posterior.mean) < PARITY_TOLERANCE
    assert normalised_error(logvar, posterior.logvar) < PARITY_TOLERANCE
    assert torch.equal(ours.encode(pixels), mean)


@torch.no_grad()
def test_decode_matches_diffusers(vae_pair):
    config, reference, ours = vae_pair
    latent = _latent(config, 2, 8, 6)
    assert normalised_error(ours.decode(latent), reference.decode(latent).sample) < PARITY_TOLERANCE


@torch.no_grad()
def test_no_block_is_numerically_invisible(tiny_vae):
    # model-formats 10.2: zeroing any block's output projection must move the encoding (encoder blocks) or
    # the decoding (decoder blocks) by at least 100x the parity tolerance.
    def output_layers(part: torch.nn.Module) -> dict[str, torch.nn.Module]:
        return {
            name: module.conv2 if isinstance(module, ResnetBlock) else module.proj_out
            for name, module in part.named_modules()
            if isinstance(module, (ResnetBlock, AttnBlock))
        }

    encoder_layers, decoder_layers = output_layers(tiny_vae.encoder), output_layers(tiny_vae.decoder)
    assert (len(encoder_layers), len(decoder_layers)) == (4 * 2 + 3, 4 * 3 + 3)  # levels x resnets + mid
    pixels, latent = _pixels(1, 32, 32), _latent(TINY_VAE, 1, 4, 4)
    changes = ablated_outputs(encoder_layers, lambda batch: tiny_vae.encode(batch["pixels"]), {"pixels": pixels})
    changes |= ablated_outputs(decoder_layers, lambda batch: tiny_vae.decode(batch["latent"]), {"latent": latent})
    weakest = min(changes, key=changes.get)
    assert changes[weakest] > 100 * PARITY_TOLERANCE, (weakest, changes[weakest])


@torch.no_grad()
def test_logvar_is_clamped_to_minus_30_and_20():
    model = AutoencoderKL(TINY_VAE).eval()
    z = TINY_VAE.z_channels
    model.quant_conv.bias[z:] = 1000.0
    assert torch.equal(model.encode_distribution(_pixels(1, 16, 16))[1], torch.full((1, z, 2, 2), 20.0))
    model.quant_conv.bias[z:] = -1000.0
    assert torch.equal(model.encode_distribution(_pixels(1, 16, 16))[1], torch.full((1, z, 2, 2), -30.0))


@torch.no_grad()
def test_decode_of_a_batch_item_does_not_depend_on_the_rest(tiny_vae):
    latent = _latent(TINY_VAE, 2, 4, 4)
    assert normalised_error(tiny_vae.decode(latent)[:1], tiny_vae.decode(latent[:1])) < PARITY_TOLERANCE


@torch.no_grad()
def test_meta_construction_loads_with_assign_and_matches(tiny_vae):
    model = AutoencoderKL(TINY_VAE, device="meta")
    assert list(model.buffers()) == []
    model.load_state_dict(tiny_vae.state_dict(), strict=True, assign=True)
    latent = _latent(TINY_VAE, 1, 4, 4)
    assert torch.equal(model.decode(latent), tiny_vae.decode(latent))


def test_sd_vae_has_the_published_parameter_count():
    assert sum(p.numel() for p in AutoencoderKL(SD_VAE, device="meta").parameters()) == 83_653_863


@torch.no_grad()
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    # Through the whole decoder: measured 4.3e-3 in fp16 (11 mantissa bits) and 4.8e-2 in bf16 (8 bits).
    [(torch.float16, 1e-2), (torch.bfloat16, 1e-1)],
    ids=["float16", "bfloat16"],
)
def test_half_precision_decode_stays_close_to_float32(tiny_vae, dtype, tolerance):
    latent = _latent(TINY_VAE, 1, 8, 8)
    expected = tiny_vae.decode(latent)
    half_model = AutoencoderKL(TINY_VAE, dtype=dtype)
    half_model.load_state_dict(tiny_vae.state_dict())
    decoded = half_model.decode(latent)
    assert decoded.dtype == torch.float32
    assert normalised_error(decoded, expected) < tolerance


def test_latent_format_applies_the_vaes_scale_and_shift():
    latent_format = AutoencoderKL(SD3_VAE, device="meta").latent_format
    latent = torch.tensor([0.0609, 1.0609, -0.9391])
    torch.testing.assert_close(latent_format.process_in(latent), torch.tensor([0.0, 1.5305, -1.5305]))
    torch.testing.assert_close(latent_format.process_out(latent_format.process_in(latent)), latent)
    sd = AutoencoderKL(SD_VAE, device="meta").latent_format
    torch.testing.assert_close(sd.process_in(torch.tensor([1.0])), torch.tensor([0.18215]))


class _LocalDecoder:
    """A stand-in decoder with no receptive field beyond one latent pixel: tiles of it blend exactly."""

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        return F.interpolate(latent[:, :3] * 0.5 + latent[:, 3:4], scale_factor=8.0, mode="nearest")


def test_tiled_decode_reassembles_a_local_decoder_exactly(monkeypatch):
    model = AutoencoderKL(TINY_VAE, device="meta")
    monkeypatch.setattr(model, "_decode_full", _LocalDecoder())
    latent = _latent(TINY_VAE, 2, 29, 18)
    tiled = model.decode_tiled(latent, tile=8, overlap=3)
    torch.testing.assert_close(tiled, _LocalDecoder()(latent), rtol=0, atol=1e-6)


def _seam_ratio(error: torch.Tensor, borders: list[int]) -> float:
    """Mean |column-to-column step| of ``error`` across ``borders`` over the mean everywhere."""
    steps = (error[..., 1:] - error[..., :-1]).abs().mean(dim=(0, 1, 2))
    return (steps[borders].mean() / steps.mean()).item()


@torch.no_grad()
def test_tiled_decode_stays_close_to_full_decode_without_seams(tiny_vae):
    # Two 16-wide latent tiles at offsets 0 and 10 of 26 overlap by 6: hard tiles jump where tile 1 starts
    # (pixel column 80) and tile 0 ends (128); the error against the full decode shows those jumps.
    latent = _latent(TINY_VAE, 1, 16, 26)
    full = tiny_vae.decode(latent)
    borders = [10 * 8 - 1, 16 * 8 - 1]
    blended = tiny_vae.decode_tiled(latent, tile=16, overlap=6)
    hard = tiny_vae.decode_tiled(latent, tile=16, overlap=0)
    # Loose: GroupNorm statistics and the mid attention see one tile only.
    assert (blended - full).abs().mean() < 0.35 * full.std()
    assert _seam_ratio(hard - full, borders) > 1.7
    assert _seam_ratio(blended - full, borders) < 1.4


@torch.no_grad()
def test_tiled_decode_of_a_latent_smaller_than_a_tile_is_the_full_decode(tiny_vae):
    latent = _latent(TINY_VAE, 1, 6, 5)
    assert torch.equal(tiny_vae.decode_tiled(latent, tile=8, overlap=2), tiny_vae.decode(latent))


def test_tiled_decode_refuses_an_overlap_as_wide_as_the_tile(tiny_vae):
    with pytest.raises(ValueError, match="0 <= overlap < tile, got tile=8, overlap=8"):
        tiny_vae.decode_tiled(_latent(TINY_VAE, 1, 4, 4), tile=8, overlap=8)


def _out_of_memory_above(model: AutoencoderKL, monkeypatch, max_side: int) -> list[tuple[int, int]]:
    """Makes decodes of latents wider than ``max_side`` raise OOM; returns the sizes attempted."""
    attempts = []
    full_decode = model._decode_full

    def limited(latent):
        attempts.append(tuple(latent.shape[-2:]))
        if max(latent.shape[-2:]) > max_side:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return full_decode(latent)

    monkeypatch.setattr(model, "_decode_full", limited)
    return attempts


@torch.no_grad()
def test_decode_falls_back_to_smaller_tiles_on_out_of_memory(tiny_vae, monkeypatch):
    latent = _latent(TINY_VAE, 1, 36, 20)
    attempts = _out_of_memory_above(tiny_vae, monkeypatch, max_side=32)
    decoded = tiny_vae.decode(latent, tiled_fallback=True)
    # The full decode fails; a 64-tile would cover it all (the same decode again), so 32-tiles come next.
    assert attempts == [(36, 20), (32, 20), (32, 20)]
    assert decoded.shape == (1, 3, 288, 160)
    monkeypatch.undo()
    assert torch.equal(decoded, tiny_vae.decode_tiled(latent, tile=32, overlap=4))


def test_decode_without_fallback_lets_out_of_memory_through(tiny_vae, monkeypatch):
    _out_of_memory_above(tiny_vae, monkeypatch, max_side=2)
    with pytest.raises(torch.OutOfMemoryError):
        tiny_vae.decode(_latent(TINY_VAE, 1, 4, 4))


def test_config_widths_must_divide_into_groups():
    with pytest.raises(ValueError, match="VAE width 48 is not divisible by num_groups=32"):
        VAEConfig(ch=48)
