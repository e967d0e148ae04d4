"""Every workflow in workflows/ runs end to end on tiny models through the real node registry.

Each runs as `sdgraph run` reads it, its empty latents shrunk to 64 px with `--set`-style overrides
(workflow_files.py): the images it saves have the expected sizes, a second run in a fresh executor saves the
same pixels, and another seed saves different ones. One also runs through the `sdgraph run` subprocess.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import apply_overrides, output_files
from engine import Executor, ExecutionResult, RunSettings
from nodes.loaders import DEMO_CHECKPOINT
from workflow_files import (CI_LATENT_SIZE, INPUT_IMAGES, LORA, SD2_V_CHECKPOINT, WORKFLOWS, ci_size_overrides,
                            workflow_names)

SIDE = CI_LATENT_SIZE
#: workflow -> {SaveImage node id: (height, width)} at CI size
SAVED_SIZES = {
    "txt2img": {"9": (SIDE, SIDE)},
    "img2img": {"9": INPUT_IMAGES["example.png"][::-1]},
    "inpaint": {"9": INPUT_IMAGES["inpaint-example.png"][::-1]},
    "outpaint": {"9": (INPUT_IMAGES["outpaint-example.png"][1], INPUT_IMAGES["outpaint-example.png"][0] + 256)},
    "hires-fix": {"9": (SIDE, SIDE), "12": (SIDE * 3 // 2, SIDE * 3 // 2)},
    "lora": {"9": (SIDE, SIDE)},
    "area-composition": {"9": (SIDE, SIDE)},
    "custom-sampler": {"9": (SIDE, SIDE)},
    "denoise-step-loop": {"9": (SIDE, SIDE)},
    "sd2-v-prediction": {"9": (SIDE, SIDE)},
}
SEED_INPUTS = ("seed", "noise_seed")
FILE_INPUTS = ("ckpt_name", "lora_name", "vae_name", "image")


def run(prompt: dict, registry, settings: RunSettings, executor: Executor | None = None) -> dict[str, np.ndarray]:
    """The images the prompt's SaveImage nodes wrote, as uint8 arrays [H, W, 3]."""
    result = (executor or Executor(registry, settings=settings)).execute(prompt)
    assert result.ok, describe_failure(result)
    return saved_images(result, settings)


def saved_images(result: ExecutionResult, settings: RunSettings) -> dict[str, np.ndarray]:
    return {node_id: rgb(path) for node_id, [path] in output_files(result, settings).items()}


def rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def describe_failure(result: ExecutionResult) -> str:
    if result.error is None:
        return "\n".join(result.validation.messages())
    data = result.error.data()
    return f"node {data['node_id']} ({data['node_type']}): {data.get('exception_message')}"


def with_other_seeds(prompt: dict) -> dict:
    changed = json.loads(json.dumps(prompt))
    for body in changed.values():
        for name in SEED_INPUTS:
            if name in body["inputs"]:
                body["inputs"][name] += 1
    return changed


def test_every_workflow_file_has_its_expected_outputs_listed():
    assert workflow_names() == sorted(SAVED_SIZES)


def test_the_readme_has_a_line_for_every_workflow_and_names_every_file_they_need():
    readme = (WORKFLOWS / "README.md").read_text()
    assert sorted(re.findall(r"^\| `([\w-]+)\.json` \|", readme, re.M)) == workflow_names()
    prompts = [json.loads((WORKFLOWS / f"{name}.json").read_text()) for name in workflow_names()]
    needed = {value for prompt in prompts for body in prompt.values() for key, value in body["inputs"].items()
              if key in FILE_INPUTS and isinstance(value, str) and value != DEMO_CHECKPOINT}
    assert needed == {SD2_V_CHECKPOINT, LORA, *INPUT_IMAGES}
    assert all(f"`{file_name}`" in readme for file_name in needed)


@pytest.mark.parametrize("name", sorted(SAVED_SIZES))
def test_workflow_saves_its_images_deterministically_and_a_seed_changes_them(
        name, load_workflow, workflow_registry, workflow_settings):
    prompt = load_workflow(name)
    first = run(prompt, workflow_registry, workflow_settings)
    assert {node_id: image.shape for node_id, image in first.items()} == {
        node_id: (*size, 3) for node_id, size in SAVED_SIZES[name].items()}
    assert all(image.std() > 1.0 for image in first.values()), "a workflow saved a flat image"

    executor = Executor(workflow_registry, settings=workflow_settings)
    again = run(prompt, workflow_registry, workflow_settings, executor)
    reseeded = run(with_other_seeds(prompt), workflow_registry, workflow_settings, executor)

    for node_id, image in first.items():
        assert np.array_equal(again[node_id], image), f"node {node_id}: a second run saved other pixels"
        changed = np.abs(reseeded[node_id].astype(int) - image).mean()
        assert changed > 1.0, f"node {node_id}: another seed changed the pixels by only {changed:.2f}/255"


def test_the_denoise_step_loop_draws_the_image_ksampler_euler_draws(load_workflow, workflow_registry,
                                                                    workflow_settings):
    loop = load_workflow("denoise-step-loop")
    steps = loop["12"]["inputs"]["steps"]
    txt2img = apply_overrides(load_workflow("txt2img"), ["3.steps=%d" % steps, "3.sampler_name=euler",
                                                         "3.scheduler=normal", "3.seed=42", "3.cfg=8.0"],
                              workflow_registry)
    assert loop["6"] == txt2img["6"] and loop["7"] == txt2img["7"]  # the same prompts

    by_nodes = run(loop, workflow_registry, workflow_settings)["9"]
    by_ksampler = run(txt2img, workflow_registry, workflow_settings)["9"]

    assert np.abs(by_nodes.astype(int) - by_ksampler).max() <= 1


def test_the_lora_workflow_at_strength_zero_is_txt2img_and_its_lora_changes_the_image(
        load_workflow, workflow_registry, workflow_settings):
    lora = load_workflow("lora")
    without = apply_overrides(lora, ["10.strength_model=0", "10.strength_clip=0"], workflow_registry)
    executor = Executor(workflow_registry, settings=workflow_settings)

    txt2img = run(load_workflow("txt2img"), workflow_registry, workflow_settings, executor)["9"]
    at_zero = run(without, workflow_registry, workflow_settings, executor)["9"]
    patched = run(lora, workflow_registry, workflow_settings, executor)["9"]

    assert np.array_equal(at_zero, txt2img)
    assert np.abs(patched.astype(int) - txt2img).mean() > 1.0


def test_sdgraph_run_command_runs_a_workflow_file(workflow_settings, tmp_path):
    workflow = WORKFLOWS / "txt2img.json"
    overrides = [arg for item in ci_size_overrides(json.loads(workflow.read_text())) for arg in ("--set", item)]
    output = tmp_path / "output"
    command = [sys.executable, "-m", "cli", "run", str(workflow), *overrides, "--json", "--device", "cpu",
               "--models-dir", str(workflow_settings.models_dir), "--input-dir", str(workflow_settings.input_dir),
               "--output-dir", str(output), "--temp-dir", str(tmp_path / "temp")]
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2],
                              env=environment)

    assert finished.returncode == 0, finished.stderr[-2000:]
    summary = json.loads(finished.stdout)
    assert summary["status"] == "success"
    [saved] = summary["outputs"]["9"]["files"]
    assert Path(saved).parent == output
    with Image.open(saved) as image:
        assert image.size == (SIDE, SIDE)
        assert json.loads(image.text["prompt"])["3"]["class_type"] == "KSampler"
