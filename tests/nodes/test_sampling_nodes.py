"""The sampling nodes as functions: ComfyUI's schemas, the equivalences between KSampler and the decomposed
family, LATENT handling (noise_mask, batch_index, copied keys), schedules, the node-built Euler loop, errors,
progress, previews and interrupts. All on the tiny SD1 checkpoint (tests/nodes/conftest.py) at 64x64 pixels.
"""
from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

import cli
from diffusion.sampling import SamplingModel, karras_sigmas, sample
from engine import ExecutionContext, Executor, Interrupted, Registry, RunSettings, Socket, String, node
from engine.events import Progress
from nodes import sampling
from diffusion.sampling.noise import initial_noise
from nodes.sampling import (AddNoise, BasicGuider, BasicScheduler, BetaSamplingScheduler, CFGGuider, DisableNoise,
                            EulerStep, ExponentialScheduler, FlipSigmas, InitialNoisyLatent, KarrasScheduler, KSampler,
                            KSamplerAdvanced, KSamplerSelect, LaplaceScheduler, Noise, PolyexponentialScheduler,
                            RandomNoise, Sampler, SamplerCustom, SamplerCustomAdvanced, SamplerDPMPP_2M_SDE,
                            SamplerEulerAncestral, SamplerLMS, SDTurboScheduler, SetFirstSigma, SplitSigmas,
                            SplitSigmasDenoise, UNetDenoiseStep, VPScheduler)

SEED, CFG_SCALE = 1234, 7.0
# model-formats.md 9.1, SD1 table, 10 steps.
NORMAL_10 = [14.6146, 7.8399, 4.6092, 2.9183, 1.9502, 1.3449, 0.9324, 0.6250, 0.3687, 0.0292, 0.0]
KARRAS_10 = [14.6146, 9.1029, 5.4784, 3.1686, 1.7494, 0.9141, 0.4469, 0.2014, 0.0819, 0.0292, 0.0]
EXPONENTIAL_10 = [14.6146, 7.3249, 3.6712, 1.8400, 0.9222, 0.4622, 0.2317, 0.1161, 0.0582, 0.0292, 0.0]


class Recorder:
    """An ExecutionContext for direct node calls that keeps every progress report."""

    def __init__(self, settings: RunSettings, interrupt_after: int | None = None) -> None:
        self.reports: list[tuple] = []
        self.interrupt_after = interrupt_after
        self.context = ExecutionContext("3", "prompt", "Test", settings, self._report, self._interrupted)

    def _report(self, value, maximum, preview) -> None:
        self.reports.append((value, maximum, preview))

    def _interrupted(self) -> bool:
        return self.interrupt_after is not None and len(self.reports) >= self.interrupt_after


@pytest.fixture(scope="module")
def prompts(sd1_handles):
    _, clip, _ = sd1_handles
    encode = [clip.encode(text) for text in ("a red cube on a table", "")]
    return tuple([[cond, {"pooled_output": pooled}]] for cond, pooled in encode)


@pytest.fixture(scope="module")
def model(sd1_handles):
    return sd1_handles[0]


def empty_latent(batch: int = 1) -> dict:
    return {"samples": torch.zeros(batch, 4, 8, 8)}


def image_latent(batch: int = 1) -> dict:
    return {"samples": torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(7)) * 5.0}


def ksample(model, prompts, latent, *, steps=4, sampler_name="euler", scheduler="normal", denoise=1.0,
            context=None):
    positive, negative = prompts
    return KSampler(model, SEED, steps, CFG_SCALE, sampler_name, scheduler, positive, negative, latent, denoise,
                    context=context)[0]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


# --- schemas -----------------------------------------------------------------------------------------------


