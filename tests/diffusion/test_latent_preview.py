"""Live previews: the latent -> RGB projection fitted to a VAE, the preview image, the rate limit."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from diffusion.latent_preview import (
    PreviewThrottle,
    fit_latent_to_rgb,
    latent_to_rgb,
    latent_to_rgb_image,
    preview_jpeg,
)
from diffusion.tiny_models import tiny_vae_weights
from diffusion.vae import TINY_VAE, AutoencoderKL

AFFINE_WEIGHTS = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4], [0.2, 0.2, 0.2], [-0.1, 0.0, 0.6]])
AFFINE_BIAS = torch.tensor([0.05, -0.1, 0.2])


class AffineDecoderVAE:
    """Stands in for AutoencoderKL: decodes each latent pixel to a known affine colour, 8x upsampled."""

    config = SimpleNamespace(z_channels=4, scale_factor=0.18215)
    dtype = torch.float32
    encoder = SimpleNamespace(conv_in=SimpleNamespace(weight=torch.zeros(1)))

    def decode(self, latent):
        rgb = latent.permute(0, 2, 3, 1) @ AFFINE_WEIGHTS + AFFINE_BIAS
        return F.interpolate(rgb.permute(0, 3, 1, 2), scale_factor=8, mode="nearest")


@pytest.fixture(scope="module")
def tiny_vae():
    vae = AutoencoderKL(TINY_VAE)
    vae.load_state_dict(tiny_vae_weights(0))
    return vae.eval()


def test_the_fit_recovers_an_affine_decoder_exactly():
    factors = fit_latent_to_rgb(AffineDecoderVAE())
    assert factors.shape == (5, 3)
    torch.testing.assert_close(factors[:4], AFFINE_WEIGHTS, atol=1e-5, rtol=0)
    torch.testing.assert_close(factors[4], AFFINE_BIAS, atol=1e-5, rtol=0)


def test_the_fit_on_a_random_vae_predicts_held_out_colours_better_than_its_mean(tiny_vae):
    # A random-weight VAE is far from linear; the fit must still beat the constant (bias-only) guess.
    factors = fit_latent_to_rgb(tiny_vae)
    generator = torch.Generator().manual_seed(7)
    latent = F.interpolate(torch.randn(2, 4, 3, 3, generator=generator), size=(8, 8), mode="bilinear") / 0.18215
    with torch.inference_mode():
        decoded = F.avg_pool2d(tiny_vae.decode(latent), 8).permute(0, 2, 3, 1)
    predicted = latent.permute(0, 2, 3, 1) @ factors[:4] + factors[4]
    residual = (predicted - decoded).pow(2).mean()
    constant_guess = (factors[4] - decoded).pow(2).mean()
    assert residual < 0.9 * constant_guess, (residual.item(), constant_guess.item())


def test_the_fit_is_deterministic(tiny_vae):
    assert torch.equal(fit_latent_to_rgb(tiny_vae), fit_latent_to_rgb(tiny_vae))


def test_latent_to_rgb_maps_minus_one_to_one_onto_zero_to_one():
    factors = torch.zeros(5, 3)
    factors[4] = torch.tensor([-1.0, 0.0, 1.0])
    rgb = latent_to_rgb(torch.zeros(1, 4, 2, 2), factors)
    assert rgb.shape == (1, 2, 2, 3)
    assert rgb[0, 0, 0].tolist() == [0.0, 0.5, 1.0]


def test_latent_to_rgb_refuses_factors_for_other_channel_counts():
    with pytest.raises(ValueError, match="does not fit preview factors for 4 channels"):
        latent_to_rgb(torch.zeros(1, 16, 2, 2), torch.zeros(5, 3))


def test_preview_image_is_the_first_latent_upscaled_to_its_decoded_size():
    factors = torch.zeros(5, 3)
    factors[0] = 1.0
    latent = torch.zeros(2, 4, 8, 6)
    latent[0, 0, 0, 0] = 1.0
    latent[1] = -1.0
    image = latent_to_rgb_image(latent, factors)
    assert image.mode == "RGB" and image.size == (48, 64)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((47, 63)) == (128, 128, 128)


def test_preview_image_long_side_stays_within_the_limit():
    assert latent_to_rgb_image(torch.zeros(1, 4, 100, 40), torch.zeros(5, 3)).size == (200, 500)


def test_preview_jpeg_is_a_jpeg_tuple():
    kind, data = preview_jpeg(torch.zeros(1, 4, 8, 8), torch.zeros(5, 3))
    assert kind == "JPEG" and data[:2] == b"\xff\xd8"


def test_throttle_lets_through_at_most_the_rate_and_always_a_forced_one():
    now = [0.0]
    throttle = PreviewThrottle(max_per_second=4, clock=lambda: now[0])
    sent = []
    for step in range(10):
        now[0] = step * 0.1
        sent.append(throttle.ready(force=step == 9))
    assert sent == [True, False, False, True, False, False, True, False, False, True]


def test_throttle_refuses_a_rate_of_zero():
    with pytest.raises(ValueError, match="max_per_second must be positive"):
        PreviewThrottle(0)
