"""ComfyUI's sampler names mapped to our sampler functions, with what each needs to run.

`SAMPLER_NAMES` keeps the KSampler COMBO order (model-formats.md 9.2) for the names implemented here,
with `plms` (diffusers' PNDM without Runge-Kutta steps, not in ComfyUI) at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

from torch import Tensor

from . import samplers as single
from . import samplers_multistep as multi
from . import samplers_sde as sde
from .brownian import BrownianTreeNoiseSampler
from .denoiser import Denoiser, NoiseSampler, StepCallback
from .dpm_solver import sample_dpm_adaptive, sample_dpm_fast
from .model_sampling import ModelSampling
from .noise import GaussianNoiseSampler
from .sa_solver import sample_sa_solver
from .uni_pc import FINAL_SIGMA as UNI_PC_FINAL_SIGMA
from .uni_pc import sample_uni_pc

NoiseKind = Literal["none", "gaussian", "brownian", "brownian_device"]


@dataclass(frozen=True)
class SamplerSpec:
    """One named sampler: its function, fixed options and what the sampling entry point must supply."""

    fn: Callable[..., Tensor]
    noise: NoiseKind = "none"
    options: Mapping[str, Any] = field(default_factory=dict)
    # KSampler computes one extra sigma and drops the second-to-last for these (9.1).
    discard_penultimate_sigma: bool = False
    needs_model_sampling: bool = False
    # The renoising formulas assume VE variables; flow models need ComfyUI's separate "RF" variants,
    # which `flow_options` selects where one exists.
    supports_flow: bool = True
    flow_options: Mapping[str, Any] | None = None
    # ComfyUI's "ddim" re-noises the inpainting context with a fresh draw seeded seed + 1 (8.4).
    inpaint_fresh_noise: bool = False
    # Log-SNR samplers on flow models start at percent_to_sigma(1e-4) instead of sigma 1, where log-SNR is
    # infinite (ComfyUI's offset_first_sigma_for_snr); their noise source still spans the original sigmas.
    flow_snr_offset: bool = False
    # Where the sampler stops when the schedule ends at 0, if not at 0 (uni_pc): the end's noise scaling is
    # undone there.
    final_sigma: float | None = None


def _sigma_range(sigmas: Tensor, name: str) -> tuple[float, float, int]:
    """dpm_fast / dpm_adaptive see only sigma_max, the last nonzero sigma and the step count (ComfyUI)."""
    s = sigmas.tolist()
    sigma_min = s[-1] if s[-1] > 0.0 else s[-2]
    if not sigma_min < s[0]:
        # ComfyUI silently returns the noise here: a one-step schedule [sigma, 0] leaves nothing to integrate.
        raise ValueError(f"{name} needs at least 2 steps (a sigma range to integrate over), got sigmas {s}")
    return sigma_min, s[0], len(s) - 1


def _dpm_fast(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    sigma_min, sigma_max, steps = _sigma_range(sigmas, "dpm_fast")
    return sample_dpm_fast(denoiser, x, sigma_min, sigma_max, steps, callback=callback)


def _dpm_adaptive(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: StepCallback | None = None) -> Tensor:
    sigma_min, sigma_max, _ = _sigma_range(sigmas, "dpm_adaptive")
    return sample_dpm_adaptive(denoiser, x, sigma_min, sigma_max, callback=callback)


# ComfyUI's offset_first_sigma_for_snr: the percent whose sigma replaces a flow schedule's leading 1.
FLOW_SNR_OFFSET_PERCENT = 1e-4

_VE_ONLY = {"supports_flow": False}
_FLOW_LOG_SNR: dict[str, Any] = {"flow_options": {"flow": True}, "flow_snr_offset": True}

SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec(single.sample_euler),
    "euler_cfg_pp": SamplerSpec(single.sample_euler_cfg_pp),
    "euler_ancestral": SamplerSpec(single.sample_euler_ancestral, "gaussian", flow_options={"flow": True}),
    "euler_ancestral_cfg_pp": SamplerSpec(
        single.sample_euler_ancestral_cfg_pp, "gaussian", **_VE_ONLY
    ),
    "heun": SamplerSpec(single.sample_heun),
    "heunpp2": SamplerSpec(single.sample_heunpp2),
    "dpm_2": SamplerSpec(single.sample_dpm_2, discard_penultimate_sigma=True),
    "dpm_2_ancestral": SamplerSpec(
        single.sample_dpm_2_ancestral, "gaussian", discard_penultimate_sigma=True, **_VE_ONLY
    ),
    "lms": SamplerSpec(multi.sample_lms),
    "dpm_fast": SamplerSpec(_dpm_fast),
    "dpm_adaptive": SamplerSpec(_dpm_adaptive),
    "dpmpp_2s_ancestral": SamplerSpec(single.sample_dpmpp_2s_ancestral, "gaussian", flow_options={"flow": True}),
    "dpmpp_2s_ancestral_cfg_pp": SamplerSpec(
        single.sample_dpmpp_2s_ancestral, "gaussian", {"cfg_pp": True}, **_VE_ONLY
    ),
    "dpmpp_sde": SamplerSpec(sde.sample_dpmpp_sde, "brownian", **_VE_ONLY),
    "dpmpp_sde_gpu": SamplerSpec(sde.sample_dpmpp_sde, "brownian_device", **_VE_ONLY),
    "dpmpp_2m": SamplerSpec(multi.sample_dpmpp_2m),
    "dpmpp_2m_cfg_pp": SamplerSpec(multi.sample_dpmpp_2m, options={"cfg_pp": True}),
    "dpmpp_2m_sde": SamplerSpec(sde.sample_dpmpp_2m_sde, "brownian", **_FLOW_LOG_SNR),
    "dpmpp_2m_sde_gpu": SamplerSpec(sde.sample_dpmpp_2m_sde, "brownian_device", **_FLOW_LOG_SNR),
    "dpmpp_2m_sde_heun": SamplerSpec(sde.sample_dpmpp_2m_sde, "brownian", {"solver_type": "heun"}, **_FLOW_LOG_SNR),
    "dpmpp_2m_sde_heun_gpu": SamplerSpec(
        sde.sample_dpmpp_2m_sde, "brownian_device", {"solver_type": "heun"}, **_FLOW_LOG_SNR
    ),
    "dpmpp_3m_sde": SamplerSpec(sde.sample_dpmpp_3m_sde, "brownian", **_FLOW_LOG_SNR),
    "dpmpp_3m_sde_gpu": SamplerSpec(sde.sample_dpmpp_3m_sde, "brownian_device", **_FLOW_LOG_SNR),
    "ddpm": SamplerSpec(single.sample_ddpm, "gaussian", **_VE_ONLY),
    "lcm": SamplerSpec(single.sample_lcm, "gaussian", needs_model_sampling=True),
    "ipndm": SamplerSpec(multi.sample_ipndm),
    "ipndm_v": SamplerSpec(multi.sample_ipndm_v),
    "deis": SamplerSpec(multi.sample_deis),
    "res_multistep": SamplerSpec(multi.sample_res_multistep),
    "res_multistep_cfg_pp": SamplerSpec(multi.sample_res_multistep, options={"cfg_pp": True}),
    "res_multistep_ancestral": SamplerSpec(multi.sample_res_multistep, "gaussian", {"eta": 1.0}, **_VE_ONLY),
    "res_multistep_ancestral_cfg_pp": SamplerSpec(
        multi.sample_res_multistep, "gaussian", {"eta": 1.0, "cfg_pp": True}, **_VE_ONLY
    ),
    "gradient_estimation": SamplerSpec(single.sample_gradient_estimation),
    "gradient_estimation_cfg_pp": SamplerSpec(
        single.sample_gradient_estimation, options={"cfg_pp": True}
    ),
    "er_sde": SamplerSpec(sde.sample_er_sde, "gaussian", **_VE_ONLY),
    "seeds_2": SamplerSpec(sde.sample_seeds_2, "gaussian", **_VE_ONLY),
    "seeds_3": SamplerSpec(sde.sample_seeds_3, "gaussian", **_VE_ONLY),
    "sa_solver": SamplerSpec(sample_sa_solver, "gaussian", needs_model_sampling=True, **_VE_ONLY),
    "sa_solver_pece": SamplerSpec(
        sample_sa_solver, "gaussian", {"pece": True}, needs_model_sampling=True, **_VE_ONLY
    ),
    "ddim": SamplerSpec(single.sample_euler, inpaint_fresh_noise=True),
    "uni_pc": SamplerSpec(sample_uni_pc, discard_penultimate_sigma=True, final_sigma=UNI_PC_FINAL_SIGMA),
    "uni_pc_bh2": SamplerSpec(
        sample_uni_pc, options={"variant": "bh2"}, discard_penultimate_sigma=True, final_sigma=UNI_PC_FINAL_SIGMA
    ),
    "plms": SamplerSpec(multi.sample_plms),
}

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)


def get_sampler(name: str) -> SamplerSpec:
    """The spec registered under a ComfyUI sampler name; the error lists the valid names."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[name]


