"""A real sdgraph server on a loopback port, in a thread of its own, for the tests to talk HTTP to."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from live_server import LiveServer, launch


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Starts servers with Server's keyword options (auth_token, max_pending, web_root, ...) and a preview
    setting; all stop at the end of the test."""
    stops: list[Callable[[], None]] = []

    def start(**options: Any) -> LiveServer:
        server, stop = launch(tmp_path / f"server{len(stops)}", **options)
        stops.append(stop)
        return server

    yield start
    for stop in stops:
        stop()


@pytest.fixture
def live_server(start_server: Callable[..., LiveServer]) -> LiveServer:
    return start_server()
