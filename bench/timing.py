"""Clocks for the benchmark: medians after warm-up, synchronised on CUDA, and peak device memory."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(call: Callable[[], object], device: torch.device, runs: int, warmup: int = 1) -> float:
    """Median wall time of `runs` calls after `warmup` calls, the device drained before each clock read."""
    for _ in range(warmup):
        call()
    synchronize(device)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        synchronize(device)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def once_seconds(call: Callable[[], object], device: torch.device) -> tuple[float, object]:
    synchronize(device)
    started = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - started, result


@dataclass
class PeakMemory:
    """Peak device bytes allocated inside a `with` block, less weights that belong to other models."""

    bytes: int | None = None

    @property
    def gib(self) -> float | None:
        return None if self.bytes is None else self.bytes / 2**30


@contextmanager
def peak_memory(device: torch.device, others: tuple[nn.Module, ...] = ()) -> Iterator[PeakMemory]:
    """On CUDA, the peak of `max_memory_allocated` in the block minus the weights of `others` (the
    reference model kept on the device while ours is measured); elsewhere None."""
    peak = PeakMemory()
    if device.type != "cuda":
        yield peak
        return
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield peak
    synchronize(device)
    other_bytes = sum(t.numel() * t.element_size() for m in others for t in m.parameters() if t.is_cuda)
    peak.bytes = torch.cuda.max_memory_allocated(device) - other_bytes


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|, in float32."""
    ours, reference = ours.float(), reference.float()
    return float((ours - reference).abs().max() / reference.abs().max())


def count_cuda_syncs(call: Callable[[], object], device: torch.device) -> int | None:
    """How many times `call` made the host wait for the GPU (torch's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    import warnings
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
