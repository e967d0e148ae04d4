"""The live server the tests talk HTTP to, and what they need to start one: a uniquely named module, since
`from conftest import ...` would find whichever test folder's conftest was imported first."""
from __future__ import annotations

import io
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


def png_bytes(color: tuple[int, ...] = (255, 0, 0), size: tuple[int, int] = (4, 4), mode: str = "RGB") -> bytes:
    """A real PNG (uploads must be images) of one colour."""
    from PIL import Image
    encoded = io.BytesIO()
    Image.new(mode, size, color).save(encoded, "PNG")
    return encoded.getvalue()
