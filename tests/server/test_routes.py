"""The routes beyond running a prompt: queue and history edits, interrupts, /free, /view previews, mask
uploads, bounds on bodies and the queue, and the system description."""
from __future__ import annotations

import asyncio
import io
import json
from typing import Any, Callable

import aiohttp
import pytest
from PIL import Image

import server as sdgraph_server
from live_server import LiveServer, get_json, png_bytes, post_json, queue_and_collect, run, toy_prompt, wait_for_history

SLOW = {"1": {"class_type": "Wait", "inputs": {"value": 1, "ticks": 500}},
        "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}


async def start_slow(server: LiveServer) -> str:
    prompt_id = (await post_json(server, "/prompt", {"prompt": SLOW}))[1]["prompt_id"]
    while not (await get_json(server, "/queue"))[1]["queue_running"]:
        await asyncio.sleep(0.01)
    return prompt_id


def test_post_queue_clear_empties_the_pending_queue_and_leaves_the_running_prompt(live_server: LiveServer) -> None:
    async def scenario() -> tuple[Any, Any]:
        running = await start_slow(live_server)
        for value in range(3):
            await post_json(live_server, "/prompt", {"prompt": toy_prompt(value)})
        status, _ = await post_json(live_server, "/queue", {"clear": True})
        queue = (await get_json(live_server, "/queue"))[1]
        await post_json(live_server, "/interrupt", {})
        return (status, running), queue
    (status, running), queue = run(scenario())
    assert status == 200 and queue["queue_pending"] == [] and [i[1] for i in queue["queue_running"]] == [running]


def test_post_history_deletes_one_entry_or_clears_them_all(live_server: LiveServer) -> None:
    first, _, _ = run(queue_and_collect(live_server, toy_prompt(1)))
    second, _, _ = run(queue_and_collect(live_server, toy_prompt(2)))
    run(wait_for_history(live_server, second["prompt_id"]))
    assert run(post_json(live_server, "/history", {"delete": [first["prompt_id"]]}))[0] == 200
    assert list(run(get_json(live_server, "/history"))[1]) == [second["prompt_id"]]
    run(post_json(live_server, "/api/history", {"clear": True}))
    assert run(get_json(live_server, "/history"))[1] == {}
    assert run(post_json(live_server, "/history", {"delete": "not a list"}))[0] == 400


def test_interrupt_naming_another_prompt_leaves_the_running_one_alone(live_server: LiveServer) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        running = await start_slow(live_server)
        await post_json(live_server, "/interrupt", {"prompt_id": "not-the-running-one"})
        await asyncio.sleep(0.1)
        still = [item[1] for item in (await get_json(live_server, "/queue"))[1]["queue_running"]]
        await post_json(live_server, "/interrupt", {"prompt_id": running})
        entry = await wait_for_history(live_server, running)
        return still, [running], [kind for kind, _ in entry["status"]["messages"]]
    still, running, messages = run(scenario())
    assert still == running and messages[-1] == "execution_interrupted"


def test_object_info_of_an_unknown_class_is_empty(live_server: LiveServer) -> None:
    assert run(get_json(live_server, "/object_info/NoSuchNode")) == (200, {})


def test_free_drops_cached_results_and_releases_models(start_server: Callable[..., LiveServer]) -> None:
    released = []
    server = start_server(free_models=lambda: released.append(True))
    run(queue_and_collect(server, toy_prompt(2)))
    assert len(server.state.executor.cache) == 3
    assert run(post_json(server, "/free", {"unload_models": True}))[0] == 200
    assert len(server.state.executor.cache) == 0 and released == [True]
    run(post_json(server, "/free", {}))
    assert released == [True]


def test_system_stats_reports_versions_memory_and_devices(live_server: LiveServer) -> None:
    _, stats = run(get_json(live_server, "/system_stats"))
    system = stats["system"]
    assert system["ram_total"] > system["ram_free"] > 0
    assert system["versions"]["aiohttp"] == aiohttp.__version__ and system["sdgraph_version"] != ""
    device = stats["devices"][0]
    assert set(device) == {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"}


def test_features_and_embeddings(live_server: LiveServer) -> None:
    embeddings = live_server.settings.models_dir / "embeddings"
    embeddings.mkdir(parents=True)
    (embeddings / "easynegative.safetensors").write_bytes(b"")
    assert run(get_json(live_server, "/embeddings")) == (200, ["easynegative"])
    _, features = run(get_json(live_server, "/features"))
    assert features["max_upload_size"] == 100 * 1024 * 1024


async def fetch(server: LiveServer, query: str) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/view?{query}") as answer:
            return answer.status, await answer.read(), answer.content_type


def test_view_reencodes_a_preview_in_the_asked_format(live_server: LiveServer) -> None:
    (live_server.settings.output_dir / "big.png").write_bytes(png_bytes((10, 200, 30), (64, 48)))
    status, content, content_type = run(fetch(live_server, "filename=big.png&type=output&preview=webp;90"))
    assert (status, content_type) == (200, "image/webp")
    webp = Image.open(io.BytesIO(content))
    assert (webp.format, webp.size) == ("WEBP", (64, 48))
    status, content, content_type = run(fetch(live_server, "filename=big.png&preview=jpeg;80"))
    jpeg = Image.open(io.BytesIO(content))
    assert (content_type, jpeg.format) == ("image/jpeg", "JPEG")
    assert all(abs(a - b) <= 3 for a, b in zip(jpeg.getpixel((5, 5)), (10, 200, 30)))
    assert run(fetch(live_server, "filename=big.png&preview=tiff;1"))[0] == 400


def test_view_channels_split_color_and_alpha(live_server: LiveServer) -> None:
    (live_server.settings.output_dir / "rgba.png").write_bytes(png_bytes((10, 20, 30, 77), mode="RGBA"))
    _, rgb, _ = run(fetch(live_server, "filename=rgba.png&channel=rgb"))
    _, alpha, _ = run(fetch(live_server, "filename=rgba.png&channel=a"))
    assert Image.open(io.BytesIO(rgb)).getpixel((0, 0)) == (10, 20, 30)
    assert Image.open(io.BytesIO(alpha)).getpixel((0, 0)) == (0, 0, 0, 77)


def test_view_alpha_as_a_jpeg_preview_comes_as_webp_since_jpeg_has_no_alpha(live_server: LiveServer) -> None:
    (live_server.settings.output_dir / "rgba.png").write_bytes(png_bytes((10, 20, 30, 77), mode="RGBA"))
    status, content, content_type = run(fetch(live_server, "filename=rgba.png&preview=jpeg;80&channel=a"))
    assert (status, content_type) == (200, "image/webp")  # as ComfyUI: an alpha preview is always WebP
    assert Image.open(io.BytesIO(content)).getchannel("A").getpixel((0, 0)) == 77


async def upload(server: LiveServer, route: str, content: bytes, name: str, **fields: str) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("image", content, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}{route}", data=form) as answer:
            text = await answer.text()
            return answer.status, json.loads(text) if answer.content_type == "application/json" else text


def test_upload_mask_writes_the_masks_alpha_into_a_copy_of_the_original(live_server: LiveServer) -> None:
    (live_server.settings.output_dir / "portrait.png").write_bytes(png_bytes((200, 100, 50), (8, 8)))
    mask = png_bytes((0, 0, 0, 40), (4, 4), mode="RGBA")  # smaller than the original: it is resized
    reference = json.dumps({"filename": "portrait.png", "subfolder": "", "type": "output"})
    status, answer = run(upload(live_server, "/upload/mask", mask, "clipspace-mask.png",
                                original_ref=reference, subfolder="clipspace", type="input"))
    assert (status, answer) == (200, {"name": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"})
    written = Image.open(live_server.settings.input_dir / "clipspace" / "clipspace-mask.png")
    assert (written.mode, written.size) == ("RGBA", (8, 8))
    assert written.getpixel((3, 3)) == (200, 100, 50, 40)
    assert Image.open(live_server.settings.output_dir / "portrait.png").mode == "RGB"  # the original is kept


def test_upload_mask_keeps_the_originals_embedded_workflow(live_server: LiveServer) -> None:
    from PIL.PngImagePlugin import PngInfo
    texts = {"prompt": '{"1": {"class_type": "Output", "inputs": {"value": 1}}}', "workflow": '{"nodes": []}'}
    metadata = PngInfo()
    for key, value in texts.items():
        metadata.add_text(key, value)
    encoded = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(encoded, "PNG", pnginfo=metadata)
    (live_server.settings.output_dir / "saved.png").write_bytes(encoded.getvalue())
    reference = json.dumps({"filename": "saved.png", "subfolder": "", "type": "output"})
    status, _ = run(upload(live_server, "/upload/mask", png_bytes((0, 0, 0, 40), (8, 8), mode="RGBA"), "m.png",
                           original_ref=reference))
    assert status == 200
    # As ComfyUI: a masked copy of a saved image can still be dropped on the editor to reopen its workflow.
    written = Image.open(live_server.settings.input_dir / "m.png")
    assert written.text == texts


def test_upload_mask_needs_a_readable_original(live_server: LiveServer) -> None:
    mask = png_bytes((0, 0, 0, 40), mode="RGBA")
    assert run(upload(live_server, "/upload/mask", mask, "m.png"))[0] == 400
    missing = json.dumps({"filename": "nowhere.png", "type": "output"})
    assert run(upload(live_server, "/upload/mask", mask, "m.png", original_ref=missing))[0] == 404
    escaping = json.dumps({"filename": "../../etc/passwd", "type": "output"})
    assert run(upload(live_server, "/upload/mask", mask, "m.png", original_ref=escaping))[0] == 403


def test_uploads_must_be_images(live_server: LiveServer) -> None:
    status, answer = run(upload(live_server, "/upload/image", b"<script>", "cat.png"))
    assert status == 400 and answer["error"]["message"] == "the upload is not an image Pillow can read " \
                                                            "(UnidentifiedImageError)"
    status, answer = run(upload(live_server, "/upload/image", png_bytes(), "page.html"))
    assert status == 400 and "only images may be uploaded" in answer["error"]["message"]
    assert list(live_server.settings.input_dir.iterdir()) == []


def test_an_upload_over_the_size_limit_gets_413(start_server: Callable[..., LiveServer],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdgraph_server, "MAX_UPLOAD_BYTES", 1000)
    server = start_server()
    status, answer = run(upload(server, "/upload/image", png_bytes(size=(2000, 2000)) + b"\0" * 4_000_000, "x.png"))
    assert status == 413 and answer["error"]["type"] == "upload_too_large"


def test_a_json_body_over_the_limit_gets_413(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdgraph_server, "MAX_JSON_BYTES", 1000)  # as with the real 32 MiB, without sending it
    status, answer = run(post_json(live_server, "/prompt", {"prompt": toy_prompt(), "padding": "x" * 1001}))
    assert status == 413 and answer["error"]["message"] == "request bodies are limited to 1000 bytes"
    assert run(post_json(live_server, "/prompt", {"prompt": toy_prompt()}))[0] == 200


def test_a_full_queue_answers_503_and_a_greedy_client_429(start_server: Callable[..., LiveServer]) -> None:
    server = start_server(max_pending=2)

    async def scenario() -> list[tuple[int, Any]]:
        running = await start_slow(server)
        server.state.queue.max_pending_per_client = 1
        answers = [await post_json(server, "/prompt", {"prompt": toy_prompt(1), "client_id": "greedy"}),
                   await post_json(server, "/prompt", {"prompt": toy_prompt(2), "client_id": "greedy"}),
                   await post_json(server, "/prompt", {"prompt": toy_prompt(3), "client_id": "polite"}),
                   await post_json(server, "/prompt", {"prompt": toy_prompt(4), "client_id": "late"})]
        await post_json(server, "/interrupt", {"prompt_id": running})
        return answers
    answers = run(scenario())
    assert [status for status, _ in answers] == [200, 429, 200, 503]
    assert answers[1][1]["error"]["type"] == "client_queue_full"
    assert answers[3][1]["error"] == {"type": "queue_full", "message": "the queue is full (2 prompts waiting); "
                                      "try again later", "details": "", "extra_info": {}}


def test_a_prompt_id_given_twice_is_refused(live_server: LiveServer) -> None:
    body = {"prompt": toy_prompt(), "prompt_id": "mine"}
    assert run(post_json(live_server, "/prompt", body)) == (200, {"prompt_id": "mine", "number": 1,
                                                                  "node_errors": {}})
    status, answer = run(post_json(live_server, "/prompt", body))
    assert status == 400 and answer["error"]["type"] == "duplicate_prompt_id"


def test_malformed_bodies_get_400_with_a_reason(live_server: LiveServer) -> None:
    async def raw(body: bytes) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{live_server.url}/prompt", data=body) as answer:
                return answer.status, await answer.json()
    assert run(raw(b"{not json"))[0] == 400
    assert run(raw(b"\xff\xfe"))[1]["error"]["type"] == "invalid_json"
    assert run(raw(b"[1, 2]"))[1]["error"]["message"] == "request body must be a JSON object"
    status, answer = run(post_json(live_server, "/prompt", {"prompt": toy_prompt(), "extra_data": [1]}))
    assert (status, answer["error"]["message"]) == (400, "'extra_data' must be a JSON object")


def test_a_body_with_nan_infinity_or_an_endless_integer_is_not_json(live_server: LiveServer) -> None:
    async def raw(value: str) -> tuple[int, Any]:
        body = json.dumps({"prompt": toy_prompt(), "extra_data": {"note": 0}}).replace('"note": 0', f'"note": {value}')
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{live_server.url}/prompt", data=body) as answer:
                return answer.status, await answer.json()
    # Python's json reads these, but a stored NaN would make every /queue and /history answer unparseable
    # for browsers (JSON has no NaN); an integer of 5000 digits exceeds Python's conversion limit.
    for value in ("NaN", "-Infinity", "1e999", "1" * 5000):
        status, answer = run(raw(value))
        assert (status, answer["error"]["type"]) == (400, "invalid_json"), value
    assert run(get_json(live_server, "/queue")) == (200, {"queue_running": [], "queue_pending": []})


def test_a_number_too_large_for_a_float_is_refused_and_the_queue_still_answers(live_server: LiveServer) -> None:
    async def raw(number: str) -> tuple[int, Any]:
        body = json.dumps({"prompt": toy_prompt()})[:-1] + f', "number": {number}}}'
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{live_server.url}/prompt", data=body) as answer:
                return answer.status, await answer.json()
    for number in ("1" + "0" * 400, "-" + "9" * 400):  # integers too large for a float
        status, answer = run(raw(number))
        assert (status, answer["error"]["message"]) == (400, "'number' is too large"), number
    assert run(get_json(live_server, "/queue")) == (200, {"queue_running": [], "queue_pending": []})


def test_the_queue_interleaves_clients_instead_of_serving_a_flood_first(live_server: LiveServer) -> None:
    async def scenario() -> list[str]:
        running = await start_slow(live_server)
        for index in range(3):
            await post_json(live_server, "/prompt", {"prompt": toy_prompt(index), "client_id": "flood",
                                                     "prompt_id": f"flood{index}"})
        await post_json(live_server, "/prompt", {"prompt": toy_prompt(9), "client_id": "other", "prompt_id": "other0"})
        pending = [item[1] for item in (await get_json(live_server, "/queue"))[1]["queue_pending"]]
        await post_json(live_server, "/interrupt", {"prompt_id": running})
        return pending
    assert run(scenario()) == ["flood0", "other0", "flood1", "flood2"]
