"""Where each sampler makes the host wait for the device, per run and per step, found without a GPU.

    .venv/bin/python bench/sync_audit.py [--json PATH]

Every sampler runs through `diffusion.sampling.sample` (KSampler's path: guidance, schedule, noise) on a
latent on PyTorch's "meta" device with a stand-in network, inside `diffusion.host_syncs.record_host_syncs`.
A read of a meta tensor's value is exactly what would stall the host on a GPU; sigmas and other host values
never count. Running 4 and 8 steps separates the once-per-run reads from the per-step ones. The UNet step
itself is audited the same way in tests/diffusion/test_acceleration.py (it makes none).

Read the "to(meta) from host" uploads with care: on CUDA, diffusion.sampling.noise.to_device pins the noise
and copies it with non_blocking=True, which does not wait; on meta there is no pinned memory to show that.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.host_syncs import HostSync, record_host_syncs  # noqa: E402
from diffusion.sampling import SAMPLER_NAMES, DiscreteModelSampling, SamplingModel, sample  # noqa: E402

# These draw their noise with a generator on the latent's device, which meta does not have.
DEVICE_NOISE_SAMPLERS = tuple(name for name in SAMPLER_NAMES if name.endswith("_gpu"))


def _network(x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: object = None) -> torch.Tensor:
    return x * 0.1 + context.mean() * 0.01


def _syncs(sampler_name: str, steps: int) -> list[HostSync]:
    model = SamplingModel(_network, DiscreteModelSampling())
    latent = torch.zeros(1, 4, 8, 8, device="meta")
    cond, uncond = (torch.zeros(1, 77, 32, device="meta") for _ in range(2))
    with torch.inference_mode(), record_host_syncs() as found:
        sample(model, [[cond, {}]], [[uncond, {}]], latent, seed=0, steps=steps, cfg=8.0,
               sampler_name=sampler_name, scheduler="normal")
    return found


def audit(sampler_name: str) -> dict:
    """Counts per site: how many reads a run makes regardless of steps, and how many each step adds."""
    short, long = Counter(_syncs(sampler_name, 4)), Counter(_syncs(sampler_name, 8))
    sites = sorted(set(short) | set(long), key=lambda s: s.site)
    per_step = {f"{s.read} @ {s.site}": (long[s] - short[s]) / 4 for s in sites if long[s] != short[s]}
    per_run = {f"{s.read} @ {s.site}": short[s] - 4 * (long[s] - short[s]) / 4 for s in sites}
    return {"sampler": sampler_name, "per_run": {k: v for k, v in per_run.items() if v},
            "per_step": per_step}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    for name in SAMPLER_NAMES:
        if name in DEVICE_NOISE_SAMPLERS:
            results.append({"sampler": name, "skipped": "draws noise on the device; meta has no generator"})
            continue
        results.append(audit(name))
    for row in results:
        if "skipped" in row:
            print(f"{row['sampler']:<32} skipped: {row['skipped']}")
            continue
        steps = "; ".join(f"{v:g}x {k}" for k, v in row["per_step"].items()) or "none"
        print(f"{row['sampler']:<32} per step: {steps}")
    once = Counter(site for row in results for site in row.get("per_run", {}))
    print("\nonce per run (all samplers): " + "; ".join(sorted(once)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
