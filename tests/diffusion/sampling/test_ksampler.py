"""The sampling entry points: KSampler schedules, start noise, multi-stage runs, inpainting, determinism,
callbacks, devices and dtypes."""
import math

import pytest
import torch
from gaussian_oracle import GaussianData, GaussianEpsNetwork

from diffusion.sampling.noise import initial_noise
from diffusion.sampling.sample import LatentFormat, SamplingModel, ksampler_sigmas, sample, sample_custom
from diffusion.sampling.schedulers import calculate_sigmas

SHAPE = (1, 4, 8, 8)


def _model(sd_sampling, gain=0.0, latent_format=LatentFormat()):
    network = GaussianEpsNetwork(GaussianData(), sd_sampling, context_gain=gain)
    return SamplingModel(network, sd_sampling, latent_format), network


def _cond(value=0.0):
    return [[torch.full((1, 77, 16), value), {}]]


def _run(model, latent, **kwargs):
    options = dict(seed=3, steps=6, cfg=1.0, sampler_name="euler", scheduler="karras")
    options.update(kwargs)
    return sample(model, _cond(1.0), _cond(0.0), latent, **options)


def test_denoise_below_one_keeps_the_tail_of_a_longer_schedule(sd_sampling):
    sigmas = ksampler_sigmas(sd_sampling, "normal", "euler", 10, denoise=0.5)
    torch.testing.assert_close(sigmas, calculate_sigmas(sd_sampling, "normal", 20)[-11:])


def test_dpm_2_and_uni_pc_drop_the_second_to_last_sigma(sd_sampling):
    full = calculate_sigmas(sd_sampling, "karras", 11)
    for name in ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"):
        sigmas = ksampler_sigmas(sd_sampling, "karras", name, 10)
        torch.testing.assert_close(sigmas, torch.cat([full[:-2], full[-1:]]))


def test_zero_denoise_returns_the_latent_untouched(sd_sampling):
    model, network = _model(sd_sampling)
    latent = torch.randn(SHAPE)
    assert _run(model, latent, denoise=0.0) is latent
    assert network.calls == []


def test_full_denoise_starts_from_noise_scaled_by_sqrt_one_plus_sigma_max_squared(sd_sampling):
    model, _ = _model(sd_sampling)
    latent = torch.full(SHAPE, 0.25)
    starts = []
    _run(model, latent, callback=lambda step, total, x, denoised: starts.append(x) if step == 0 else None)
    expected = latent + initial_noise(SHAPE, 3) * math.sqrt(1 + sd_sampling.sigma_max**2)
    torch.testing.assert_close(starts[0], expected)


def test_partial_denoise_starts_from_noise_scaled_by_the_first_sigma(sd_sampling):
    model, _ = _model(sd_sampling)
    latent = torch.full(SHAPE, 0.25)
    starts = []
    _run(model, latent, denoise=0.4, callback=lambda step, total, x, denoised: starts.append(x) if step == 0 else None)
    first = float(ksampler_sigmas(sd_sampling, "karras", "euler", 6, 0.4)[0])
    torch.testing.assert_close(starts[0], latent + initial_noise(SHAPE, 3) * first)


def test_two_stage_sampling_with_leftover_noise_equals_one_run(sd_sampling):
    model, _ = _model(sd_sampling, gain=0.2)
    latent = torch.zeros(SHAPE)
    whole = _run(model, latent, steps=8, cfg=4.0)
    first = _run(model, latent, steps=8, cfg=4.0, last_step=3, force_full_denoise=False)
    second = _run(model, first, steps=8, cfg=4.0, start_step=3, add_noise=False)
    torch.testing.assert_close(second, whole, rtol=1e-5, atol=1e-5)


def test_force_full_denoise_ends_the_first_stage_at_sigma_zero(sd_sampling):
    model, _ = _model(sd_sampling)
    denoised = []
    out = _run(model, torch.zeros(SHAPE), steps=8, last_step=3, force_full_denoise=True,
               callback=lambda step, total, x, d: denoised.append(d))
    assert len(denoised) == 3
    torch.testing.assert_close(out, denoised[-1])


def test_start_step_past_the_end_returns_the_latent(sd_sampling):
    model, network = _model(sd_sampling)
    latent = torch.randn(SHAPE)
    assert _run(model, latent, start_step=6) is latent
    assert network.calls == []


def test_noise_mask_keeps_the_unmasked_latent_and_regenerates_the_rest(sd_sampling):
    model, _ = _model(sd_sampling)
    latent = torch.full(SHAPE, 3.0)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    out = _run(model, latent, noise_mask=mask)
    assert torch.equal(out[..., 4:], latent[..., 4:])
    assert (out[..., :4] - 3.0).abs().min() > 1.0  # sampled from N(0.5, 0.3^2), far from the latent


