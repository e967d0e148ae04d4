"""UNet steps and VAE decodes: ours (plain and accelerated) against diffusers on identical weights.

Each case builds diffusers' model from our config converter, maps its random weights into ours with
diffusion.key_maps (a copy, so each model's memory is its own), and times every variant on the same inputs.
Every variant's output is compared with the reference's, so a fast wrong answer shows as an error figure.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from bench.timing import count_cuda_syncs, median_seconds, once_seconds, peak_memory, relative_error
from diffusion.acceleration import AccelerationOptions, CudaGraphBackend, StepGraphs
from diffusion.key_maps import (unet_config_to_diffusers, unet_state_dict_from_diffusers, vae_config_to_diffusers,
                                vae_state_dict_from_diffusers)
from diffusion.unet import (SD1_UNET, SDXL_ADM_TIME_EMBED_DIM, SDXL_BASE_UNET, TINY_SD1_UNET, TINY_SDXL_UNET,
                            UNetConfig, UNetModel, sdxl_adm_input)
from diffusion.vae import SD_VAE, TINY_VAE, AutoencoderKL, VAEConfig

PLAIN = AccelerationOptions(cuda_graphs=False, channels_last=False, stacked_projections=False)


@dataclass(frozen=True)
class UNetFamily:
    name: str
    config: UNetConfig
    latent: int  # latent side at the family's native resolution

    @property
    def pooled_width(self) -> int:
        return (self.config.adm_in_channels or 0) - 6 * SDXL_ADM_TIME_EMBED_DIM


UNET_FAMILIES = {"sd15": UNetFamily("SD1.5", SD1_UNET, 64), "sdxl": UNetFamily("SDXL", SDXL_BASE_UNET, 128)}
TINY_UNET_FAMILIES = {"sd15": UNetFamily("tiny SD1", TINY_SD1_UNET, 8),
                      "sdxl": UNetFamily("tiny SDXL", TINY_SDXL_UNET, 8)}
VAE_CONFIGS = {"full": SD_VAE, "tiny": TINY_VAE}


@dataclass
class Row:
    """One line of the table: a piece of work, each variant's median, error against the reference, memory."""

    work: str
    ms: dict[str, float] = field(default_factory=dict)
    max_relative_error: dict[str, float] = field(default_factory=dict)
    peak_gib: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"work": self.work, "ms": self.ms, "max_relative_error": self.max_relative_error,
                "peak_gib": self.peak_gib, "notes": self.notes}


def _measure(row: Row, name: str, call: Callable[[], torch.Tensor], reference: torch.Tensor | None,
             device: torch.device, runs: int, others: tuple = ()) -> None:
    with peak_memory(device, others) as peak:
        first_s, output = once_seconds(call, device)
        row.ms[name] = median_seconds(call, device, runs, warmup=0) * 1e3
    row.notes[f"{name}_first_call_ms"] = first_s * 1e3
    if reference is not None:
        row.max_relative_error[name] = relative_error(output, reference)
    if peak.gib is not None:
        row.peak_gib[name] = peak.gib


