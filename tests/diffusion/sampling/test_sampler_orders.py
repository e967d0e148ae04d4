"""Convergence orders of the deterministic samplers on the exact Gaussian denoiser (model-formats.md 10.5).

Karras sigmas on the SD1 range, 8..128 steps in float64, final jump to 0 removed; the asymptotic order is
the slope of log(max error) against log(steps) over the last doubling. Measured slopes (8->16 ... 64->128):
euler 1.01 1.00 1.00 1.00; heun 2.34 2.16 2.08 2.04; dpm_2 2.32 2.15 2.07 2.04; dpmpp_2m 0.77 2.01 2.07 2.04;
res_multistep 1.45 2.14 2.11 2.06; lms 2.68 3.36 3.70 3.84 (3.84 again to 256); deis (tAB) 2.34 2.72 2.88 2.95;
uni_pc without lower-order final steps 4.39 4.05 4.07 4.06; uni_pc as ComfyUI runs it 2.13 2.08 (64->256).
"""
import math

import pytest
import torch

from diffusion.sampling.dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from diffusion.sampling.registry import run_sampler
from diffusion.sampling.noise import GaussianNoiseSampler
from diffusion.sampling.sa_solver import sample_sa_solver, stochastic_adams_weights
from diffusion.sampling.samplers_multistep import adams_coefficients, ipndm_v_weights

from gaussian_oracle import SD_SIGMA_MAX, SD_SIGMA_MIN, GaussianData, karras64

STEPS = (8, 16, 32, 64, 128)


def _start(data: GaussianData) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return data.mu + torch.randn(64, generator=generator, dtype=torch.float64) * math.hypot(data.s, SD_SIGMA_MAX)


def _errors(name: str, data: GaussianData, steps=STEPS, **options) -> list[float]:
    x_start = _start(data)
    errors = []
    for n in steps:
        sigmas = karras64(n)
        out = run_sampler(name, data, x_start.clone(), sigmas, seed=0, **options)
        exact = data.ode_solution(x_start, float(sigmas[0]), float(sigmas[-1]))
        errors.append((out - exact).abs().max().item())
    return errors


def _slope(errors: list[float]) -> float:
    """Slope over the last doubling of the step count."""
    return math.log2(errors[-2] / errors[-1])


@pytest.mark.parametrize(
    ("name", "order", "options"),
    [
        ("euler", 1, {}),
        ("ddim", 1, {}),
        ("heun", 2, {}),
        ("dpm_2", 2, {}),
        ("dpmpp_2m", 2, {}),
        ("res_multistep", 2, {}),
        ("deis", 3, {}),
        ("uni_pc", 4, {"lower_order_final": False}),
        ("uni_pc_bh2", 4, {"lower_order_final": False}),
    ],
)
def test_deterministic_sampler_converges_at_its_order(gaussian, name, order, options):
    errors = _errors(name, gaussian, **options)
    assert _slope(errors) == pytest.approx(order, abs=0.15)


def test_lms_converges_at_nearly_fourth_order(gaussian):
    # Its lower-order warm-up steps sit at large sigma, where the ODE path is almost straight, so their
    # O(h^2) share stays far below the 4th-order error over this range (measured 3.84 up to 256 steps).
    assert 3.65 < _slope(_errors("lms", gaussian)) < 4.15


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_uni_pc_with_lower_order_final_steps_is_second_order(gaussian, name):
    # ComfyUI's setting: the last step is a 1st-order predictor without corrector, local error O(h^2).
    assert _slope(_errors(name, gaussian, steps=(64, 128, 256))) == pytest.approx(2, abs=0.15)


@pytest.mark.parametrize("name", ["ipndm", "plms"])
def test_fixed_step_adams_samplers_are_second_order_on_karras_steps(gaussian, name):
    # Fixed Adams-Bashforth weights assume equal steps; on the smoothly varying Karras grid the mismatch
    # leaves an O(h^2) global error (measured 2.37 2.32 2.12 2.04).
    assert _slope(_errors(name, gaussian)) == pytest.approx(2, abs=0.15)