def make_noise_sampler(
    kind: NoiseKind, x: Tensor, sigmas: Tensor, seed: int, batch_index: Sequence[int] | None = None
) -> NoiseSampler | None:
    """The noise source a sampler needs; Brownian trees span [smallest nonzero sigma, largest sigma]."""
    if kind == "none":
        return None
    if kind == "gaussian":
        return GaussianNoiseSampler(x, seed, batch_index)
    positive = [s for s in sigmas.tolist() if s > 0.0]
    return BrownianTreeNoiseSampler(x, min(positive), max(positive), seed, on_device=kind == "brownian_device")


def run_sampler(
    name: str,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    seed: int,
    model_sampling: ModelSampling | None = None,
    callback: StepCallback | None = None,
    batch_index: Sequence[int] | None = None,
    **options: Any,
) -> Tensor:
    """Run the named sampler from `x` (already noised to sigmas[0]) down `sigmas`."""
    spec = get_sampler(name)
    is_flow = model_sampling is not None and model_sampling.is_flow
    if is_flow and not spec.supports_flow:
        raise ValueError(f"sampler {name!r} renoises in VE variables and does not support flow models yet")
    if len(sigmas) < 2:
        # No step to take (ComfyUI returns the input too); dpm_fast, uni_pc and the noise sources need a step.
        return x
    flow_options = spec.flow_options if is_flow and spec.flow_options else {}
    kwargs: dict[str, Any] = {**spec.options, **flow_options, **options, "callback": callback}
    noise = make_noise_sampler(spec.noise, x, sigmas, seed, batch_index)
    if noise is not None:
        kwargs["noise"] = noise
    if is_flow and spec.flow_snr_offset and float(sigmas[0]) >= 1.0:
        sigmas = sigmas.clone()
        sigmas[0] = model_sampling.percent_to_sigma(FLOW_SNR_OFFSET_PERCENT)
    if spec.needs_model_sampling:
        if model_sampling is None:
            raise ValueError(f"sampler {name!r} needs the model's sampling parameters")
        kwargs["model_sampling"] = model_sampling
    return spec.fn(denoiser, x, sigmas, **kwargs)