def test_the_sampling_nodes_have_comfyuis_input_order_defaults_and_outputs():
    registry = Registry()
    registry.load_module(sampling)
    ksampler = registry["KSampler"].object_info()
    assert ksampler["input_order"]["required"] == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                                   "positive", "negative", "latent_image", "denoise"]
    required = ksampler["input"]["required"]
    assert required["seed"][1] == {"default": 0, "min": 0, "max": 2**64 - 1, "control_after_generate": True}
    assert required["steps"][1]["default"] == 20 and required["cfg"][1]["default"] == 8.0
    assert required["denoise"][1] == {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}
    advanced = registry["KSamplerAdvanced"].object_info()
    assert advanced["input_order"]["required"] == [
        "model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
        "latent_image", "start_at_step", "end_at_step", "return_with_leftover_noise"]
    assert advanced["input"]["required"]["return_with_leftover_noise"][0] == ["disable", "enable"]
    assert advanced["input"]["required"]["end_at_step"][1]["default"] == 10000
    custom = registry["SamplerCustomAdvanced"].object_info()
    assert custom["input_order"]["required"] == ["noise", "guider", "sampler", "sigmas", "latent_image"]
    assert custom["output_name"] == ["output", "denoised_output"]
    assert registry["SplitSigmas"].object_info()["output_name"] == ["high_sigmas", "low_sigmas"]
    assert registry["SamplerDPMPP_2M_SDE"].object_info()["input_order"]["required"] == [
        "solver_type", "eta", "s_noise", "noise_device"]
    assert registry["UNetDenoiseStep"].category == "sampling/custom"


# --- KSampler and the decomposed family ----------------------------------------------------------------------


def test_ksampler_runs_the_sampling_entry_point_with_its_widgets(model, prompts):
    positive, negative = prompts
    ours = ksample(model, prompts, empty_latent(), sampler_name="euler_ancestral", scheduler="karras")
    reference = sample(SamplingModel(model.unet, model.model_sampling, model.latent_format), positive, negative,
                       torch.zeros(1, 4, 8, 8), seed=SEED, steps=4, cfg=CFG_SCALE, sampler_name="euler_ancestral",
                       scheduler="karras")
    assert torch.equal(ours["samples"], reference)
    assert ours["samples"].std() > 1.0  # a real image latent, not the empty input


def test_ksampler_returns_a_new_cpu_float32_latent_and_keeps_the_other_keys(model, prompts):
    latent = {**empty_latent(), "batch_index": [0], "downscale_ratio": 8}
    result = ksample(model, prompts, latent)
    assert result is not latent and latent["samples"].abs().max() == 0  # the input is untouched
    assert result["batch_index"] == [0] and result["downscale_ratio"] == 8
    assert result["samples"].dtype == torch.float32 and result["samples"].device.type == "cpu"


def test_a_noise_mask_keeps_the_unmasked_area_of_the_latent(model, prompts):
    latent = image_latent()
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # repaint the left half
    result = ksample(model, prompts, {**latent, "noise_mask": mask})["samples"]
    kept, repainted = result[..., 4:], result[..., :4]
    assert (kept - latent["samples"][..., 4:]).abs().max() < 1e-4
    assert (repainted - latent["samples"][..., :4]).abs().mean() > 1.0


def test_batch_index_gives_a_latent_the_noise_it_had_in_its_batch(model, prompts):
    batch = ksample(model, prompts, empty_latent(2), sampler_name="euler_ancestral")["samples"]
    alone = ksample(model, prompts, {**empty_latent(1), "batch_index": [1]}, sampler_name="euler_ancestral")
    assert relative_error(alone["samples"][0], batch[1]) < 1e-5
    assert relative_error(batch[0], batch[1]) > 0.1


def test_ksampler_advanced_in_two_stages_equals_one_ksampler_run(model, prompts):
    positive, negative = prompts
    common = dict(steps=6, cfg=CFG_SCALE, sampler_name="euler", scheduler="normal", positive=positive,
                  negative=negative)
    (first,) = KSamplerAdvanced(model=model, add_noise="enable", noise_seed=SEED, latent_image=empty_latent(),
                                start_at_step=0, end_at_step=3, return_with_leftover_noise="enable", **common)
    (second,) = KSamplerAdvanced(model=model, add_noise="disable", noise_seed=SEED, latent_image=first,
                                 start_at_step=3, end_at_step=10000, return_with_leftover_noise="disable", **common)
    whole = ksample(model, prompts, empty_latent(), steps=6)
    assert relative_error(second["samples"], whole["samples"]) < 1e-5
    assert relative_error(first["samples"], whole["samples"]) > 0.02  # the first stage still holds noise


