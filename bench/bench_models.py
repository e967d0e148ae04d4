"""Speed of our UNet, VAE and sampler loop against the reference (diffusers), same weights, same process.

    .venv/bin/python bench/bench_models.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--latent 32] [--runs 5]

Real SD1.5 architectures (860 M UNet parameters, the SD VAE) with random weights: speed does not depend on
the values. Each figure is the median of `--runs` timed calls after a warm-up; on CUDA the clock is read
after a synchronise. Every benchmark first checks that ours and the reference agree on the same input, so
a fast wrong answer cannot pass for a result. Results go to bench/results/models-<device>-<dtype>.json.

What moves these ratios: both sides call the same SDPA and cuDNN/oneDNN kernels, so on CPU the ratio is
expected near 1 (a model is bound by its convolutions and matmuls); on a GPU in eager mode both are bound
by kernel launches and the ratio shows the per-module Python overhead.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.key_maps import (unet_config_to_diffusers, unet_state_dict_from_diffusers,  # noqa: E402
                                vae_config_to_diffusers, vae_state_dict_from_diffusers)
from diffusion.unet import SD1_UNET, UNetModel  # noqa: E402
from diffusion.vae import SD_VAE, AutoencoderKL  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timed(call: Callable[[], object], device: torch.device, runs: int) -> float:
    """Median seconds of `runs` calls after one warm-up call."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    call()
    sync()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        sync()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def bench_unet(device: torch.device, dtype: torch.dtype, latent: int, batch: int, runs: int) -> dict:
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    reference = UNet2DConditionModel.from_config(unet_config_to_diffusers(SD1_UNET)).eval()
    ours = UNetModel(SD1_UNET, device="meta")
    ours.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict(), SD1_UNET), assign=True)
    reference, ours = reference.to(device, dtype), ours.eval().to(device, dtype)
    x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device)
    context = torch.randn(batch, 77, SD1_UNET.context_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        error = relative_error(ours(x, t, context), reference(x, t, encoder_hidden_states=context).sample)
        ours_s = timed(lambda: ours(x, t, context), device, runs)
        reference_s = timed(lambda: reference(x, t, encoder_hidden_states=context).sample, device, runs)
    return {"work": f"SD1.5 UNet, batch {batch}, {latent}x{latent} latent", "ours_ms": ours_s * 1e3,
            "reference_ms": reference_s * 1e3, "speedup": reference_s / ours_s, "max_relative_error": error}


def bench_vae_decode(device: torch.device, dtype: torch.dtype, latent: int, runs: int) -> dict:
    from diffusers import AutoencoderKL as ReferenceVAE
    torch.manual_seed(0)
    reference = ReferenceVAE.from_config(vae_config_to_diffusers(SD_VAE)).eval()
    ours = AutoencoderKL(SD_VAE, device="meta")
    ours.load_state_dict(vae_state_dict_from_diffusers(reference.state_dict(), SD_VAE), assign=True)
    reference, ours = reference.to(device, dtype), ours.eval().to(device, dtype)
    z = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    with torch.inference_mode():
        error = relative_error(ours.decode(z), reference.decode(z).sample)
        ours_s = timed(lambda: ours.decode(z), device, runs)
        reference_s = timed(lambda: reference.decode(z).sample, device, runs)
    return {"work": f"SD VAE decode, {latent * 8} px", "ours_ms": ours_s * 1e3, "reference_ms": reference_s * 1e3,
            "speedup": reference_s / ours_s, "max_relative_error": error}


def bench_sampler_loop(device: torch.device, steps: int, runs: int) -> dict:
    """Per-step overhead of a KSampler run (euler, cfg 8: cond and uncond batched, guidance, schedule) on a
    network that costs almost nothing, against diffusers' EulerDiscreteScheduler driven with CFG the way
    its pipelines drive it. Both call the same stand-in network, so the difference is the loop itself."""
    from diffusers import EulerDiscreteScheduler

    from diffusion.sampling import DiscreteModelSampling, SamplingModel, sample

    latent = torch.zeros(1, 4, 64, 64, device=device)
    cond, uncond = (torch.randn(1, 77, 768, device=device) for _ in range(2))

    def network(x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: object = None) -> torch.Tensor:
        return x * 0.1 + context.mean() * 0.01

    model = SamplingModel(network, DiscreteModelSampling())

    def ours() -> torch.Tensor:
        return sample(model, [[cond, {}]], [[uncond, {}]], latent, seed=0, steps=steps, cfg=8.0,
                      sampler_name="euler", scheduler="normal")

    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="linspace")
    contexts = torch.cat([uncond, cond])

    def reference() -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(latent.shape, generator=generator).to(device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_uncond, eps_cond = network(model_input, t, contexts).chunk(2)
            x = scheduler.step(eps_uncond + 8.0 * (eps_cond - eps_uncond), t, x).prev_sample
        return x
    with torch.inference_mode():
        ours_s = timed(ours, device, runs)
        reference_s = timed(reference, device, runs)
    return {"work": f"{steps}-step KSampler euler cfg 8, stand-in network, 64x64 latent",
            "ours_ms": ours_s * 1e3, "reference_ms": reference_s * 1e3, "speedup": reference_s / ours_s,
            "ours_ms_per_step": ours_s * 1e3 / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default 64 on CUDA, 32 on CPU)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per figure (default 30 CUDA, 3 CPU)")
    parser.add_argument("--only", choices=("unet", "vae", "sampler"), action="append")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if on_cuda else "fp32")]
    latent = args.latent or (64 if on_cuda else 32)
    runs = args.runs or (30 if on_cuda else 3)
    chosen = set(args.only or ("unet", "vae", "sampler"))
    results = []
    if "unet" in chosen:
        results.append(bench_unet(device, dtype, latent, 2, runs))
    if "vae" in chosen:
        results.append(bench_vae_decode(device, dtype, latent, runs))
    if "sampler" in chosen:
        results.append(bench_sampler_loop(device, 20, runs))
    for row in results:
        error = f"  max rel error {row['max_relative_error']:.1e}" if "max_relative_error" in row else ""
        print(f"{row['work']:<52} ours {row['ours_ms']:9.2f} ms  reference {row['reference_ms']:9.2f} ms  "
              f"x{row['speedup']:.2f}{error}")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    name = out / f"models-{device.type}-{[k for k, v in DTYPES.items() if v == dtype][0]}.json"
    name.write_text(json.dumps({"device": str(device), "dtype": str(dtype), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "results": results}, indent=2))
    print(f"written {name}")


if __name__ == "__main__":
    main()