def _unet_pair(family: UNetFamily, device: torch.device, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: minutes faster than on the host for SDXL
        reference = UNet2DConditionModel.from_config(unet_config_to_diffusers(family.config)).eval()
    reference = reference.to(dtype)
    ours = UNetModel(family.config, device="meta")
    weights = unet_state_dict_from_diffusers(reference.state_dict(), family.config)
    ours.load_state_dict({name: tensor.clone() for name, tensor in weights.items()}, assign=True)
    return reference, ours.eval()


def _unet_inputs(family: UNetFamily, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(batch)
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)
    inputs = {"x": randn(batch, 4, family.latent, family.latent), "t": torch.full((batch,), 500.0, device=device),
              "context": randn(batch, 77, family.config.context_dim)}
    if family.config.adm_in_channels is not None:
        inputs["pooled"] = randn(batch, family.pooled_width)
        side = float(family.latent * 8)
        inputs["size_numbers"] = torch.tensor([[side, side, 0.0, 0.0, side, side]] * batch, device=device)
        inputs["y"] = sdxl_adm_input(inputs["pooled"], inputs["size_numbers"])
    return inputs


def bench_unet(family: UNetFamily, batches: list[int], device: torch.device, dtype: torch.dtype, runs: int,
               compile_mode: str | None = None, stream: bool = False) -> list[Row]:
    """Per batch: diffusers eager (and under a CUDA graph), ours plain, ours with the default accelerations,
    optionally ours compiled and ours streaming its weights (low-VRAM mode)."""
    reference, ours = _unet_pair(family, device, dtype)
    ours = ours.to(device)
    rows = []
    with torch.inference_mode():
        cases = [(batch, _unet_inputs(family, batch, device, dtype)) for batch in batches]
        expected = {}
        for batch, inputs in cases:
            row = Row(f"{family.name} UNet step, batch {batch}, {family.latent}x{family.latent} latent")
            def ref_step(x: torch.Tensor, inputs: dict = inputs) -> torch.Tensor:
                extra = {}
                if "pooled" in inputs:
                    extra["added_cond_kwargs"] = {"text_embeds": inputs["pooled"], "time_ids": inputs["size_numbers"]}
                return reference(x, inputs["t"], encoder_hidden_states=inputs["context"], **extra).sample
            expected[batch] = ref_step(inputs["x"])
            _measure(row, "reference", lambda: ref_step(inputs["x"]), expected[batch], device, runs, others=(ours,))
            if device.type == "cuda":
                # The reference's own module captured whole: what graphs give without our model code.
                graphs = StepGraphs(CudaGraphBackend())
                _measure(row, "reference_graphed", lambda: graphs(ref_step, (0,), inputs["x"]), expected[batch],
                         device, runs, others=(ours,))
            rows.append(row)
        ours.accelerate(PLAIN)
        for row, (batch, inputs) in zip(rows, cases):
            _measure(row, "ours_plain", lambda inputs=inputs: _our_call(ours, inputs), expected[batch], device,
                     runs, others=(reference,))
        ours.accelerate(AccelerationOptions())
        for row, (batch, inputs) in zip(rows, cases):
            _measure(row, "ours", lambda inputs=inputs: _our_call(ours, inputs), expected[batch], device, runs,
                     others=(reference,))
            row.notes["ours_host_syncs_per_step"] = count_cuda_syncs(lambda: _our_call(ours, inputs), device)
        if compile_mode:
            ours.accelerate(AccelerationOptions(compile_mode=compile_mode))
            for row, (batch, inputs) in zip(rows, cases):
                _measure(row, "ours_compiled", lambda inputs=inputs: _our_call(ours, inputs), expected[batch],
                         device, runs, others=(reference,))
                row.notes["compile_seconds"] = sum(ours.acceleration.compile_seconds.values())
                ours.acceleration.compile_seconds.clear()
        if stream:
            _bench_streaming(ours, rows, cases, expected, device, runs, reference)
    for row in rows:
        _add_speedups(row)
    return rows


def _our_call(ours: UNetModel, inputs: dict) -> torch.Tensor:
    return ours(inputs["x"], inputs["t"], inputs["context"], inputs.get("y"))


def _bench_streaming(ours: UNetModel, rows: list[Row], cases: list, expected: dict, device: torch.device,
                     runs: int, reference: torch.nn.Module) -> None:
    """Weights at home on the host (pinned), one block at a time on the device: its cost and its memory."""
    ours.to("cpu")
    try:
        with ours.stream_weights(device) as streamer:
            for row, (batch, inputs) in zip(rows, cases):
                streamer.uploaded_bytes = 0
                _measure(row, "ours_streamed", lambda inputs=inputs: _our_call(ours, inputs), expected[batch],
                         device, runs, others=(reference,))
                row.notes["streamed_gib_per_step"] = streamer.uploaded_bytes / (runs + 1) / 2**30
    finally:
        ours.to(device)


def _add_speedups(row: Row) -> None:
    base = row.ms.get("reference")
    if base:
        row.notes["speedup_vs_reference"] = {name: base / ms for name, ms in row.ms.items() if name != "reference"}


def bench_vae_decode(config: VAEConfig, latents: list[int], device: torch.device, dtype: torch.dtype,
                     runs: int) -> list[Row]:
    """Decode of one latent per size: diffusers, ours plain (NCHW), ours default (channels-last on CUDA)."""
    from diffusers import AutoencoderKL as ReferenceVAE
    torch.manual_seed(0)
    with torch.device(device):
        reference = ReferenceVAE.from_config(vae_config_to_diffusers(config)).eval()
    reference = reference.to(dtype)
    ours = AutoencoderKL(config, device="meta")
    weights = vae_state_dict_from_diffusers(reference.state_dict(), config)
    ours.load_state_dict({name: tensor.clone() for name, tensor in weights.items()}, assign=True)
    ours = ours.eval().to(device)
    rows = []
    fallbacks = _FallbackCounter()
    with torch.inference_mode(), fallbacks:
        for latent in latents:
            z = torch.randn(1, config.z_channels, latent, latent, generator=torch.Generator().manual_seed(latent))
            z = z.to(device, dtype)
            row = Row(f"VAE decode, {latent * 8} px")
            expected = reference.decode(z).sample
            _measure(row, "reference", lambda z=z: reference.decode(z).sample, expected, device, runs,
                     others=(ours,))
            ours.channels_last = False
            _measure(row, "ours_plain", lambda z=z: ours.decode(z), expected, device, runs, others=(reference,))
            ours.channels_last = None
            _measure(row, "ours", lambda z=z: ours.decode(z), expected, device, runs, others=(reference,))
            row.notes["fp32_fallbacks"] = fallbacks.take()
            _add_speedups(row)
            rows.append(row)
    return rows


class _FallbackCounter(logging.Handler):
    """Counts the VAE's "decoding again in float32" warnings: a decode that fell back is not an fp16 figure."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "float32" in record.getMessage()

    def take(self) -> int:
        count, self.count = self.count, 0
        return count

    def __enter__(self) -> _FallbackCounter:
        logging.getLogger("diffusion.vae").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("diffusion.vae").removeHandler(self)