def test_sampler_custom_with_basic_scheduler_equals_ksampler(model, prompts):
    positive, negative = prompts
    (sigmas,) = BasicScheduler(model, "karras", 4, 1.0)
    (sampler,) = KSamplerSelect("heun")
    output, denoised = SamplerCustom(model, True, SEED, CFG_SCALE, positive, negative, sampler, sigmas,
                                     empty_latent())
    assert torch.equal(output["samples"], ksample(model, prompts, empty_latent(), sampler_name="heun",
                                                  scheduler="karras")["samples"])
    # Heun's last step is an Euler step to sigma 0, which lands on the last x0 estimate.
    assert relative_error(denoised["samples"], output["samples"]) < 1e-6


def test_sampler_custom_advanced_with_random_noise_and_cfg_guider_equals_sampler_custom(model, prompts):
    positive, negative = prompts
    (sigmas,) = BasicScheduler(model, "normal", 4, 0.6)
    (sampler,) = KSamplerSelect("dpmpp_2m")
    latent = image_latent()
    custom, _ = SamplerCustom(model, True, SEED, CFG_SCALE, positive, negative, sampler, sigmas, latent)
    (noise,) = RandomNoise(SEED)
    (guider,) = CFGGuider(model, positive, negative, CFG_SCALE)
    advanced, _ = SamplerCustomAdvanced(noise, guider, sampler, sigmas, latent)
    assert torch.equal(advanced["samples"], custom["samples"])


def test_disable_noise_samples_the_latent_as_it_is(model, prompts):
    positive, negative = prompts
    (sigmas,) = BasicScheduler(model, "normal", 3, 0.5)
    (guider,) = CFGGuider(model, positive, negative, CFG_SCALE)
    (sampler,) = KSamplerSelect("euler")
    latent = image_latent()
    (disabled,) = DisableNoise()
    without, _ = SamplerCustomAdvanced(disabled, guider, sampler, sigmas, latent)
    zero_noise, _ = SamplerCustom(model, False, 99, CFG_SCALE, positive, negative, sampler, sigmas, latent)
    assert torch.equal(without["samples"], zero_noise["samples"])
    with_noise, _ = SamplerCustomAdvanced(Noise(SEED), guider, sampler, sigmas, latent)
    assert relative_error(without["samples"], with_noise["samples"]) > 0.05


def test_basic_guider_runs_the_conditional_prediction_alone(model, prompts):
    positive, _ = prompts
    (sigmas,) = BasicScheduler(model, "normal", 3, 1.0)
    (guider,) = BasicGuider(model, positive)
    basic, _ = SamplerCustomAdvanced(Noise(SEED), guider, Sampler("euler"), sigmas, empty_latent())
    # At cfg 1 the negative prompt has no weight: any negative gives the same result.
    other_negative = [[torch.randn(1, 77, 32), {}]]
    cfg_one, _ = SamplerCustom(model, True, SEED, 1.0, positive, other_negative, Sampler("euler"), sigmas,
                               empty_latent())
    assert torch.equal(basic["samples"], cfg_one["samples"])


def test_a_single_sigma_or_zero_denoise_returns_the_latent_unchanged(model, prompts):
    positive, negative = prompts
    latent = image_latent()
    output, _ = SamplerCustom(model, True, SEED, CFG_SCALE, positive, negative, Sampler("euler"),
                              torch.tensor([0.0]), latent)
    # Unchanged up to the round trip through the model's latent scaling.
    assert relative_error(output["samples"], latent["samples"]) < 1e-6
    assert torch.equal(ksample(model, prompts, latent, denoise=0.0)["samples"], latent["samples"])


def custom_run(model, prompts, sampler: Sampler, latent=None, steps: int = 4) -> torch.Tensor:
    (sigmas,) = BasicScheduler(model, "normal", steps, 1.0)
    output, _ = SamplerCustom(model, True, SEED, CFG_SCALE, *prompts, sampler, sigmas, latent or empty_latent())
    return output["samples"]


def test_sampler_euler_ancestral_passes_eta_to_the_sampler(model, prompts):
    (default_eta,) = SamplerEulerAncestral(1.0, 1.0)
    (no_eta,) = SamplerEulerAncestral(0.0, 1.0)
    assert torch.equal(custom_run(model, prompts, default_eta), custom_run(model, prompts, Sampler("euler_ancestral")))
    # Without ancestral noise the step is plain Euler.
    assert relative_error(custom_run(model, prompts, no_eta), custom_run(model, prompts, Sampler("euler"))) < 1e-6