def test_noise_mask_context_is_the_latent_noised_to_the_current_sigma(sd_sampling):
    model, network = _model(sd_sampling)
    latent = torch.full(SHAPE, 3.0)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    _run(model, latent, noise_mask=mask)
    sigma = sd_sampling.sigma_max
    seen = network.inputs[0] / sd_sampling.c_in(sigma)
    torch.testing.assert_close(seen[..., 4:], (latent + initial_noise(SHAPE, 3) * sigma)[..., 4:])


def test_ddim_inpainting_renoises_with_a_fresh_draw_seeded_seed_plus_one(sd_sampling):
    model, network = _model(sd_sampling)
    latent = torch.full(SHAPE, 3.0)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    _run(model, latent, noise_mask=mask, sampler_name="ddim")
    sigma = sd_sampling.sigma_max
    seen = network.inputs[0] / sd_sampling.c_in(sigma)
    torch.testing.assert_close(seen[..., 4:], (latent + initial_noise(SHAPE, 4) * sigma)[..., 4:])


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m_sde", "sa_solver"])
def test_same_seed_is_bit_identical_and_batch_item_zero_ignores_batch_size(sd_sampling, name):
    model, _ = _model(sd_sampling, gain=0.2)
    one = _run(model, torch.zeros(1, 4, 8, 8), sampler_name=name, cfg=5.0)
    again = _run(model, torch.zeros(1, 4, 8, 8), sampler_name=name, cfg=5.0)
    three = _run(model, torch.zeros(3, 4, 8, 8), sampler_name=name, cfg=5.0)
    assert torch.equal(one, again)
    torch.testing.assert_close(three[:1], one, rtol=1e-6, atol=1e-6)


def test_an_item_split_from_its_batch_samples_as_it_did_inside_it(sd_sampling):
    model, _ = _model(sd_sampling, gain=0.2)
    three = _run(model, torch.zeros(3, 4, 8, 8), sampler_name="euler_ancestral", cfg=5.0)
    alone = _run(model, torch.zeros(1, 4, 8, 8), sampler_name="euler_ancestral", cfg=5.0, batch_index=[2])
    torch.testing.assert_close(alone, three[2:], rtol=1e-6, atol=1e-6)


def test_callback_sees_every_step_and_its_exception_propagates(sd_sampling):
    model, _ = _model(sd_sampling)
    events = []
    _run(model, torch.zeros(SHAPE), callback=lambda step, total, x, d: events.append((step, total)))
    assert events == [(i, 6) for i in range(6)]

    class Interrupted(Exception):
        """Stands in for the executor's interrupt."""

    interrupt = Interrupted()

    def stop(step, total, x, denoised):
        if step == 2:
            raise interrupt

    with pytest.raises(Interrupted) as raised:
        _run(model, torch.zeros(SHAPE), callback=stop)
    assert raised.value is interrupt


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sampling_runs_in_the_latent_dtype(sd_sampling, dtype):
    model, _ = _model(sd_sampling)
    out = _run(model, torch.zeros(SHAPE, dtype=dtype))
    reference = _run(model, torch.zeros(SHAPE))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_latent_format_scales_in_and_out_around_the_model(sd_sampling):
    model, _ = _model(sd_sampling, latent_format=LatentFormat(scale_factor=2.0, shift_factor=0.1))
    latent = torch.full(SHAPE, 0.6)
    sigmas = torch.tensor([1.0, 0.0])
    result = sample_custom(model, _cond(), _cond(), latent, sigmas, "euler", seed=0, cfg=1.0, add_noise=False)
    model_sees = (latent - 0.1) * 2.0
    expected = GaussianData().denoise(model_sees, sd_sampling.sigma(sd_sampling.timestep(1.0))) / 2.0 + 0.1
    torch.testing.assert_close(result.samples, expected)
    torch.testing.assert_close(result.denoised, expected)


def test_an_all_zero_latent_enters_sampling_unshifted(sd_sampling):
    # ComfyUI skips process_latent_in for an empty latent, so SD3's shift does not turn 0 into -0.0609 * 1.5305.
    model, _ = _model(sd_sampling, latent_format=LatentFormat(scale_factor=1.5305, shift_factor=0.0609))
    latent = torch.zeros(SHAPE)
    seen = []
    sample_custom(
        model, _cond(), _cond(), latent, torch.tensor([2.0, 1.0]), "euler", seed=6, cfg=1.0,
        callback=lambda step, total, x, denoised: seen.append(x),
    )
    torch.testing.assert_close(seen[0], initial_noise(SHAPE, 6) * 2.0)


def test_no_negative_prompt_at_cfg_one_samples_the_positive_alone(sd_sampling):
    model, network = _model(sd_sampling, gain=0.2)
    latent = torch.zeros(SHAPE)
    sigmas = calculate_sigmas(sd_sampling, "karras", 5)
    alone = sample_custom(model, _cond(1.0), None, latent, sigmas, "euler", seed=1, cfg=1.0)
    paired = sample_custom(model, _cond(1.0), _cond(-3.0), latent, sigmas, "euler", seed=1, cfg=1.0)
    assert torch.equal(alone.samples, paired.samples)
    assert all(shape[0] == 1 for shape, _ in network.calls)