@pytest.mark.parametrize("name", ["heunpp2", "gradient_estimation"])
def test_first_order_correction_samplers_converge_at_order_one(gaussian, name):
    # heunpp2's stage weights scale with sigma / sigma_0, so at small sigma it reduces to Euler;
    # gradient estimation extrapolates the slope to the step's end, which keeps Euler's order.
    assert _slope(_errors(name, gaussian)) == pytest.approx(1, abs=0.15)


@pytest.mark.parametrize(("guided", "plain"), [("euler_cfg_pp", "euler"), ("dpmpp_2m_cfg_pp", "dpmpp_2m"),
                                               ("res_multistep_cfg_pp", "res_multistep"),
                                               ("gradient_estimation_cfg_pp", "gradient_estimation")])
def test_cfg_pp_variant_equals_its_base_sampler_without_guidance(gaussian, guided, plain):
    x_start, sigmas = _start(gaussian), karras64(12)
    out_guided = run_sampler(guided, gaussian, x_start.clone(), sigmas, seed=0)
    out_plain = run_sampler(plain, gaussian, x_start.clone(), sigmas, seed=0)
    torch.testing.assert_close(out_guided, out_plain, rtol=1e-12, atol=1e-12)


def test_dpm_fast_converges_at_second_order_with_its_low_order_tail(gaussian):
    x_start = _start(gaussian)
    exact = gaussian.ode_solution(x_start, SD_SIGMA_MAX, SD_SIGMA_MIN)
    errors = [
        (sample_dpm_fast(gaussian, x_start.clone(), SD_SIGMA_MIN, SD_SIGMA_MAX, n) - exact).abs().max().item()
        for n in (72, 144)
    ]
    assert math.log2(errors[0] / errors[1]) == pytest.approx(2, abs=0.15)


def test_dpm_adaptive_error_shrinks_with_tolerance_at_more_model_calls(gaussian):
    x_start = _start(gaussian)
    exact = gaussian.ode_solution(x_start, SD_SIGMA_MAX, SD_SIGMA_MIN)
    results = []
    for tol in (1e-2, 1e-4):
        calls = []

        def counted(x, sigma):
            calls.append(sigma)
            return gaussian(x, sigma)

        out = sample_dpm_adaptive(counted, x_start.clone(), SD_SIGMA_MIN, SD_SIGMA_MAX, rtol=tol, atol=tol)
        results.append(((out - exact).abs().max().item(), len(calls)))
    (loose_error, loose_calls), (tight_error, tight_calls) = results
    assert tight_error < 1e-3 < loose_error
    assert tight_calls > loose_calls


def test_ipndm_v_weights_are_variable_step_adams_at_order_two_and_ab3_on_equal_steps():
    steps = [-0.5, -0.8, -1.3, -2.0]
    nodes = [3.1, 3.1 - steps[1]][::-1]  # sigma_(i-1), sigma_i
    exact = adams_coefficients(nodes, nodes[-1], nodes[-1] + steps[0])
    weights = ipndm_v_weights(steps[:2])
    assert [w * steps[0] for w in weights] == pytest.approx(exact[::-1], rel=1e-12)
    assert ipndm_v_weights([-1.0] * 3) == pytest.approx([23 / 12, -16 / 12, 5 / 12], rel=1e-12)
    for order in (2, 3):
        assert sum(ipndm_v_weights(steps[:order])) == pytest.approx(1.0, rel=1e-12)
    # The published 4th-order weights sum to 1 only when consecutive step ratios are equal.
    assert sum(ipndm_v_weights(steps)) == pytest.approx(1.0015358703210486, rel=1e-12)
    assert sum(ipndm_v_weights([-1.0, -2.0, -4.0, -8.0])) == pytest.approx(1.0, rel=1e-12)


