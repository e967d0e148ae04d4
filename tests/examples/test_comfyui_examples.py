"""ComfyUI's own example workflows run unchanged: from the PNG, from the UI JSON and from the API JSON.

Each example first runs from its API JSON in a fresh executor. The PNG and the UI JSON then run in the same
executor: every node of theirs that the API run computed must be served from its cache (same class, same
constants, same ancestry signatures), and the images they save must be the API run's pixels. A UI
conversion that shifted one widget value would miss the cache at that node and change the pixels.
The tiny stand-ins (example_stand_ins.py) run at the examples' own sizes and step counts.

The two SDXL examples cannot run until an SDXL model stack exists: their converted prompts validate, and
running stops at the checkpoint loader with "SDXL ... not supported yet".
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cli import output_files
from engine import Executor, ExecutionResult, RunSettings, validate_prompt
from engine.workflow import read_workflow_file
from example_stand_ins import IMAGE_SIZES

FORMS = ("png", "ui", "api")

#: example -> {SaveImage node id: (height, width) of the image it saves}
SAVED_SIZES = {
    "lora_multiple": {"9": (512, 512)},
    "img2img_workflow": {"9": IMAGE_SIZES["example.png"][::-1]},
    "inpaint_example": {"9": IMAGE_SIZES["yosemite_inpaint_example.png"][::-1]},
    # ImagePadForOutpaint adds 128 px above and below.
    "inpain_model_outpainting": {"9": (IMAGE_SIZES["yosemite_outpaint_example.png"][1] + 256,
                                       IMAGE_SIZES["yosemite_outpaint_example.png"][0])},
    "hiresfix_latent_workflow": {"9": (768, 768), "12": (1152, 1152)},
    "workflow_night_evening_day_morning": {"9": (1280, 704), "32": (1920, 1088)},
    "noisy_latents_3_subjects": {"9": (1088, 1920)},
}
SDXL_EXAMPLES = {"sdxl_simple_example": {"4", "12"}, "sdxlturbo_example": {"20"}}


def saved_pixels(result: ExecutionResult, settings: RunSettings) -> dict[str, np.ndarray]:
    """The image each SaveImage node of a run wrote (the files `sdgraph run` reports), uint8 [H, W, 3]."""
    return {node_id: rgb(path) for node_id, [path] in output_files(result, settings).items()}


def rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def failure(result: ExecutionResult) -> str:
    found = result.error.data() if result.error is not None else {}
    return found.get("exception_message") or "\n".join(result.validation.messages())


@pytest.mark.parametrize("name", sorted(SAVED_SIZES))
def test_example_gives_the_same_pixels_from_png_ui_and_api(name, example_registry, example_settings,
                                                            example_source):
    executor = Executor(example_registry, settings=example_settings)
    first = executor.execute(read_workflow_file(example_source(name, "api"), example_registry))
    assert first.ok, failure(first)
    reference = saved_pixels(first, example_settings)
    assert {node_id: image.shape for node_id, image in reference.items()} == {
        node_id: (*size, 3) for node_id, size in SAVED_SIZES[name].items()}
    assert all(image.std() > 1.0 for image in reference.values()), "an example saved a flat image"
    computed = set(first.executed)
    for form in ("png", "ui"):
        result = executor.execute(read_workflow_file(example_source(name, form), example_registry))
        assert result.ok, f"{form}: {failure(result)}"
        recomputed = computed & set(result.executed) - set(SAVED_SIZES[name])
        assert not recomputed, f"{form}: nodes {sorted(recomputed)} missed the API run's cache"
        images = saved_pixels(result, example_settings)
        assert images.keys() == reference.keys()
        for node_id, image in images.items():
            assert np.array_equal(image, reference[node_id]), f"{form}: node {node_id} saved other pixels"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", sorted(SDXL_EXAMPLES))
def test_sdxl_example_validates_and_stops_at_its_loader_as_not_supported_yet(
        name, form, example_registry, example_settings, example_source):
    prompt = read_workflow_file(example_source(name, form), example_registry)
    validation = validate_prompt(prompt, example_registry, settings=example_settings)
    assert validation.ok, validation.messages()

    result = Executor(example_registry, settings=example_settings).execute(prompt)

    assert result.status == "error"
    error = result.error.data()
    assert error["node_type"] == "CheckpointLoaderSimple"
    assert error["node_id"] in SDXL_EXAMPLES[name]
    assert prompt[error["node_id"]]["inputs"]["ckpt_name"] in error["exception_message"]
    assert "SDXL" in error["exception_message"] and "not supported yet" in error["exception_message"]
