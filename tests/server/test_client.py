"""engine.client against a real server: submit, wait with progress, images, interrupt, queue, errors."""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from engine.client import AsyncClient, Client, PromptFailed, PromptRejected
from live_server import LiveServer, png_bytes, toy_prompt

SLOW = {"1": {"class_type": "Wait", "inputs": {"value": 1, "ticks": 500}},
        "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}


def image_prompt(name: str) -> dict[str, Any]:
    return {"1": {"class_type": "ShowInputImage", "inputs": {"name": name}}}


def test_submit_and_wait_return_the_history_entry_with_every_progress_message(live_server: LiveServer) -> None:
    seen: list[tuple[str, Any]] = []
    prompt = {"1": {"class_type": "Wait", "inputs": {"value": 4, "ticks": 3}},
              "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}
    with Client(live_server.url) as client:
        prompt_id = client.submit(prompt)
        entry = client.wait(prompt_id, on_progress=lambda kind, data: seen.append((kind, data.get("value"))),
                            timeout=10)
    assert entry["outputs"] == {"2": {"value": [4]}}
    assert [value for kind, value in seen if kind == "progress"] == [1, 2, 3]
    assert seen[0] == ("execution_start", None) and seen[-1] == ("executing", None)


def test_images_fetches_every_image_a_prompt_lists(live_server: LiveServer) -> None:
    picture = png_bytes((9, 8, 7))
    (live_server.settings.input_dir / "seen.png").write_bytes(picture)
    with Client(live_server.url) as client:
        prompt_id = client.submit(image_prompt("seen.png"))
        client.wait(prompt_id, timeout=10)
        assert client.images(prompt_id) == [picture]
        assert client.images(prompt_id, as_pil=True)[0].getpixel((0, 0)) == (9, 8, 7)


def test_an_invalid_workflow_is_rejected_with_its_node_errors(live_server: LiveServer) -> None:
    prompt = toy_prompt()
    prompt["1"]["inputs"]["value"] = 5000
    with Client(live_server.url) as client, pytest.raises(PromptRejected) as rejected:
        client.submit(prompt)
    assert rejected.value.status == 400 and "1" in rejected.value.body["node_errors"]


def test_a_failing_prompt_raises_prompt_failed_naming_the_node(live_server: LiveServer) -> None:
    failing = {"1": {"class_type": "Fail", "inputs": {"value": 1, "message": "kaput"}},
               "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}
    with Client(live_server.url) as client:
        prompt_id = client.submit(failing)
        with pytest.raises(PromptFailed, match=r"node 1 \(Fail\) failed: RuntimeError: kaput"):
            client.wait(prompt_id, timeout=10)


def test_interrupt_and_queue_from_the_async_client(live_server: LiveServer) -> None:
    async def scenario() -> tuple[dict[str, Any], str]:
        async with AsyncClient(live_server.url) as client:
            started = asyncio.Event()
            prompt_id = await client.submit(SLOW)
            waiting = asyncio.create_task(client.wait(
                prompt_id, on_progress=lambda kind, data: started.set() if kind == "progress" else None, timeout=10))
            await asyncio.wait_for(started.wait(), 10)
            queue = await client.queue()
            await client.interrupt()
            with pytest.raises(PromptFailed, match="interrupted") as failed:
                await waiting
            return queue, failed.value.prompt_id
    queue, failed_id = asyncio.run(scenario())
    assert [item[1] for item in queue["queue_running"]] == [failed_id]


def test_wait_falls_back_to_the_history_when_events_went_to_another_client(live_server: LiveServer) -> None:
    with Client(live_server.url) as client:
        prompt_id = client.submit(toy_prompt(1), client_id="someone-else")
        assert client.wait(prompt_id, timeout=10)["outputs"] == {"3": {"value": [4]}}


def test_wait_times_out_on_a_prompt_that_does_not_finish(live_server: LiveServer) -> None:
    with Client(live_server.url) as client:
        prompt_id = client.submit(SLOW)
        with pytest.raises(TimeoutError, match="did not finish within 0.2 s"):
            client.wait(prompt_id, timeout=0.2)
        client.interrupt()


def test_the_sync_client_works_from_several_threads(live_server: LiveServer) -> None:
    results: list[dict[str, Any]] = []
    with Client(live_server.url) as client:
        def one(value: int) -> None:
            results.append(client.wait(client.submit(toy_prompt(value)), timeout=20)["outputs"]["3"])
        threads = [threading.Thread(target=one, args=(value,)) for value in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert sorted(result["value"][0] for result in results) == [3, 4, 5, 6]
