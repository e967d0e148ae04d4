"""The benchmark script runs end to end on tiny configs (what CI can afford) and reports sound figures.

Timings on a shared CPU prove nothing about speed; what is asserted is that every part ran, that every
variant of ours matches the reference on the same input, and that the JSON holds what the table shows.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_models.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bench_models_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    argv = ["--device", "cpu", "--tiny", "--runs", "1", "--batches", "2", "--vae-sizes", "64",
            "--txt2img-size", "64", "--steps", "2", "--stream", "--out", str(out)]
    returned = script.main(argv)
    return returned, json.loads(out.read_text())


def _rows(report: dict, prefix: str) -> list[dict]:
    return [row for row in report["results"] if row["work"].startswith(prefix)]


def test_the_json_file_holds_the_returned_report(report):
    returned, written = report
    assert written == json.loads(json.dumps(returned)) and written["tiny"] is True


def test_both_unet_families_run_every_cpu_variant_and_match_the_reference(report):
    _, written = report
    rows = _rows(written, "tiny SD1 UNet") + _rows(written, "tiny SDXL UNet")
    assert len(rows) == 2
    for row in rows:
        assert set(row["ms"]) == {"reference", "ours_plain", "ours", "ours_streamed"}
        assert all(ms > 0 for ms in row["ms"].values())
        assert max(row["max_relative_error"].values()) < 1e-5


def test_the_vae_decode_matches_the_reference_without_a_float32_fallback(report):
    _, written = report
    (row,) = _rows(written, "VAE decode, 64 px")
    assert max(row["max_relative_error"].values()) < 1e-5 and row["notes"]["fp32_fallbacks"] == 0


def test_txt2img_ran_through_the_executor_with_per_node_times(report):
    _, written = report
    (row,) = _rows(written, "txt2img 64x64, 2 steps")
    assert row["ms"]["ours"] > 0 and row["notes"]["images_per_s"] > 0
    assert set(row["notes"]["node_ms"]) >= {"5", "6"}  # KSampler and VAEDecode recomputed each seed


def test_the_checkpoint_load_and_sampler_loop_are_timed(report):
    _, written = report
    (load,) = _rows(written, "load ")
    (loop,) = _rows(written, "2-step KSampler")
    assert load["ms"]["ours"] > 0 and loop["ms"]["ours"] > 0 and loop["ms"]["reference"] > 0


def test_max_error_names_every_variant_past_the_limit_nan_included(script):
    report = {"results": [{"work": "a", "max_relative_error": {"ours": 1e-3, "ours_plain": 1e-6}},
                          {"work": "b", "max_relative_error": {"ours": float("nan")}}]}
    assert [(work, name) for work, name, _ in script.errors_over(report, 1e-4)] == [("a", "ours"), ("b", "ours")]
