"""Speed of our UNet, VAE and whole txt2img against the reference (diffusers), same weights, same process.

    .venv/bin/python bench/bench_models.py [--device cpu|cuda] [--tiny] [--only unet,vae,txt2img,sampler]
                                           [--families sd15,sdxl] [--batches 1,2,8] [--compile MODE] [--stream]

Real SD1.5 and SDXL architectures with random weights (speed does not depend on the values); `--tiny` runs
the tiny test configs instead, in seconds on a CPU (what CI runs). Each figure is the median of `--runs`
calls after a warm-up, the device synchronised before every clock read; the first call (CUDA-graph capture,
compile) is reported separately. Every variant's output is compared with the reference's on the same input,
so a fast wrong answer cannot pass for a result. The table goes to stdout and everything to a JSON file
(default bench/results/models-<device>-<dtype>[-tiny].json).

Variants: `reference` diffusers eager; `reference_graphed` the same module captured in a CUDA graph (CUDA
only); `ours_plain` our UNet with every acceleration off; `ours` with the defaults (diffusion/acceleration.py:
CUDA graphs and channels-last on CUDA, stacked q/k/v everywhere); `ours_compiled` with `--compile MODE`;
`ours_streamed` with `--stream` (weights streamed block by block from pinned host memory: low-VRAM mode).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model_cases import (TINY_UNET_FAMILIES, UNET_FAMILIES, VAE_CONFIGS, Row,  # noqa: E402
                               bench_unet, bench_vae_decode)
from bench.pipeline import bench_sampler_loop, bench_txt2img  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("unet", "vae", "txt2img", "sampler")


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: the whole run in seconds on a CPU")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    parser.add_argument("--families", default=None, help="UNets: sd15,sdxl (default both on CUDA or --tiny, "
                                                         "sd15 on a CPU)")
    parser.add_argument("--batches", type=_ints, default=None, help="UNet batches (default 1,2,8; 1,2 on CPU)")
    parser.add_argument("--latent", type=int, default=None, help="SD1.5 latent side (SDXL: twice it); "
                                                                 "default 64 on CUDA, 32 on CPU")
    parser.add_argument("--vae-sizes", type=_ints, default=None, help="decode sizes in px (default 512,1024; "
                                                                      "256 on CPU)")
    parser.add_argument("--txt2img-size", type=int, default=None, help="default 512 (256 on CPU, 64 tiny)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per figure (default 30 CUDA, 3 CPU)")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="also time torch.compile(mode=MODE) of our UNet (minutes per shape on CUDA)")
    parser.add_argument("--stream", action="store_true", help="also time the low-VRAM weight streaming")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--max-error", type=float, default=None,
                        help="exit 1 if any variant's max relative error against the reference exceeds this")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, on_progress: Callable[[dict], None] = lambda report: None) -> dict:
    """Every part asked for; `on_progress` gets the report so far after each part."""
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if on_cuda else "fp32")]
    runs = args.runs or (30 if on_cuda else 3)
    parts = set(args.only.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        raise SystemExit(f"--only: unknown parts {sorted(unknown)}; choose from {PARTS}")
    families = (args.families or ("sd15,sdxl" if on_cuda or args.tiny else "sd15")).split(",")
    batches = args.batches or ([1, 2, 8] if on_cuda or args.tiny else [1, 2])
    rows: list[Row] = []
    report = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if on_cuda else None,
              "dtype": str(dtype), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "tiny": args.tiny, "runs": runs, "results": []}

    def done(new_rows: list[Row]) -> None:
        rows.extend(new_rows)
        report["results"] = [row.as_json() for row in rows]
        on_progress(report)
        _release(device)

    if "unet" in parts:
        table = TINY_UNET_FAMILIES if args.tiny else UNET_FAMILIES
        for name in families:
            family = table[name]
            latent = args.latent or (64 if on_cuda else 32)
            if not args.tiny:
                family = type(family)(family.name, family.config, latent * (2 if name == "sdxl" else 1))
            done(bench_unet(family, batches, device, dtype, runs, args.compile, args.stream))
    if "vae" in parts:
        sizes = args.vae_sizes or ([64, 128] if args.tiny else [512, 1024] if on_cuda else [256])
        config = VAE_CONFIGS["tiny" if args.tiny else "full"]
        done(bench_vae_decode(config, [size // 8 for size in sizes], device, dtype, runs))
    if "txt2img" in parts:
        side = args.txt2img_size or (64 if args.tiny else 512 if on_cuda else 256)
        done(bench_txt2img(device, dtype, side, args.steps, runs if on_cuda else min(runs, 3), args.tiny))
    if "sampler" in parts:
        done([bench_sampler_loop(device, args.steps, runs)])
    return report


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_table(report: dict) -> str:
    """Medians in ms per variant, then the speed-up of `ours` over the reference and its worst error."""
    variants = ["reference", "reference_graphed", "ours_plain", "ours", "ours_compiled", "ours_streamed"]
    present = [v for v in variants if any(v in row["ms"] for row in report["results"])]
    header = f"{'work':<66}" + "".join(f"{v:>19}" for v in present) + f"{'x vs ref':>10}{'max err':>10}"
    lines = [header]
    for row in report["results"]:
        cells = "".join(f"{row['ms'][v]:>16.2f} ms" if v in row["ms"] else f"{'':>19}" for v in present)
        speedup = row["notes"].get("speedup_vs_reference", {}).get("ours")
        errors = list(row["max_relative_error"].values())
        lines.append(f"{row['work'][:65]:<66}{cells}" + (f"{speedup:>10.2f}" if speedup else f"{'':>10}")
                     + (f"{max(errors):>10.1e}" if errors else ""))
        if "skipped" in row["notes"]:
            lines.append(f"    skipped: {row['notes']['skipped']}")
    return "\n".join(lines)


def errors_over(report: dict, limit: float) -> list[tuple[str, str, float]]:
    """(work, variant, error) for every variant further than `limit` from the reference (NaN included)."""
    return [(row["work"], name, error) for row in report["results"]
            for name, error in row["max_relative_error"].items() if not error <= limit]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to()
    out = args.out
    if out is None:
        dtype_name = args.dtype or ("fp16" if torch.device(args.device).type == "cuda" else "fp32")
        suffix = "-tiny" if args.tiny else ""
        out = Path(__file__).resolve().parent / "results" / f"models-{args.device}-{dtype_name}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(report: dict) -> None:
        # Written after every part, so a run cut short by a time limit keeps what it measured.
        out.write_text(json.dumps(report, indent=2))
        print(format_table(report), flush=True)

    report = run(args, save)
    print(f"written {out}")
    if args.max_error is not None:
        worst = errors_over(report, args.max_error)
        for work, name, error in worst:
            print(f"ERROR {work}: {name} is {error:.2e} from the reference (allowed {args.max_error:g})")
        if worst:
            raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
