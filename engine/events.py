"""Execution events, in ComfyUI's websocket vocabulary and order, delivered synchronously to subscribers.

Each event's `type` is the websocket message type and `data()` its payload (comfyui-interface.md section 7),
so a server forwards them 1:1. A normal run emits: ExecutionStart, ExecutionCached, then per node Executing
(+ Progress ticks, + Executed for nodes with `ui` output, + NodeDone), ExecutionSuccess, and finally
Executing(node=None), which older clients wait for. A failed run ends ExecutionError or
ExecutionInterrupted, then Executing(node=None). NodeDone is sdgraph's own (`comfyui = False`): it carries
per-node timings and is not a ComfyUI message.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = ""
    comfyui: ClassVar[bool] = True
    prompt_id: str

    def data(self) -> dict[str, Any]:
        """The websocket payload (`{"type": event.type, "data": event.data()}`)."""
        return asdict(self)


@dataclass(frozen=True)
class ExecutionStart(Event):
    type: ClassVar[str] = "execution_start"
    timestamp: int = field(default_factory=_now_ms)


@dataclass(frozen=True)
class ExecutionCached(Event):
    type: ClassVar[str] = "execution_cached"
    nodes: list[str] = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)


@dataclass(frozen=True)
class Executing(Event):
    type: ClassVar[str] = "executing"
    node: str | None = None

    def data(self) -> dict[str, Any]:
        return {"node": self.node, "display_node": self.node, "prompt_id": self.prompt_id}


@dataclass(frozen=True)
class Progress(Event):
    type: ClassVar[str] = "progress"
    node: str = ""
    value: int | float = 0
    max: int | float = 0
    preview: Any = field(default=None, compare=False)

    def data(self) -> dict[str, Any]:
        # The preview image travels separately, as a binary frame.
        return {"value": self.value, "max": self.max, "prompt_id": self.prompt_id, "node": self.node}


@dataclass(frozen=True)
class Executed(Event):
    type: ClassVar[str] = "executed"
    node: str = ""
    output: dict[str, Any] = field(default_factory=dict)

    def data(self) -> dict[str, Any]:
        return {"node": self.node, "display_node": self.node, "output": self.output, "prompt_id": self.prompt_id}


@dataclass(frozen=True)
class NodeDone(Event):
    type: ClassVar[str] = "node_done"
    comfyui: ClassVar[bool] = False
    node: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class ExecutionSuccess(Event):
    type: ClassVar[str] = "execution_success"
    timestamp: int = field(default_factory=_now_ms)


@dataclass(frozen=True)
class ExecutionError(Event):
    type: ClassVar[str] = "execution_error"
    node_id: str = ""
    node_type: str = ""
    executed: list[str] = field(default_factory=list)
    exception_message: str = ""
    exception_type: str = ""
    traceback: list[str] = field(default_factory=list)
    current_inputs: dict[str, Any] = field(default_factory=dict)
    current_outputs: list[str] = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)


@dataclass(frozen=True)
class ExecutionInterrupted(Event):
    type: ClassVar[str] = "execution_interrupted"
    node_id: str = ""
    node_type: str = ""
    executed: list[str] = field(default_factory=list)
    timestamp: int = field(default_factory=_now_ms)


Subscriber = Callable[[Event], None]
