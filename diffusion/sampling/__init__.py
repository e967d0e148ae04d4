"""The sampling math: schedules, samplers, guidance and noise, with no graph knowledge.

Entry points for the nodes: `sample` (KSampler / KSamplerAdvanced), `sample_custom` (SamplerCustom),
`calculate_sigmas` (BasicScheduler), `SAMPLER_NAMES` / `SCHEDULER_NAMES` (the COMBO options).
"""
from .denoiser import Denoiser, NoiseSampler, StepCallback
from .guidance import ApplyModel, CFGDenoiser, CondBatcher, Condition, EncodeY
from .model_sampling import (
    DiscreteConfig,
    DiscreteModelSampling,
    FlowConfig,
    FlowModelSampling,
    LCMModelSampling,
    ModelSampling,
)
from .noise import initial_noise
from .registry import SAMPLER_NAMES, SAMPLERS, SamplerSpec, get_sampler, run_sampler
from .sample import LatentFormat, SampleOutput, SamplingModel, ksampler_sigmas, sample, sample_custom
from .schedulers import SCHEDULER_NAMES, calculate_sigmas, karras_sigmas

__all__ = [
    "SAMPLER_NAMES",
    "SAMPLERS",
    "SCHEDULER_NAMES",
    "ApplyModel",
    "CFGDenoiser",
    "CondBatcher",
    "Condition",
    "Denoiser",
    "DiscreteConfig",
    "DiscreteModelSampling",
    "EncodeY",
    "FlowConfig",
    "FlowModelSampling",
    "LCMModelSampling",
    "LatentFormat",
    "ModelSampling",
    "NoiseSampler",
    "SampleOutput",
    "SamplerSpec",
    "SamplingModel",
    "StepCallback",
    "calculate_sigmas",
    "get_sampler",
    "initial_noise",
    "karras_sigmas",
    "ksampler_sigmas",
    "run_sampler",
    "sample",
    "sample_custom",
]
