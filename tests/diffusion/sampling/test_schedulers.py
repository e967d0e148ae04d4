"""Schedulers against their closed forms and ComfyUI's documented values (model-formats.md 9.1)."""

import pytest
import scipy.stats
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusion.sampling.model_sampling import FlowModelSampling
from diffusion.sampling.schedulers import (
    SCHEDULER_NAMES,
    beta_quantile,
    calculate_sigmas,
    regularized_incomplete_beta,
)

# n = 10 on the SD1 table, from model-formats.md 9.1.
FIXTURES = {
    "normal": [14.6146, 7.8399, 4.6092, 2.9183, 1.9502, 1.3449, 0.9324, 0.6250, 0.3687, 0.0292, 0],
    "karras": [14.6146, 9.1029, 5.4784, 3.1686, 1.7494, 0.9141, 0.4469, 0.2014, 0.0819, 0.0292, 0],
    "exponential": [14.6146, 7.3249, 3.6712, 1.8400, 0.9222, 0.4622, 0.2317, 0.1161, 0.0582, 0.0292, 0],
    "simple": [14.6146, 8.3028, 5.0878, 3.3211, 2.2765, 1.6129, 1.1606, 0.8299, 0.5693, 0.3417, 0],
    "kl_optimal": [14.6146, 4.2324, 2.3937, 1.5971, 1.1330, 0.8152, 0.5729, 0.3725, 0.1953, 0.0292, 0],
}


def test_scheduler_names_follow_comfyui_combo_order():
    assert SCHEDULER_NAMES == (
        "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
        "kl_optimal",
    )


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_ten_step_sigmas_match_the_documented_fixture(sd_sampling, name):
    sigmas = calculate_sigmas(sd_sampling, name, 10)
    torch.testing.assert_close(sigmas, torch.tensor(FIXTURES[name]), atol=5e-5, rtol=0)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 2, 7, 30])
def test_every_schedule_descends_to_a_final_zero(sd_sampling, name, steps):
    sigmas = calculate_sigmas(sd_sampling, name, steps)
    assert sigmas.dtype == torch.float32
    assert sigmas[-1].item() == 0.0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert sigmas[0].item() <= sd_sampling.sigma_max * (1 + 1e-6)
    if name not in ("ddim_uniform", "beta"):
        assert len(sigmas) == steps + 1


def test_ddim_uniform_can_take_more_steps_and_starts_below_sigma_max(sd_sampling):
    assert len(calculate_sigmas(sd_sampling, "ddim_uniform", 7)) - 1 == 8
    assert len(calculate_sigmas(sd_sampling, "ddim_uniform", 30)) - 1 == 31
    sigmas = calculate_sigmas(sd_sampling, "ddim_uniform", 10)
    expected = [float(sd_sampling.sigmas[i]) for i in range(901, 0, -100)] + [0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected))


def test_sgm_uniform_drops_the_endpoint_of_an_n_plus_one_linspace(sd_sampling):
    sigmas = calculate_sigmas(sd_sampling, "sgm_uniform", 4)
    expected = [sd_sampling.sigma(t) for t in (999.0, 749.25, 499.5, 249.75)] + [0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected, dtype=torch.float32))


def test_regularized_incomplete_beta_matches_scipy():
    for x in (1e-6, 0.01, 0.3, 0.5, 0.77, 0.999):
        assert regularized_incomplete_beta(x, 0.6, 0.6) == pytest.approx(scipy.stats.beta.cdf(x, 0.6, 0.6), abs=1e-13)
    for p in (0.01, 0.3, 0.9, 0.999):
        assert beta_quantile(p, 0.6, 0.6) == pytest.approx(scipy.stats.beta.ppf(p, 0.6, 0.6), abs=1e-12)


def test_beta_schedule_takes_table_entries_at_beta_quantiles(sd_sampling):
    steps = 10
    quantiles = scipy.stats.beta.ppf(1 - torch.arange(steps).double().numpy() / steps, 0.6, 0.6)
    indices = [int(round(q * 999)) for q in quantiles]
    expected = [float(sd_sampling.sigmas[i]) for i in indices] + [0.0]
    torch.testing.assert_close(calculate_sigmas(sd_sampling, "beta", steps), torch.tensor(expected))


def test_linear_quadratic_is_linear_then_quadratic_in_one_minus_sigma(sd_sampling):
    n, m, tau = 10, 5, 0.025
    a = (m - tau * n) / (m * (n - m) ** 2)
    b = tau / m - 2 * (m - tau * n) / (n - m) ** 2
    c = a * m * m
    u = [i * tau / m for i in range(m)] + [a * i * i + b * i + c for i in range(m, n)] + [1.0]
    expected = torch.tensor([(1 - v) * sd_sampling.sigma_max for v in u], dtype=torch.float32)
    torch.testing.assert_close(calculate_sigmas(sd_sampling, "linear_quadratic", n), expected)
    # The quadratic part joins the linear part continuously at i = m.
    assert a * m * m + b * m + c == pytest.approx(tau, abs=1e-12)


@pytest.mark.parametrize("name", ["linear_quadratic", "kl_optimal", "karras"])
def test_single_step_goes_from_sigma_max_to_zero(sd_sampling, name):
    torch.testing.assert_close(calculate_sigmas(sd_sampling, name, 1), torch.tensor([sd_sampling.sigma_max, 0.0]))


def test_kl_optimal_is_evenly_spaced_in_arctan(sd_sampling):
    sigmas = calculate_sigmas(sd_sampling, "kl_optimal", 6).double()[:-1]
    steps = torch.diff(sigmas.atan())
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), rtol=1e-5, atol=1e-7)


def test_flow_normal_schedule_equals_diffusers_flow_match_euler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(20)
    ours = calculate_sigmas(FlowModelSampling(), "normal", 20)
    assert (ours - scheduler.sigmas).abs().max().item() <= 1.2e-7


def test_unknown_scheduler_names_the_valid_ones(sd_sampling):
    with pytest.raises(ValueError, match="unknown scheduler 'karas'.*karras"):
        calculate_sigmas(sd_sampling, "karas", 10)
