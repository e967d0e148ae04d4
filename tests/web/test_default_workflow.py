"""The first open against a server with the built-in SD nodes: ComfyUI's default txt2img on the demo
checkpoint, queued as it stands (made small) and run to an image."""
from __future__ import annotations

import json
import os
from pathlib import Path


from editor_page import api_prompt, drop_file, expect, node, screenshot


def test_the_default_txt2img_opens_and_runs_to_an_image(sd_editor) -> None:
    page = sd_editor
    expect(page.locator(".react-flow__node")).to_have_count(7)
    expect(page.locator(".react-flow__edge")).to_have_count(9)
    prompt = api_prompt(page)
    assert sorted(n["class_type"] for n in prompt.values()) == [
        "CLIPTextEncode", "CLIPTextEncode", "CheckpointLoaderSimple", "EmptyLatentImage", "KSampler", "SaveImage",
        "VAEDecode"]
    assert prompt["4"]["inputs"] == {"ckpt_name": "sdgraph-demo-tiny-sd1.safetensors"}
    sampler = {k: v for k, v in prompt["3"]["inputs"].items() if k != "seed"}
    assert sampler == {"steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
                       "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}
    assert prompt["5"]["inputs"] == {"width": 512, "height": 512, "batch_size": 1}
    expect(page.get_by_test_id("w-3-seed-control")).to_have_value("randomize")
    screenshot(page, "default-txt2img")

    for widget, value in (("w-5-width", "64"), ("w-5-height", "64"), ("w-3-steps", "2")):
        page.get_by_test_id(widget).fill(value)
        page.get_by_test_id(widget).blur()
    seed_sent = int(page.get_by_test_id("w-3-seed").input_value())
    page.keyboard.press("Control+Enter")
    expect(page.get_by_test_id("status")).to_have_text("done", timeout=120_000)
    expect(page.get_by_test_id("progress-3")).to_have_attribute("title", "2 / 2")
    expect(page.locator(node("3") + ' [data-testid="preview"]')).to_be_visible()  # the sampler's live preview
    result = page.get_by_test_id("result-9")
    expect(result).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth === 64", arg=result.element_handle())
    assert int(page.get_by_test_id("w-3-seed").input_value()) != seed_sent  # randomized for the next run
    expect(page.locator(node("3") + " .sd-node")).not_to_have_class("error")
    screenshot(page, "default-txt2img-result")


EXAMPLES = Path(os.environ.get("SDGRAPH_COMFYUI_EXAMPLES",
                               Path(__file__).parents[3] / "shared" / "data" / "comfyui-examples"))


def test_every_comfyui_example_png_dropped_on_the_canvas_opens_its_workflow(sd_editor) -> None:
    pngs = sorted(EXAMPLES.glob("*.png"))
    assert len(pngs) == 9
    for png in pngs:
        workflow = json.loads((EXAMPLES / f"{png.stem}.workflow.json").read_text())
        drop_file(sd_editor, png.read_bytes(), png.name, "image/png")
        expect(sd_editor.get_by_test_id("tab").first).to_contain_text(png.stem)
        expect(sd_editor.locator(".react-flow__node-sd")).to_have_count(len(workflow["nodes"]))
        expect(sd_editor.locator(".react-flow__edge")).to_have_count(len(workflow["links"]))
        assert sd_editor.evaluate("window.sdgraph.workflow().groups.length") == len(workflow.get("groups", []))
    screenshot(sd_editor, "comfyui-example-dropped")
