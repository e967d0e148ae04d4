"""Correctness of the accelerations where only a GPU can show it: real CUDA-graph capture and replay,
channels-last fp16 kernels, streaming over PCIe, an fp16 VAE overflow. Exits 1 on the first failure.

    .venv/bin/python bench/gpu_checks.py

The CPU test suite proves the same properties with stand-ins (tests/diffusion/test_acceleration.py); this
script is the part that needs the device, run by bench/gpu_run.sh before the timings.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import count_cuda_syncs  # noqa: E402
from diffusion.acceleration import AccelerationOptions  # noqa: E402
from diffusion.tiny_models import random_weights  # noqa: E402
from diffusion.unet import TINY_SD1_UNET, UNetModel  # noqa: E402
from diffusion.vae import TINY_VAE, AutoencoderKL  # noqa: E402

CUDA = torch.device("cuda")
PLAIN = AccelerationOptions(cuda_graphs=False, channels_last=False, stacked_projections=False)
FP16_TOLERANCE = 2e-3  # relative to the output's largest magnitude


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


def _check(name: str, ok: bool, detail: str) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return ok


def _unets() -> tuple[UNetModel, UNetModel]:
    weights = random_weights(UNetModel(TINY_SD1_UNET, device="meta"), 0)
    plain, fast = (UNetModel(TINY_SD1_UNET).eval() for _ in range(2))
    for unet in (plain, fast):
        unet.load_state_dict(weights)
    return plain.half().to(CUDA).accelerate(PLAIN), fast.half().to(CUDA).accelerate(AccelerationOptions())


def _inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=generator).to(CUDA)
    return x, torch.full((batch,), 100.0 + seed, device=CUDA), torch.randn(batch, 77, 32, generator=generator).to(CUDA)


def check_graphs() -> bool:
    plain, fast = _unets()
    results = []
    with torch.inference_mode():
        errors = [_error(fast(*_inputs(2, seed)), plain(*_inputs(2, seed))) for seed in range(4)]
        graphs = fast.acceleration.graphs
        results.append(_check("graph replay equals eager, 4 steps", max(errors) < FP16_TOLERANCE,
                              f"max error {max(errors):.1e}, captures {graphs.captures if graphs else 0}"))
        results.append(_check("one capture for one shape", graphs is not None and graphs.captures == 1,
                              f"{graphs.captures if graphs else 0} captures"))
        fast(*_inputs(4, 0))
        results.append(_check("a new batch size captures again", graphs.captures == 2, f"{graphs.captures}"))
        syncs = count_cuda_syncs(lambda: fast(*_inputs(2, 9)), CUDA)
        # _inputs uploads from pageable memory (two syncs of its own); the step must add none.
        upload_syncs = count_cuda_syncs(lambda: _inputs(2, 9), CUDA)
        results.append(_check("a replayed step makes no host sync", syncs == upload_syncs,
                              f"{syncs} syncs with {upload_syncs} from the input uploads"))
        name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
        delta = torch.randn(plain.get_parameter(name).shape, generator=torch.Generator().manual_seed(5))
        for unet in (plain, fast):
            unet.get_parameter(name).add_(delta.to(CUDA, torch.float16))  # a LoRA patch, in place
        error = _error(fast(*_inputs(2, 1)), plain(*_inputs(2, 1)))
        results.append(_check("an in-place weight patch reaches the replayed graph", error < FP16_TOLERANCE,
                              f"error {error:.1e}, captures still {graphs.captures}"))
        fast.to("cpu").to(CUDA)  # what the model manager does on offload and reload
        error = _error(fast(*_inputs(2, 2)), plain(*_inputs(2, 2)))
        results.append(_check("moved weights are captured again", error < FP16_TOLERANCE and graphs.captures == 3,
                              f"error {error:.1e}, captures {graphs.captures}"))
    return all(results)


def check_streaming() -> bool:
    plain, fast = _unets()
    fast.to("cpu")
    with torch.inference_mode(), fast.stream_weights(CUDA):
        errors = [_error(fast(*_inputs(2, seed)), plain(*_inputs(2, seed))) for seed in range(2)]
    on_device = [p for p in fast.parameters() if p.is_cuda]
    return _check("streamed weights give the resident output", max(errors) < FP16_TOLERANCE and not on_device,
                  f"max error {max(errors):.1e}, {len(on_device)} weights left on the device")


def check_vae_overflow() -> bool:
    weights = random_weights(AutoencoderKL(TINY_VAE, device="meta"), 0)
    for name in ("decoder.mid.block_1.conv1.weight", "decoder.mid.block_1.conv1.bias"):
        weights[name] = weights[name] * 3e4  # the GroupNorm after it undoes this; fp16 overflows before it
    full, half = AutoencoderKL(TINY_VAE).eval(), AutoencoderKL(TINY_VAE).eval()
    full.load_state_dict(weights)
    half.load_state_dict(weights)
    full, half = full.to(CUDA), half.half().to(CUDA)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.inference_mode():
        expected, got = full.decode(latent), half.decode(latent.half())
    finite = bool(torch.isfinite(got).all())
    error = _error(got, expected) if finite else float("inf")
    return _check("an overflowing fp16 VAE decode falls back to fp32", finite and error < FP16_TOLERANCE,
                  f"finite {finite}, error {error:.1e}")


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_checks.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name(CUDA)}, torch {torch.__version__}")
    passed = [check_graphs(), check_streaming(), check_vae_overflow()]
    raise SystemExit(0 if all(passed) else 1)


if __name__ == "__main__":
    main()
