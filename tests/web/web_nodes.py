"""Toy node types the editor's end-to-end tests drive: an IMAGE pipeline without torch, so a queued
workflow shows progress, live previews and a result image within a second."""
from __future__ import annotations

import io
import time

from PIL import Image

from engine import Combo, ExecutionContext, Int, NodeResult, RunSettings, Socket, String, node
from engine.paths import list_files, resolve_inside

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220)}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@node(category="test/image", outputs=[("IMAGE", "image")])
def SolidImage(colour: Combo(list(COLOURS), default="red"), size: Int(32, min=8, max=256, step=8),
               seed: Int(0, min=0, max=2**32 - 1, control_after_generate=True)) -> tuple:
    return (Image.new("RGB", (size, size), COLOURS[colour]),)


@node(category="test/image", outputs=[("IMAGE", "image")])
def SlowBrighten(image: Socket("IMAGE"), steps: Int(4, min=1, max=100), *, context: ExecutionContext) -> tuple:
    """Takes real time and reports each step with a PNG preview, as a sampler does."""
    for step in range(steps):
        time.sleep(0.05)
        context.progress(step + 1, steps, ("PNG", png_bytes(image)))
    return (image.point(lambda v: min(255, v + 20)),)


@node(category="test/image", output_node=True)
def ShowImage(image: Socket("IMAGE"), filename_prefix: String("web"), *, context: ExecutionContext) -> NodeResult:
    name = f"{filename_prefix}_{int(time.time() * 1000)}.png"
    target = resolve_inside(context.settings.output_dir, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target)
    return NodeResult(ui={"images": [{"filename": name, "subfolder": "", "type": "output"}]})


def _input_images(settings: RunSettings) -> list[str]:
    return list_files(settings.input_dir, (".png",))


@node(category="test/image", outputs=[("IMAGE", "image")])
def LoadTestImage(image: Combo(_input_images, image_upload=True), *, context: ExecutionContext) -> tuple:
    """An image from the input folder, chosen or uploaded in the editor, as LoadImage is."""
    return (Image.open(resolve_inside(context.settings.input_dir, image)).convert("RGB"),)
