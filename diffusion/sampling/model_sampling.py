"""How a network's output and timestep relate to the noise level sigma.

Samplers work in k-diffusion's variance-exploding variables: `x = x0 + sigma * noise` and a denoiser
`D(x, sigma)` predicting `x0`. A `ModelSampling` turns that picture into what a network was trained on:
the timestep it expects, the input scaling `c_in`, and how its raw output (eps, v or flow velocity) becomes
`D`. Facts: model-formats.md sections 8.1-8.3 and 8.6.
"""
from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["eps", "v_prediction"]

# ComfyUI's value for the last alpha_cumprod after the zero-terminal-SNR rescale (diffusers uses 2**-24).
_ZSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08


def scaled_linear_betas(
    num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> Tensor:
    """SD's "scaled linear" beta schedule, built in float64 as ComfyUI does (8.1)."""
    root = torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), num_timesteps, dtype=torch.float64)
    return root**2


def zero_terminal_snr_sigmas(sigmas: Tensor) -> Tensor:
    """Lin et al. 2024, Alg. 1: shift and scale sqrt(alpha_cumprod) so the last step has zero SNR."""
    alphas_cumprod = 1.0 / (sigmas.double() ** 2 + 1.0)
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alphas_cumprod = root**2
    alphas_cumprod[-1] = _ZSNR_LAST_ALPHA_CUMPROD
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


