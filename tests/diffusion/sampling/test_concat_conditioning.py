"""Concat conditioning: extra input channels (an inpainting UNet's mask and masked-image latent) join every
model call's input after the c_in scaling, repeated to the batch and cut to each entry's area like x.

The stand-in network records its inputs and predicts eps = 0 from the first 4 channels, so D = x.
"""
from __future__ import annotations

import pytest
import torch

from diffusion.inpaint import inpaint_concat
from diffusion.latent_format import LatentFormat
from diffusion.sampling import SamplingModel, sample_custom
from diffusion.sampling.guidance import CFGDenoiser, CondBatcher, Condition

SHAPE = (2, 4, 8, 8)
SD_FORMAT = LatentFormat(0.18215, 0.0)


class RecordingNetwork:
    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x, timestep, context, y=None):
        self.inputs.append(x.clone())
        return torch.zeros_like(x[:, :4])


def _prompt(value: float, **extras):
    return [torch.full((1, 77, 16), value), extras]


def _denoiser(sd_sampling, network, concat, positive=None, cfg=7.0):
    conds = [[Condition.from_comfy(c) for c in (positive or [_prompt(1.0)])],
             [Condition.from_comfy(_prompt(0.0))]]
    return CFGDenoiser(CondBatcher(network, sd_sampling, conds, SHAPE, concat=concat), cfg)


@pytest.fixture
def x():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def concat():
    return torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(1))


def test_concat_follows_the_scaled_latent_for_cond_and_uncond(sd_sampling, x, concat):
    network = RecordingNetwork()
    sigma = float(sd_sampling.sigmas[400])
    denoised = _denoiser(sd_sampling, network, concat)(x, sigma)
    [model_input] = network.inputs
    assert model_input.shape == (4, 9, 8, 8)  # (cond, uncond) x 2 latents, 4 + 5 channels
    scaled = x * sd_sampling.c_in(sigma)
    torch.testing.assert_close(model_input[:, :4], torch.cat([scaled, scaled]))
    assert torch.equal(model_input[:, 4:], torch.cat([concat, concat]))
    torch.testing.assert_close(denoised, x)


def test_a_batch_one_concat_serves_every_latent(sd_sampling, x, concat):
    network = RecordingNetwork()
    _denoiser(sd_sampling, network, concat[:1])(x, float(sd_sampling.sigmas[400]))
    assert torch.equal(network.inputs[0][:, 4:], concat[:1].expand(4, -1, -1, -1))


def test_an_area_condition_sees_its_area_of_the_concat(sd_sampling, x, concat):
    network = RecordingNetwork()
    positive = [_prompt(1.0, area=(4, 3, 2, 5))]  # (h, w, y, x) in latent pixels
    _denoiser(sd_sampling, network, concat, positive)(x, float(sd_sampling.sigmas[400]))
    shapes = sorted(tuple(i.shape) for i in network.inputs)
    assert shapes == [(2, 9, 4, 3), (2, 9, 8, 8)]
    area_input = next(i for i in network.inputs if i.shape[-1] == 3)
    assert torch.equal(area_input[:, 4:], concat[:, :, 2:6, 5:8])


def test_without_concat_the_model_input_is_the_latent_alone(sd_sampling, x):
    network = RecordingNetwork()
    _denoiser(sd_sampling, network, None)(x, float(sd_sampling.sigmas[400]))
    assert network.inputs[0].shape == (4, 4, 8, 8)


def test_a_concat_of_another_size_is_refused(sd_sampling):
    with pytest.raises(ValueError, match=r"concat conditioning is \(4, 4\) latent pixels but the latent is \(8, 8\)"):
        _denoiser(sd_sampling, RecordingNetwork(), torch.zeros(1, 5, 4, 4))


def test_sample_custom_passes_the_models_concat_to_every_call(sd_sampling, concat):
    network = RecordingNetwork()
    model = SamplingModel(network, sd_sampling, concat=concat)
    sigmas = torch.tensor([float(sd_sampling.sigmas[900]), float(sd_sampling.sigmas[300]), 0.0])
    sample_custom(model, [_prompt(1.0)], [_prompt(0.0)], torch.zeros(SHAPE), sigmas, "euler", seed=0, cfg=5.0)
    assert len(network.inputs) == 2
    assert all(torch.equal(i[:, 4:], torch.cat([concat, concat])) for i in network.inputs)


def test_the_inpaint_concat_is_the_rounded_latent_mask_and_the_latent_in_model_space():
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    noise_mask = torch.zeros(1, 1, 64, 64)
    noise_mask[..., 0:28, 0:36] = 1.0  # bilinear to 8x8 gives 0.5 on row 3 and column 4 (rounded to 0)
    concat = inpaint_concat(latent, noise_mask, SD_FORMAT, None)
    expected_mask = torch.zeros(8, 8)
    expected_mask[0:3, 0:4] = 1.0
    assert concat.shape == (1, 5, 8, 8)
    assert torch.equal(concat[0, 0], expected_mask)
    torch.testing.assert_close(concat[:, 1:], latent * 0.18215)


def test_without_a_noise_mask_the_inpaint_concat_is_all_ones_and_the_grey_latent():
    blank = torch.tensor([1.0, -2.0, 0.5, 3.0])
    concat = inpaint_concat(torch.zeros(2, 4, 3, 5), None, SD_FORMAT, blank)
    assert torch.equal(concat[:, 0], torch.ones(2, 3, 5))
    torch.testing.assert_close(concat[:, 1:], (blank * 0.18215).reshape(1, 4, 1, 1).expand(2, 4, 3, 5))


def test_without_a_noise_mask_or_a_grey_latent_the_inpaint_concat_is_refused():
    with pytest.raises(ValueError, match="no noise_mask and the model has no grey-image latent"):
        inpaint_concat(torch.zeros(1, 4, 8, 8), None, SD_FORMAT, None)