def test_sampler_dpmpp_2m_sde_with_heun_on_the_cpu_is_dpmpp_2m_sde_heun(model, prompts):
    (sampler,) = SamplerDPMPP_2M_SDE("heun", 1.0, 1.0, "cpu")
    assert torch.equal(custom_run(model, prompts, sampler), custom_run(model, prompts, Sampler("dpmpp_2m_sde_heun")))
    (on_device,) = SamplerDPMPP_2M_SDE("midpoint", 1.0, 1.0, "gpu")
    assert on_device.name == "dpmpp_2m_sde_gpu"


def test_sampler_lms_of_order_one_is_euler(model, prompts):
    (first_order,) = SamplerLMS(1)
    assert relative_error(custom_run(model, prompts, first_order), custom_run(model, prompts, Sampler("euler"))) < 1e-6


def test_add_noise_adds_noise_of_the_schedules_span_in_latent_units(model):
    (sigmas,) = BasicScheduler(model, "normal", 10, 1.0)
    (noisy,) = AddNoise(model, Noise(SEED), sigmas, empty_latent())
    expected = initial_noise((1, 4, 8, 8), SEED) * float(sigmas[0]) / model.latent_format.scale_factor
    assert relative_error(noisy["samples"], expected) < 1e-6
    (untouched,) = AddNoise(model, Noise(SEED), torch.zeros(0), image_latent())
    assert torch.equal(untouched["samples"], image_latent()["samples"])


# --- schedules -----------------------------------------------------------------------------------------------


def test_basic_scheduler_gives_the_reference_normal_schedule(model):
    (sigmas,) = BasicScheduler(model, "normal", 10, 1.0)
    assert torch.allclose(sigmas, torch.tensor(NORMAL_10), atol=1e-4)


def test_basic_scheduler_at_denoise_half_keeps_the_tail_of_a_schedule_twice_as_long(model):
    (half,) = BasicScheduler(model, "karras", 5, 0.5)
    (full,) = BasicScheduler(model, "karras", 10, 1.0)
    assert torch.equal(half, full[-6:])


def test_karras_and_exponential_schedulers_match_the_reference_tables():
    (karras,) = KarrasScheduler(10, 14.614642, 0.0291675, 7.0)
    (exponential,) = ExponentialScheduler(10, 14.614642, 0.0291675)
    assert torch.allclose(karras, torch.tensor(KARRAS_10), atol=1e-4)
    assert torch.allclose(exponential, torch.tensor(EXPONENTIAL_10), atol=1e-4)
    assert torch.equal(KarrasScheduler(4, 10.0, 0.1, 3.0)[0], karras_sigmas(4, 0.1, 10.0, 3.0))


def test_polyexponential_at_rho_one_is_exponential_and_a_higher_rho_falls_sooner():
    (rho_one,) = PolyexponentialScheduler(10, 14.614642, 0.0291675, 1.0)
    (rho_two,) = PolyexponentialScheduler(10, 14.614642, 0.0291675, 2.0)
    assert torch.allclose(rho_one, torch.tensor(EXPONENTIAL_10), atol=1e-4)
    assert rho_two[0] == pytest.approx(14.614642) and rho_two[-2] == pytest.approx(0.0291675)
    assert bool((rho_two[1:-2] < rho_one[1:-2]).all())


def test_vp_scheduler_runs_the_vp_sde_noise_levels_from_t_1_to_eps_s():
    (sigmas,) = VPScheduler(5, 19.9, 0.1, 0.001)
    assert sigmas[0] == pytest.approx(math.sqrt(math.exp(19.9 / 2 + 0.1) - 1.0), rel=1e-6)
    assert sigmas[-2] == pytest.approx(math.sqrt(math.exp(19.9e-6 / 2 + 1e-4) - 1.0), rel=1e-4)
    assert sigmas[-1] == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_laplace_scheduler_spans_the_range_and_centres_on_e_to_the_mu():
    (sigmas,) = LaplaceScheduler(3, 14.614642, 0.0291675, 0.0, 0.5)
    assert torch.allclose(sigmas, torch.tensor([14.614642, 1.0, 0.0291675, 0.0]))
    (shifted,) = LaplaceScheduler(3, 14.614642, 0.0291675, 1.0, 0.5)
    assert shifted[1] == pytest.approx(math.e)


