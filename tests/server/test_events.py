"""Websocket event sequences as ComfyUI's clients expect them, per client, with rate-limited previews."""
from __future__ import annotations

import asyncio
import io
import json
from typing import Any, Callable

import aiohttp

from live_server import LiveServer, queue_and_collect, run, toy_prompt

FAILING = {"1": {"class_type": "Fail", "inputs": {"value": 1, "message": "kaput"}},
           "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages if m["type"] != "status"]


def test_a_cached_run_replays_its_outputs_without_executing_a_node(live_server: LiveServer) -> None:
    run(queue_and_collect(live_server, toy_prompt(2)))
    queued, messages, _ = run(queue_and_collect(live_server, toy_prompt(2)))
    assert kinds(messages) == ["execution_start", "execution_cached", "executed", "execution_success", "executing"]
    executed = next(m for m in messages if m["type"] == "executed")["data"]
    assert executed == {"node": "3", "display_node": "3", "output": {"value": [5]}, "prompt_id": queued["prompt_id"]}


def test_a_failing_run_ends_with_its_error_then_executing_null(live_server: LiveServer) -> None:
    queued, messages, _ = run(queue_and_collect(live_server, FAILING))
    assert kinds(messages) == ["execution_start", "execution_cached", "executing", "execution_error", "executing"]
    assert messages[-1]["data"] == {"node": None, "display_node": None, "prompt_id": queued["prompt_id"]}


def test_the_queue_status_follows_the_end_of_a_run(live_server: LiveServer) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{live_server.url}/ws?clientId=watcher") as socket:
                await socket.receive(5)
                await session.post(f"{live_server.url}/prompt", json={"prompt": toy_prompt(5), "client_id": "watcher"})
                messages: list[dict[str, Any]] = []
                while not (messages and messages[-1]["type"] == "status"
                           and messages[-1]["data"]["status"]["exec_info"]["queue_remaining"] == 0
                           and any(m["type"] == "executing" and m["data"]["node"] is None for m in messages)):
                    messages.append(json.loads((await socket.receive(5)).data))
                return messages
    messages = run(scenario())
    assert [m["type"] for m in messages][-2:] == ["executing", "status"]


def test_two_clients_running_at_once_each_hear_only_their_own_prompts(live_server: LiveServer) -> None:
    async def both() -> list[tuple[dict[str, Any], list[dict[str, Any]], list[bytes]]]:
        slow = {"1": {"class_type": "Wait", "inputs": {"value": 3, "ticks": 5}},
                "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}
        return await asyncio.gather(queue_and_collect(live_server, slow, client_id="alice"),
                                    queue_and_collect(live_server, toy_prompt(9), client_id="bob"))
    (alice_queued, alice, _), (bob_queued, bob, _) = run(both())
    for queued, messages in ((alice_queued, alice), (bob_queued, bob)):
        prompt_ids = {m["data"].get("prompt_id") for m in messages if m["type"] != "status"}
        assert prompt_ids == {queued["prompt_id"]}
    assert "progress" in kinds(alice) and "progress" not in kinds(bob)


def previews_of(server: LiveServer, ticks: int) -> tuple[list[bytes], list[dict[str, Any]]]:
    prompt = {"1": {"class_type": "PreviewEveryTick", "inputs": {"ticks": ticks}},
              "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}
    _, messages, frames = run(queue_and_collect(server, prompt, timeout=20))
    return frames, messages


def test_previews_are_sent_at_most_four_a_second(live_server: LiveServer) -> None:
    frames, messages = previews_of(live_server, 50)  # 50 previews over a second or more
    assert len([m for m in messages if m["type"] == "progress"]) == 50
    assert 2 <= len(frames) <= 6
    assert frames[0] == (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"jpeg-1"


def test_preview_none_sends_no_frames(start_server: Callable[..., LiveServer]) -> None:
    frames, messages = previews_of(start_server(preview="none"), 5)
    assert frames == [] and len([m for m in messages if m["type"] == "progress"]) == 5


def test_a_client_reconnecting_mid_run_learns_the_running_node(live_server: LiveServer) -> None:
    slow = {"1": {"class_type": "Wait", "inputs": {"value": 1, "ticks": 500}},
            "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}

    async def scenario() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{live_server.url}/ws?clientId=flaky") as first:
                await session.post(f"{live_server.url}/prompt", json={"prompt": slow, "client_id": "flaky"})
                while json.loads((await first.receive(5)).data)["type"] != "progress":
                    pass
            async with session.ws_connect(f"{live_server.url}/ws?clientId=flaky") as second:
                greeting = [json.loads((await second.receive(5)).data) for _ in range(2)]
            await session.post(f"{live_server.url}/interrupt")
            return greeting
    greeting = run(scenario())
    assert greeting[0]["type"] == "status" and greeting[0]["data"]["sid"] == "flaky"
    assert greeting[1]["type"] == "executing" and greeting[1]["data"]["node"] == "1"


def test_a_pil_preview_is_encoded_and_shrunk_to_its_largest_side() -> None:
    from PIL import Image

    from server import preview_frame
    frame = preview_frame(("JPEG", Image.new("RGB", (1024, 512), (0, 128, 255)), 256))
    assert frame[:8] == (1).to_bytes(4, "big") + (1).to_bytes(4, "big")
    decoded = Image.open(io.BytesIO(frame[8:]))
    assert (decoded.format, decoded.size) == ("JPEG", (256, 128))
    assert preview_frame(("GIF", b"x")) is None and preview_frame(("JPEG", object())) is None
