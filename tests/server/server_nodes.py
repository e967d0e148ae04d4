"""Node types the server tests need beyond the engine's toy nodes: one that takes real time, one that shows an image."""
from __future__ import annotations

import time

from engine import ExecutionContext, Int, NodeResult, String, node


@node(category="toy", outputs=[("INT", "value")])
def Wait(value: Int(0), ticks: Int(10, min=1, max=10_000), *, context: ExecutionContext) -> tuple:
    for tick in range(ticks):
        time.sleep(0.02)
        context.progress(tick + 1, ticks, ("PNG", b"fake-png-bytes") if tick == 0 else None)
    return (value,)


@node(category="toy", output_node=True)
def ShowInputImage(name: String("picture.png")) -> NodeResult:
    """Lists an input image as a ui image, as a preview node lists what it saved."""
    return NodeResult(ui={"images": [{"filename": name, "subfolder": "", "type": "input"}]})


@node(category="toy", outputs=[("INT", "value")])
def PreviewEveryTick(ticks: Int(50, min=1, max=10_000), *, context: ExecutionContext) -> tuple:
    """A sampler's shape: a JPEG preview at every step, faster than clients want them."""
    for tick in range(ticks):
        time.sleep(0.02)
        context.progress(tick + 1, ticks, ("JPEG", b"jpeg-%d" % (tick + 1)))
    return (ticks,)