def test_sd_turbo_scheduler_uses_timesteps_999_899_and_starts_later_at_lower_denoise(model):
    ms = model.model_sampling
    (one,) = SDTurboScheduler(model, 1, 1.0)
    (two_half,) = SDTurboScheduler(model, 2, 0.5)
    assert torch.allclose(one, torch.tensor([ms.sigma(999), 0.0]))
    assert torch.allclose(two_half, torch.tensor([ms.sigma(499), ms.sigma(399), 0.0]))


def test_beta_sampling_scheduler_at_0_6_is_the_beta_scheduler(model):
    (beta,) = BetaSamplingScheduler(model, 10, 0.6, 0.6)
    assert torch.equal(beta, BasicScheduler(model, "beta", 10, 1.0)[0])
    assert not torch.equal(BetaSamplingScheduler(model, 10, 0.3, 0.6)[0], beta)


def test_flip_sigmas_runs_the_schedule_backwards_from_a_small_positive_sigma():
    (flipped,) = FlipSigmas(torch.tensor(NORMAL_10))
    assert flipped[0] == pytest.approx(1e-4) and torch.equal(flipped[1:], torch.tensor(NORMAL_10).flip(0)[1:])


def test_set_first_sigma_replaces_only_the_first():
    sigmas = torch.tensor(NORMAL_10)
    (changed,) = SetFirstSigma(sigmas, 20.0)
    assert changed[0] == 20.0 and torch.equal(changed[1:], sigmas[1:]) and sigmas[0] == NORMAL_10[0]


def test_split_sigmas_shares_the_sigma_at_the_split():
    sigmas = torch.tensor(NORMAL_10)
    high, low = SplitSigmas(sigmas, 3)
    assert high.tolist() == sigmas[:4].tolist() and low.tolist() == sigmas[3:].tolist()


def test_split_sigmas_denoise_gives_the_low_part_its_share_of_the_steps():
    sigmas = torch.tensor(NORMAL_10)
    high, low = SplitSigmasDenoise(sigmas, 0.4)
    assert len(low) == 5 and len(high) == 7 and high[-1] == low[0]
    everything, nothing = SplitSigmasDenoise(sigmas, 0.0)
    assert everything.tolist() == sigmas.tolist() and nothing.tolist() == [0.0]


def test_flip_and_split_denoise_pass_an_empty_schedule_through_as_comfyui():
    # SplitSigmas past the last step gives an empty low part; ComfyUI's FlipSigmas and SplitSigmasDenoise
    # hand it on (and its samplers then pass the latent through) instead of failing the prompt.
    _, nothing = SplitSigmas(torch.tensor(NORMAL_10), 20)
    (flipped,) = FlipSigmas(nothing)
    high, low = SplitSigmasDenoise(nothing, 0.5)
    assert flipped.tolist() == [] and high.tolist() == [] and low.tolist() == []


# --- the node-built sampler loop ----------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "denoise"), [("empty", 1.0), ("image", 0.6)])
def test_a_loop_of_unet_denoise_and_euler_steps_equals_the_euler_sampler(model, prompts, start, denoise):
    positive, negative = prompts
    latent = empty_latent() if start == "empty" else image_latent()
    (sigmas,) = BasicScheduler(model, "normal", 5, denoise)
    (noise,) = RandomNoise(SEED)
    reference, _ = SamplerCustom(model, True, SEED, CFG_SCALE, positive, negative, Sampler("euler"), sigmas, latent)
    (x,) = InitialNoisyLatent(model, noise, sigmas, latent)
    for step in range(len(sigmas) - 1):
        (denoised,) = UNetDenoiseStep(model, positive, negative, CFG_SCALE, x, sigmas, step)
        (x,) = EulerStep(x, denoised, sigmas, step)
    error = relative_error(x["samples"], reference["samples"])
    # measured: 2.5e-6 of the latent's largest value (~275 here: random tiny weights at cfg 7 give large latents),
    # the float32 round-off of moving x in and out of the model's latent scaling at every step
    assert error < 1e-5


def test_unet_denoise_step_at_sigma_zero_returns_the_clean_latent(model, prompts):
    latent = image_latent()
    (denoised,) = UNetDenoiseStep(model, *prompts, CFG_SCALE, latent, torch.tensor([1.0, 0.0]), 1)
    assert torch.equal(denoised["samples"], latent["samples"])


