"""The caching and memory proofs (issue 5), through engine.Executor with the real node registry.

A txt2img prompt (loader, two CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, SaveImage) on a tiny
SD1 checkpoint. What a run recomputed is read from the executor's own events: `execution_cached` lists the
nodes served from the cache and `executing` names each node that ran.
"""
from __future__ import annotations

import gc
import os

import pytest

import cli
from diffusion.tiny_models import write_tiny_checkpoint
from engine import Executor, RunSettings
from engine.events import ExecutionCached, Executing

CHECKPOINT = "tiny-sd1.safetensors"
LOADER, EMPTY, POSITIVE, NEGATIVE, SAMPLER, DECODE, SAVE = "4", "5", "6", "7", "3", "8", "9"


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> RunSettings:
    base = tmp_path_factory.mktemp("caching_tree")
    (base / "models" / "checkpoints").mkdir(parents=True)
    write_tiny_checkpoint(base / "models" / "checkpoints" / CHECKPOINT, "sd1")
    return RunSettings(models_dir=base / "models", input_dir=base / "input", output_dir=base / "output",
                       temp_dir=base / "temp", device="cpu")


def txt2img(seed: int = 1, positive: str = "a lighthouse at dusk", steps: int = 4) -> dict:
    return {
        LOADER: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        EMPTY: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        POSITIVE: {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": [LOADER, 1]}},
        NEGATIVE: {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": [LOADER, 1]}},
        SAMPLER: {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": [LOADER, 0], "positive": [POSITIVE, 0], "negative": [NEGATIVE, 0], "latent_image": [EMPTY, 0]}},
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": [LOADER, 2]}},
        SAVE: {"class_type": "SaveImage", "inputs": {"images": [DECODE, 0], "filename_prefix": "proof"}},
    }


class EventLog:
    def __init__(self, executor: Executor) -> None:
        self.events: list = []
        executor.subscribe(self.events.append)

    def take(self) -> tuple[set[str], set[str]]:
        """(nodes the last run served from the cache, nodes it ran), from its events; then forget them."""
        cached = {node for event in self.events if isinstance(event, ExecutionCached) for node in event.nodes}
        ran = {event.node for event in self.events if isinstance(event, Executing) and event.node is not None}
        self.events.clear()
        return cached, ran


@pytest.fixture
def executor(settings) -> Executor:
    return Executor(cli.load_registry([]), settings=settings)


def test_a_new_seed_reuses_the_loaded_checkpoint_and_the_encoded_prompts(executor):
    log = EventLog(executor)
    assert executor.execute(txt2img(seed=1)).ok
    assert log.take() == (set(), {LOADER, EMPTY, POSITIVE, NEGATIVE, SAMPLER, DECODE, SAVE})
    assert executor.execute(txt2img(seed=2)).ok
    assert log.take() == ({LOADER, EMPTY, POSITIVE, NEGATIVE}, {SAMPLER, DECODE, SAVE})


def test_a_new_positive_prompt_re_encodes_only_that_prompt_and_what_follows(executor):
    log = EventLog(executor)
    assert executor.execute(txt2img(positive="a lighthouse at dusk")).ok
    log.take()
    assert executor.execute(txt2img(positive="a lighthouse at dawn")).ok
    assert log.take() == ({LOADER, EMPTY, NEGATIVE}, {POSITIVE, SAMPLER, DECODE, SAVE})


def resident_bytes() -> int:
    """This process's resident set size, from /proc/self/statm (its second field, in pages)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


# After the warm-up runs (allocator pools, lazily imported code, the first cached results) the remaining runs
# may add the outputs the cache keeps (~50 KB each) and allocator noise. A leaked copy of the text encoder per
# run (6 MB) would exceed the bound within 9 runs, one of the checkpoint (40 MB) within 2.
RSS_GROWTH_BOUND = 50 * 2**20
WARM_UP_RUNS = 3


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for resident memory")
def test_twenty_runs_do_not_grow_resident_memory(executor):
    # Each run gets the next seed (the seed widget's "increment"), so the sampler, decoder and saver all run.
    for seed in range(WARM_UP_RUNS):
        assert executor.execute(txt2img(seed=seed, steps=2)).ok
    gc.collect()
    after_warm_up = resident_bytes()
    for seed in range(WARM_UP_RUNS, 20):
        assert executor.execute(txt2img(seed=seed, steps=2)).ok
    gc.collect()
    growth = resident_bytes() - after_warm_up
    # measured: under 0.1 MB over runs 4..20 (CPU, tiny SD1)
    assert growth < RSS_GROWTH_BOUND, f"resident memory grew by {growth / 2**20:.1f} MB over 17 runs"