def test_ipndm_v_converges_on_karras_steps(gaussian):
    # Its published 4th-order weights are not exact Adams weights, so the slope is irregular
    # (measured 1.83 3.19 0.30 0.90 1.58 from 8 to 256 steps); it still converges.
    errors = _errors("ipndm_v", gaussian, steps=(8, 256))
    assert errors[1] < 1e-4 < errors[0] / 100


@pytest.mark.parametrize("pece", [False, True])
def test_sa_solver_without_noise_is_fourth_order(gaussian, pece):
    # tau = 0 turns SA-Solver into an exponential Adams predictor (order 3) with an Adams-Moulton corrector
    # (order 4); measured slopes 4.39 4.05 4.07 4.06 (PEC) and 3.58 4.28 4.22 4.11 (PECE).
    x_start = _start(gaussian).unsqueeze(0)
    errors = []
    for n in STEPS[-2:]:
        sigmas = karras64(n)
        out = sample_sa_solver(gaussian, x_start.clone(), sigmas, noise=GaussianNoiseSampler(x_start, 0),
                               tau=lambda sigma: 0.0, pece=pece)
        errors.append((out - gaussian.ode_solution(x_start, float(sigmas[0]), float(sigmas[-1]))).abs().max().item())
    assert _slope(errors) == pytest.approx(4, abs=0.15)


def test_stochastic_adams_weight_of_one_node_is_the_exponential_euler_weight():
    # A constant x0 estimate integrates to (1 - e^(-(1 + tau^2) h)).
    for tau in (0.0, 1.0):
        weight = stochastic_adams_weights([0.3], 0.3, 0.8, tau)
        assert weight == pytest.approx([-math.expm1(-(1 + tau**2) * 0.5)], rel=1e-13)


def _edm_vp_time(sigma: float) -> tuple[float, float, float]:
    """(t, beta_min, beta_d) of EDM's VP schedule (eps_s 1e-3, sigma 0.002..80), which DEIS-tAB works in."""
    beta_d = 2 * (math.log(0.002**2 + 1) / 1e-3 - math.log(80.0**2 + 1)) / (1e-3 - 1)
    beta_min = math.log(80.0**2 + 1) - 0.5 * beta_d
    return (math.sqrt(beta_min**2 + 2 * beta_d * math.log(sigma**2 + 1)) - beta_min) / beta_d, beta_min, beta_d


def test_deis_extrapolates_eps_as_a_polynomial_in_vp_time(gaussian):
    # ComfyUI's deis is DEIS-tAB (Zhang & Chen 2023): Lagrange extrapolation of eps in the VP time t,
    # integrated against d sigma / d t. Oracle: scipy quadrature in t with the analytic derivative.
    from scipy.integrate import quad

    def dsigma_dt(t, beta_min, beta_d):
        growth = math.exp(beta_min * t + 0.5 * beta_d * t * t)
        return (beta_min + beta_d * t) * growth / (2 * math.sqrt(growth - 1))

    sigmas = karras64(6).tolist() + [0.0]
    x = _start(gaussian)
    history = []
    for i in range(len(sigmas) - 1):
        d = gaussian.eps(x, sigmas[i])
        history = ([(sigmas[i], d)] + history)[:3]
        if sigmas[i + 1] == 0.0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
            continue
        nodes = [_edm_vp_time(s)[0] for s, _ in history]
        t_cur, beta_min, beta_d = _edm_vp_time(sigmas[i])
        t_next = _edm_vp_time(sigmas[i + 1])[0]
        for j, (_, d_j) in enumerate(history):
            def basis(t, j=j):
                return math.prod((t - nodes[k]) / (nodes[j] - nodes[k]) for k in range(len(nodes)) if k != j)

            weight = quad(lambda t: dsigma_dt(t, beta_min, beta_d) * basis(t), t_cur, t_next, epsabs=0, epsrel=1e-12)[0]
            x = x + d_j * weight
    out = run_sampler("deis", gaussian, _start(gaussian), torch.tensor(sigmas, dtype=torch.float64), seed=0)
    torch.testing.assert_close(out, x, rtol=1e-9, atol=1e-9)