def test_unet_denoise_step_reports_its_place_in_the_loop(model, prompts, node_settings):
    positive, negative = prompts
    (sigmas,) = BasicScheduler(model, "normal", 5, 1.0)
    recorder = Recorder(node_settings)
    (x,) = InitialNoisyLatent(model, Noise(SEED), sigmas, empty_latent())
    UNetDenoiseStep(model, positive, negative, CFG_SCALE, x, sigmas, 2, context=recorder.context)
    assert recorder.reports == [(3, 5, None)]


# --- errors ------------------------------------------------------------------------------------------------


def test_a_latent_with_the_wrong_channel_count_is_refused_naming_the_input(model, prompts):
    with pytest.raises(ValueError, match="KSampler: latent_image has 16 latent channels but the model takes 4"):
        ksample(model, prompts, {"samples": torch.zeros(1, 16, 8, 8)})


def test_empty_sigmas_pass_the_latent_through_unsampled_as_comfyui(model, prompts):
    positive, negative = prompts
    latent = {"samples": torch.randn(1, 4, 8, 8), "batch_index": [3]}
    output, denoised = SamplerCustom(model, True, SEED, CFG_SCALE, positive, negative, Sampler("euler"),
                                     torch.zeros(0), latent)
    assert torch.equal(output["samples"], latent["samples"]) and torch.equal(denoised["samples"], latent["samples"])
    assert output["batch_index"] == [3] and output is not latent


def test_sigmas_that_are_not_a_schedule_are_refused_naming_the_input(model, prompts):
    positive, negative = prompts
    with pytest.raises(ValueError, match="SamplerCustom: sigmas must be finite and non-negative"):
        SamplerCustom(model, True, SEED, CFG_SCALE, positive, negative, Sampler("euler"),
                      torch.tensor([1.0, float("nan")]), empty_latent())


def test_a_sampler_input_that_is_not_a_known_sampler_is_refused(model, prompts):
    (guider,) = CFGGuider(model, *prompts, CFG_SCALE)
    sigmas = torch.tensor(NORMAL_10)
    with pytest.raises(ValueError, match="SamplerCustomAdvanced: sampler must be a SAMPLER value, got str"):
        SamplerCustomAdvanced(Noise(), guider, "euler", sigmas, empty_latent())
    with pytest.raises(ValueError, match="sampler 'eulr' is not available"):
        SamplerCustomAdvanced(Noise(), guider, Sampler("eulr"), sigmas, empty_latent())


def test_step_nodes_refuse_a_step_past_the_schedule_and_a_noise_mask(model, prompts):
    sigmas = torch.tensor(NORMAL_10[-4:])
    latent = image_latent()
    with pytest.raises(ValueError, match="EulerStep: step 3 is out of range for 4 sigmas"):
        EulerStep(latent, latent, sigmas, 3)
    with pytest.raises(ValueError, match="UNetDenoiseStep: latent has a noise_mask"):
        UNetDenoiseStep(model, *prompts, CFG_SCALE, {**latent, "noise_mask": torch.ones(1, 64, 64)}, sigmas, 0)


def test_log_spaced_schedules_refuse_a_zero_sigma():
    with pytest.raises(ValueError, match="ExponentialScheduler: sigma_min must be positive"):
        ExponentialScheduler(10, 14.6, 0.0)


# --- progress, previews, interrupts ---------------------------------------------------------------------------


def test_ksampler_reports_every_step_with_a_jpeg_preview_of_the_first(model, prompts, node_settings):
    recorder = Recorder(node_settings)
    ksample(model, prompts, empty_latent(), steps=4, context=recorder.context)
    assert [(value, maximum) for value, maximum, _ in recorder.reports] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    kind, jpeg = recorder.reports[0][2]
    assert kind == "JPEG" and jpeg[:2] == b"\xff\xd8"  # the JPEG start-of-image marker


def test_previews_go_out_at_most_four_times_a_second(model, prompts, node_settings):
    recorder = Recorder(node_settings)
    started = time.monotonic()
    ksample(model, prompts, empty_latent(), steps=12, context=recorder.context)
    elapsed = time.monotonic() - started
    previews = sum(preview is not None for *_, preview in recorder.reports)
    assert len(recorder.reports) == 12 and 1 <= previews <= 1 + 4 * elapsed


