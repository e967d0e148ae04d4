"""Node types the server tests need beyond the engine's toy nodes: a node that takes real time."""
from __future__ import annotations

import time

from engine import ExecutionContext, Int, node


@node(category="toy", outputs=[("INT", "value")])
def Wait(value: Int(0), ticks: Int(10, min=1, max=10_000), *, context: ExecutionContext) -> tuple:
    for tick in range(ticks):
        time.sleep(0.02)
        context.progress(tick + 1, ticks, ("PNG", b"fake-png-bytes") if tick == 0 else None)
    return (value,)
