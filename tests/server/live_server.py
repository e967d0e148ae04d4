"""The live server the tests talk HTTP to, and what they need to start one: a uniquely named module, since
`from conftest import ...` would find whichever test folder's conftest was imported first."""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import server as sdgraph_server
from engine import RunSettings

TOY_NODES = Path(__file__).parents[1] / "engine" / "toy_nodes.py"


@dataclass
class LiveServer:
    url: str
    settings: RunSettings
    state: sdgraph_server.Server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