def test_no_previews_when_the_run_turns_them_off(model, prompts, node_settings):
    settings = dataclasses.replace(node_settings, preview="none")
    recorder = Recorder(settings)
    ksample(model, prompts, empty_latent(), steps=3, context=recorder.context)
    assert [preview for *_, preview in recorder.reports] == [None, None, None]


def test_an_interrupt_stops_the_sampler_between_steps(model, prompts, node_settings):
    recorder = Recorder(node_settings, interrupt_after=2)
    with pytest.raises(Interrupted):
        ksample(model, prompts, empty_latent(), steps=6, context=recorder.context)
    assert len(recorder.reports) == 2


# --- the loop as a graph ---------------------------------------------------------------------------------------

KEPT: dict[str, dict] = {}


@node(category="testing", output_node=True)
def KeepLatent(samples: Socket("LATENT"), label: String("")) -> None:
    """Test-only output node: keeps a LATENT for the assertions."""
    KEPT[label] = samples


def loop_prompt(tiny_name: str, steps: int) -> dict:
    """A txt2img graph whose sampler is a UNetDenoiseStep / EulerStep loop, beside a SamplerCustom euler run."""
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "normal",
                                                              "steps": steps, "denoise": 1.0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "x0": {"class_type": "InitialNoisyLatent", "inputs": {"model": ["ckpt", 0], "noise": ["noise", 0],
                                                              "sigmas": ["sigmas", 0], "latent_image": ["empty", 0]}},
        "select": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "custom": {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": True, "noise_seed": SEED, "cfg": CFG_SCALE, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0], "latent_image": ["empty", 0]}},
        "keep_custom": {"class_type": "KeepLatent", "inputs": {"samples": ["custom", 0], "label": "custom"}},
    }
    for step in range(steps):
        prompt[f"d{step}"] = {"class_type": "UNetDenoiseStep", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": CFG_SCALE,
            "latent": [f"x{step}", 0], "sigmas": ["sigmas", 0], "step": step}}
        prompt[f"x{step + 1}"] = {"class_type": "EulerStep", "inputs": {
            "latent": [f"x{step}", 0], "denoised": [f"d{step}", 0], "sigmas": ["sigmas", 0], "step": step}}
    prompt["keep_loop"] = {"class_type": "KeepLatent", "inputs": {"samples": [f"x{steps}", 0], "label": "loop"}}
    return prompt


def test_the_step_loop_runs_as_a_graph_and_equals_sampler_custom(node_settings, tiny_names):
    registry = cli.load_registry([])
    registry.register(KeepLatent)
    progress: list[Progress] = []
    executor = Executor(registry, settings=node_settings)
    executor.subscribe(lambda event: progress.append(event) if isinstance(event, Progress) else None)
    result = executor.execute(loop_prompt(tiny_names.sd1, 3))
    assert result.ok, result.error
    assert relative_error(KEPT["loop"]["samples"], KEPT["custom"]["samples"]) < 1e-5
    steps = [(event.node, event.value, event.max) for event in progress if event.node.startswith("d")]
    assert steps == [("d0", 1, 3), ("d1", 2, 3), ("d2", 3, 3)]
    # The sampler node's progress events carry the live preview the server sends as a binary frame.
    custom = [event for event in progress if event.node == "custom"]
    assert [event.value for event in custom] == [1, 2, 3] and custom[0].preview[0] == "JPEG"


# --- the compute device --------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_unet_runs_on_the_gpu_and_the_latent_comes_back_as_cpu_float32(node_settings, tiny_names,
                                                                                   model, prompts):
    from nodes.loaders import CheckpointLoaderSimple

    settings = dataclasses.replace(node_settings, device="cuda")
    gpu_model, _, _ = CheckpointLoaderSimple(tiny_names.sd1, context=Recorder(settings).context)
    devices = []
    hook = gpu_model.unet.register_forward_pre_hook(lambda module, args: devices.append(args[0].device.type))
    try:
        on_gpu = ksample(gpu_model, prompts, empty_latent(), context=Recorder(settings).context)["samples"]
    finally:
        hook.remove()
    assert devices and set(devices) == {"cuda"}
    assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.float32
    # fp16 weights on the GPU against fp32 on the CPU: the same image up to half-precision round-off.
    assert relative_error(on_gpu, ksample(model, prompts, empty_latent())["samples"]) < 0.1
