"""The files the example workflows name, written as tiny stand-ins, and the workflows at CI size.

The workflows use the built-in demo checkpoint, so most need no files; these need what workflows/README.md
tells a user to put in place, under the names the README documents.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cli import apply_overrides
from diffusion.tiny_models import write_tiny_checkpoint, write_tiny_lora
from engine import Registry
from engine.workflow import read_workflow_file

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
SD2_V_CHECKPOINT = "v2-1_768-ema-pruned.safetensors"
LORA = "example-lora.safetensors"
#: input image -> (width, height); the inpaint image's transparent square is the area to repaint.
INPUT_IMAGES = {"example.png": (96, 64), "inpaint-example.png": (64, 64), "outpaint-example.png": (64, 64)}
#: Every EmptyLatentImage is shrunk to this in CI (the files ask for 512 or 768 px; the tiny UNet attends
#: over every latent pixel, which costs seconds a step at 512 px on two cores). Steps stay as written.
CI_LATENT_SIZE = 64


def write_workflow_files(models: Path, inputs: Path) -> None:
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    (models / "loras").mkdir(parents=True, exist_ok=True)
    inputs.mkdir(parents=True, exist_ok=True)
    write_tiny_checkpoint(models / "checkpoints" / SD2_V_CHECKPOINT, "sd2", seed=2, v_prediction=True)
    write_tiny_lora(models / "loras" / LORA, "sd1", seed=3)
    for name, (width, height) in INPUT_IMAGES.items():
        y, x = np.mgrid[0:height, 0:width]
        rings = 0.5 + 0.5 * np.cos(np.hypot(x - width / 2, y - height / 2) / 4.0)
        rgb = np.stack([rings, x / width, 1.0 - y / height], axis=-1)
        pixels = (rgb * 255).round().astype(np.uint8)
        if name.startswith("inpaint"):
            alpha = np.full((height, width, 1), 255, np.uint8)
            alpha[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 0
            pixels = np.concatenate([pixels, alpha], axis=-1)
        Image.fromarray(pixels).save(inputs / name)


def workflow_names() -> list[str]:
    return sorted(path.stem for path in WORKFLOWS.glob("*.json"))


def read_ci_workflow(name: str, registry: Registry) -> dict[str, Any]:
    """workflows/NAME.json as `sdgraph run` reads it, with `--set` overrides shrinking its empty latents."""
    prompt = read_workflow_file(WORKFLOWS / f"{name}.json", registry)
    return apply_overrides(prompt, ci_size_overrides(prompt), registry)


def ci_size_overrides(prompt: dict[str, Any]) -> list[str]:
    return [f"{node_id}.{side}={CI_LATENT_SIZE}" for node_id, body in prompt.items()
            if body["class_type"] == "EmptyLatentImage" for side in ("width", "height")]
