"""Whole-image work: a 20-step txt2img through the executor with the real nodes, loading a checkpoint from
disk, and the sampler loop's own overhead against diffusers' scheduler loop."""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.model_cases import Row
from bench.timing import count_cuda_syncs, median_seconds, once_seconds, peak_memory, synchronize
from diffusion.checkpoints import load_checkpoint
from diffusion.text_encoders import SD1_CLIP_L, ClipTextEncoder
from diffusion.tiny_models import tiny_overrides, write_tiny_checkpoint
from diffusion.unet import SD1_UNET, UNetModel
from diffusion.vae import SD_VAE, AutoencoderKL

CHECKPOINT_NAME = "bench-sd15.safetensors"
TXT2IMG_NODES = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
                 "PreviewImage")


def write_sd15_checkpoint(path: Path, device: torch.device, dtype: torch.dtype, tiny: bool) -> Path:
    """A single-file SD1.5 checkpoint with random weights in the LDM layout (full size unless `tiny`)."""
    if tiny:
        return write_tiny_checkpoint(path, "sd1", dtype=dtype)
    with torch.device(device):  # PyTorch's own random init, on the device where it is fast
        parts = {"model.diffusion_model.": UNetModel(SD1_UNET), "first_stage_model.": AutoencoderKL(SD_VAE),
                 "cond_stage_model.transformer.text_model.": ClipTextEncoder(SD1_CLIP_L)}
    tensors = {}
    for prefix, module in parts.items():
        for name, tensor in module.state_dict().items():
            key = prefix + name.removeprefix("transformer.")
            tensors[key] = tensor.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(path))
    return path


def bench_checkpoint_load(path: Path, device: torch.device, dtype: torch.dtype, runs: int, tiny: bool) -> Row:
    """Seconds from a file in the page cache to the three models on the device, ready to run."""
    row = Row(f"load {path.stat().st_size / 2**30:.2f} GiB checkpoint from disk (warm cache)")
    # Head counts are not in the weights: a tiny file's must be given (real widths imply them).
    overrides = tiny_overrides("sd1") if tiny else None
    def load() -> object:
        loaded = load_checkpoint(path, device=device, dtype=dtype, overrides=overrides)
        synchronize(device)
        return loaded
    row.ms["ours"] = median_seconds(load, device, runs, warmup=1) * 1e3
    return row


def _txt2img_prompt(side: int, seed: int, steps: int, batch: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk, oil painting",
                                                          "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": side, "height": side, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def bench_txt2img(device: torch.device, dtype: torch.dtype, side: int, steps: int, runs: int, tiny: bool,
                  batches: tuple[int, ...] = (1,)) -> list[Row]:
    """txt2img through engine.Executor with the real nodes on a checkpoint written to a temp models folder:
    the first (cold) run, then runs with a new seed each (the loader and text encodes stay cached, as
    they do for a user changing the seed), and a checkpoint load."""
    from cli import load_registry
    from engine import Executor, RunSettings

    with tempfile.TemporaryDirectory(prefix="sdgraph-bench-") as folder:
        root = Path(folder)
        (root / "models" / "checkpoints").mkdir(parents=True)
        path = write_sd15_checkpoint(root / "models" / "checkpoints" / CHECKPOINT_NAME, device, dtype, tiny)
        rows = [bench_checkpoint_load(path, device, dtype, min(runs, 3), tiny)]
        registry = load_registry([])
        missing = [name for name in TXT2IMG_NODES if name not in set(registry.names())]
        if missing:
            rows.append(Row("txt2img through the executor", notes={"skipped": f"nodes missing: {missing}"}))
            return rows
        settings = RunSettings(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                               temp_dir=root / "temp", device=device.type, preview="none")
        executor = Executor(registry, settings=settings)
        for batch in batches:
            rows.append(_txt2img_row(executor, device, side, steps, runs, batch))
    return rows


def _txt2img_row(executor, device: torch.device, side: int, steps: int, runs: int, batch: int) -> Row:
    row = Row(f"txt2img {side}x{side}, {steps} steps euler cfg 7, batch {batch}, through the executor")
    seeds = iter(range(10_000))
    def run() -> object:
        result = executor.execute(_txt2img_prompt(side, next(seeds), steps, batch))
        if not result.ok:
            raise RuntimeError(f"txt2img prompt failed: {result.error or result.validation}")
        return result
    with peak_memory(device) as peak:
        cold_s, _ = once_seconds(run, device)
        samples, node_ms = [], []
        for _ in range(runs):
            seconds, result = once_seconds(run, device)
            samples.append(seconds)
            node_ms.append(result.timings)
    row.ms["ours"] = statistics.median(samples) * 1e3
    row.notes["cold_first_run_ms"] = cold_s * 1e3
    row.notes["images_per_s"] = batch / statistics.median(samples)
    row.notes["node_ms"] = {key: statistics.median(t.get(key, 0.0) for t in node_ms) * 1e3
                            for key in node_ms[-1]}
    if peak.gib is not None:
        row.peak_gib["ours"] = peak.gib
    return row


def bench_sampler_loop(device: torch.device, steps: int, runs: int) -> Row:
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

    row = Row(f"{steps}-step KSampler euler cfg 8, stand-in network, 64x64 latent (loop overhead)")
    with torch.inference_mode():
        row.ms["ours"] = median_seconds(ours, device, runs) * 1e3
        row.ms["reference"] = median_seconds(reference, device, runs) * 1e3
    row.notes["ours_ms_per_step"] = row.ms["ours"] / steps
    with torch.inference_mode():
        row.notes["ours_host_syncs_per_run"] = count_cuda_syncs(ours, device)
    row.notes["speedup_vs_reference"] = {"ours": row.ms["reference"] / row.ms["ours"]}
    return row


