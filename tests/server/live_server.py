"""The live server the tests talk HTTP to, and what they need to start one: a uniquely named module, since
`from conftest import ...` would find whichever test folder's conftest was imported first."""
from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp
from aiohttp import web

import server as sdgraph_server
import server_nodes
from engine import Registry, RunSettings, import_node_module

TOY_NODES = Path(__file__).parents[1] / "engine" / "toy_nodes.py"


@dataclass
class LiveServer:
    url: str
    settings: RunSettings
    state: sdgraph_server.Server


def launch(root: Path, preview: str = "auto", **options: Any) -> tuple[LiveServer, Callable[[], None]]:
    """A server over folders under `root`, with the toy and server nodes, running in a thread of its own;
    returns it and the function that stops it. `options` are Server's keyword options."""
    registry = Registry()
    registry.load_module(import_node_module(str(TOY_NODES)))
    registry.load_module(server_nodes)
    settings = RunSettings(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                           temp_dir=root / "temp", device="cpu", preview=preview)
    state = sdgraph_server.Server(settings, registry, allowed_hosts=sdgraph_server.allowed_hosts_for("127.0.0.1"),
                                  **options)
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(state.app())
    started = threading.Event()

    def run_server() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run_server, daemon=True)
    thread.start()
    assert started.wait(10), "server did not start"

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    return LiveServer(f"http://127.0.0.1:{port}", settings, state), stop


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_bytes(color: tuple[int, ...] = (255, 0, 0), size: tuple[int, int] = (4, 4), mode: str = "RGB") -> bytes:
    """A real PNG (uploads must be images) of one colour."""
    from PIL import Image
    encoded = io.BytesIO()
    Image.new(mode, size, color).save(encoded, "PNG")
    return encoded.getvalue()


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def toy_prompt(value: int = 2) -> dict[str, Any]:
    return {"1": {"class_type": "Constant", "inputs": {"value": value}},
            "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 3}},
            "3": {"class_type": "Output", "inputs": {"value": ["2", 0]}, "_meta": {"title": "Show"}}}


async def queue_and_collect(server: LiveServer, prompt: dict[str, Any], client_id: str = "tester",
                            timeout: float = 10.0) -> tuple[dict[str, Any], list[dict[str, Any]], list[bytes]]:
    """Connect a websocket, queue `prompt`, and collect messages until `executing` with node null."""
    messages: list[dict[str, Any]] = []
    frames: list[bytes] = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as socket:
            messages.append(json.loads((await socket.receive(timeout)).data))
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as answer:
                assert answer.status == 200, await answer.text()
                queued = await answer.json()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                message = await socket.receive(timeout)
                if message.type == aiohttp.WSMsgType.BINARY:
                    frames.append(message.data)
                    continue
                messages.append(json.loads(message.data))
                if messages[-1]["type"] == "executing" and messages[-1]["data"]["node"] is None:
                    return queued, messages, frames
    raise AssertionError(f"prompt did not finish; got {[m['type'] for m in messages]}")


async def get_json(server: LiveServer, path: str, **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + path, headers=headers) as answer:
            text = await answer.text()
            return answer.status, json.loads(text) if answer.content_type == "application/json" else text


async def post_json(server: LiveServer, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + path, json=body, headers=headers) as answer:
            text = await answer.text()
            return answer.status, json.loads(text) if answer.content_type == "application/json" else text


async def wait_for_history(server: LiveServer, prompt_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, history = await get_json(server, f"/history/{prompt_id}")
        if history:
            return history[prompt_id]
        await asyncio.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} never reached the history")
