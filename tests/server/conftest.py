"""A real sdgraph server on a loopback port, in a thread of its own, for the tests to talk HTTP to."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from aiohttp import web

import server as sdgraph_server
import server_nodes
from engine import Registry, RunSettings, import_node_module
from live_server import TOY_NODES, LiveServer, free_port


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Starts servers with Server's keyword options (auth_token, max_pending, web_root, ...) and a preview
    setting; all stop at the end of the test."""
    stops: list[Callable[[], None]] = []

    def start(preview: str = "auto", **options: Any) -> LiveServer:
        registry = Registry()
        registry.load_module(import_node_module(str(TOY_NODES)))
        registry.load_module(server_nodes)
        root = tmp_path / f"server{len(stops)}"
        settings = RunSettings(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                               temp_dir=root / "temp", device="cpu", preview=preview)
        state = sdgraph_server.Server(settings, registry, allowed_hosts=sdgraph_server.allowed_hosts_for("127.0.0.1"),
                                      **options)
        port = free_port()
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(state.app())
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert started.wait(10), "server did not start"

        def stop() -> None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
        stops.append(stop)
        return LiveServer(f"http://127.0.0.1:{port}", settings, state)

    yield start
    for stop in stops:
        stop()


@pytest.fixture
def live_server(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server()