class ModelSampling(ABC):
    """Common interface: sigma table ends, sigma <-> timestep, c_in, output -> denoised, noise scaling."""

    is_flow: bool = False
    sigmas: Tensor  # ascending float32 table, one entry per training timestep

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @abstractmethod
    def timestep(self, sigma: float) -> float:
        """The timestep the network is fed at noise level `sigma`."""

    @abstractmethod
    def sigma(self, timestep: float) -> float:
        """The noise level at a (possibly fractional) timestep."""

    @abstractmethod
    def percent_to_sigma(self, percent: float) -> float:
        """A timestep-range percentage (0 = start of sampling, 1 = end) as a sigma."""

    @abstractmethod
    def c_in(self, sigma: float) -> float:
        """The factor applied to x before it enters the network."""

    @abstractmethod
    def calculate_denoised(self, sigma: float, model_output: Tensor, model_input: Tensor) -> Tensor:
        """D(x, sigma) from the network's raw output; `model_input` is the unscaled x."""

    @abstractmethod
    def noise_scaling(self, sigma: float, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        """The sampler's starting point: `latent` noised to `sigma` with unit `noise`."""

    @abstractmethod
    def inverse_noise_scaling(self, sigma: float, latent: Tensor) -> Tensor:
        """Undo what noise_scaling leaves on the data when sampling stops at `sigma`."""

    def is_max_denoise(self, sigma: float) -> bool:
        """True when a schedule starting at `sigma` starts from pure noise (ComfyUI's rel_tol 1e-5 test)."""
        return math.isclose(self.sigma_max, sigma, rel_tol=1e-5) or sigma > self.sigma_max


@dataclass(frozen=True)
class DiscreteConfig:
    """An SD1/SD2/SDXL-style schedule: 1000 scaled-linear betas, eps or v prediction."""

    prediction: Prediction = "eps"
    num_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    zero_terminal_snr: bool = False


class DiscreteModelSampling(ModelSampling):
    """The discrete DDPM table of SD1/SD2/SDXL with eps or v-prediction (8.1-8.3)."""

    def __init__(self, config: DiscreteConfig = DiscreteConfig()) -> None:
        self.config = config
        betas = scaled_linear_betas(config.num_timesteps, config.linear_start, config.linear_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
        if config.zero_terminal_snr:
            sigmas = zero_terminal_snr_sigmas(sigmas)
        # ComfyUI builds the table in float64 and keeps float32 (8.1); all lookups below use these values.
        self._set_table(sigmas.float())

    def _set_table(self, sigmas: Tensor) -> None:
        self.sigmas = sigmas
        self._log_sigmas = sigmas.double().log()
        self._sigma_list = sigmas.tolist()
        self._log_sigma_list = self._log_sigmas.tolist()

    @property
    def max_timestep(self) -> int:
        return len(self._sigma_list) - 1

    def timestep(self, sigma: float) -> float:
        """Nearest table index in log sigma: ComfyUI feeds integer timesteps to the UNet (8.2)."""
        if sigma <= 0.0:
            return 0.0
        log_sigma = math.log(sigma)
        table = self._log_sigma_list
        right = min(bisect.bisect_left(table, log_sigma), len(table) - 1)
        left = max(right - 1, 0)
        # Ties go to the lower index, as argmin over |log sigma - table| does.
        index = left if abs(table[left] - log_sigma) <= abs(table[right] - log_sigma) else right
        return float(index)

    def sigma(self, timestep: float) -> float:
        """sigma at a fractional timestep, interpolating log sigma linearly (ComfyUI, k-diffusion)."""
        t = min(max(float(timestep), 0.0), float(self.max_timestep))
        low = math.floor(t)
        high = math.ceil(t)
        frac = t - low
        log_sigma = (1.0 - frac) * self._log_sigma_list[low] + frac * self._log_sigma_list[high]
        return math.exp(log_sigma)

    def percent_to_sigma(self, percent: float) -> float:
        """Timestep-range percent to sigma: 0 means above every sigma, 1 means 0 (8.2)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma((1.0 - percent) * float(self.max_timestep))

    def c_in(self, sigma: float) -> float:
        return 1.0 / math.sqrt(sigma * sigma + 1.0)

    def calculate_denoised(self, sigma: float, model_output: Tensor, model_input: Tensor) -> Tensor:
        if self.config.prediction == "eps":
            return model_input - model_output * sigma
        # v-prediction (Salimans & Ho 2022) rewritten for VE variables: c_skip = 1/(s^2+1), c_out = -s/sqrt(s^2+1).
        scale = sigma * sigma + 1.0
        return model_input / scale - model_output * (sigma / math.sqrt(scale))

    def noise_scaling(self, sigma: float, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        # From pure noise ComfyUI starts at sqrt(1 + sigma^2): unit variance in VP units (8.4).
        scale = math.sqrt(1.0 + sigma * sigma) if max_denoise else sigma
        return latent + noise * scale

    def inverse_noise_scaling(self, sigma: float, latent: Tensor) -> Tensor:
        return latent


class LCMModelSampling(DiscreteModelSampling):
    """ComfyUI's ModelSamplingDiscrete "lcm": a 50-entry table and LCM's boundary condition (8.3)."""

    original_timesteps = 50
    sigma_data = 0.5
    timestep_scaling = 10.0

    def __init__(self, config: DiscreteConfig = DiscreteConfig()) -> None:
        super().__init__(config)
        full = self._sigma_list
        self.skip = len(full) // self.original_timesteps
        # Valid timesteps are 999, 979, ..., 19 (every skip-th, counted down from the last).
        valid = [full[len(full) - 1 - k * self.skip] for k in range(self.original_timesteps)][::-1]
        self._set_table(torch.tensor(valid, dtype=torch.float32))

    def timestep(self, sigma: float) -> float:
        index = super().timestep(sigma)
        return index * self.skip + (self.skip - 1)

    def sigma(self, timestep: float) -> float:
        index = (float(timestep) - (self.skip - 1)) / self.skip
        return super().sigma(index)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma((1.0 - percent) * 999.0)

    def calculate_denoised(self, sigma: float, model_output: Tensor, model_input: Tensor) -> Tensor:
        # Always eps, as ComfyUI's LCM class is: "lcm" replaces the config's prediction type.
        denoised = model_input - model_output * sigma
        t = self.timestep(sigma) * self.timestep_scaling
        c_skip = self.sigma_data**2 / (t * t + self.sigma_data**2)
        c_out = t / math.sqrt(t * t + self.sigma_data**2)
        return denoised * c_out + model_input * c_skip


@dataclass(frozen=True)
class FlowConfig:
    """Rectified-flow sampling as SD3 uses it: shifted sigma(t), timestep = 1000 * sigma (8.6)."""

    shift: float = 3.0
    multiplier: float = 1000.0
    num_timesteps: int = 1000


def flow_shift(shift: float, t: float) -> float:
    """SD3's time shift (Esser et al. 2024, eq. 23): sigma = s*t / (1 + (s - 1)*t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


class FlowModelSampling(ModelSampling):
    """Velocity-predicting rectified-flow models: x = (1 - sigma) x0 + sigma noise, D = x - sigma v."""

    is_flow = True

    def __init__(self, config: FlowConfig = FlowConfig()) -> None:
        self.config = config
        n = config.num_timesteps
        self.sigmas = torch.tensor([flow_shift(config.shift, i / n) for i in range(1, n + 1)], dtype=torch.float32)

    def timestep(self, sigma: float) -> float:
        return sigma * self.config.multiplier

    def sigma(self, timestep: float) -> float:
        return flow_shift(self.config.shift, float(timestep) / self.config.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return flow_shift(self.config.shift, 1.0 - percent)

    def c_in(self, sigma: float) -> float:
        return 1.0

    def calculate_denoised(self, sigma: float, model_output: Tensor, model_input: Tensor) -> Tensor:
        return model_input - model_output * sigma

    def noise_scaling(self, sigma: float, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        return noise * sigma + latent * (1.0 - sigma)

    def inverse_noise_scaling(self, sigma: float, latent: Tensor) -> Tensor:
        # A schedule that stops above 0 leaves the data scaled by (1 - sigma); undo it (8.4).
        return latent / (1.0 - sigma)
