"""The prompt queue and its history, in ComfyUI's shapes (comfyui-interface.md section 8).

A queue item is `[number, prompt_id, prompt, extra_data, outputs_to_execute]`; `front=True` puts an item
before every pending one (ComfyUI gives it a negative number). History keeps the most recent entries,
capped like ComfyUI's (10,000). Thread-safe: the server's event loop adds and reads, a worker thread takes
items and finishes them.

This queue lives in memory: a restart loses pending prompts and history, as in ComfyUI.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

HISTORY_LIMIT = 10_000


@dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any] = field(default_factory=dict)
    outputs_to_execute: list[str] = field(default_factory=list)

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")

    def to_json(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]


@dataclass
class HistoryEntry:
    item: QueueItem
    outputs: dict[str, Any]
    status_str: str
    messages: list[tuple[str, dict[str, Any]]]

    def to_json(self) -> dict[str, Any]:
        meta = {node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None,
                          "real_node_id": node_id} for node_id in self.outputs}
        return {"prompt": self.item.to_json(), "outputs": self.outputs,
                "status": {"status_str": self.status_str, "completed": self.status_str == "success",
                           "messages": [[kind, data] for kind, data in self.messages]},
                "meta": meta}


class PromptQueue:
    def __init__(self, history_limit: int = HISTORY_LIMIT, on_change: Callable[[], None] | None = None) -> None:
        self._pending: list[QueueItem] = []
        self._running: dict[str, QueueItem] = {}
        self._history: OrderedDict[str, HistoryEntry] = OrderedDict()
        self._history_limit = history_limit
        self._condition = threading.Condition()
        self._counter = 0
        self._on_change = on_change or (lambda: None)

    # --- the queue ---------------------------------------------------------------------------------------
    def put(self, prompt_id: str, prompt: dict[str, Any], extra_data: dict[str, Any], outputs: list[str],
            *, front: bool = False, number: float | None = None) -> QueueItem:
        with self._condition:
            if number is None:
                self._counter += 1
                lowest = min((item.number for item in self._pending), default=0)
                number = (min(lowest, 0) - 1) if front else self._counter
            item = QueueItem(number, prompt_id, prompt, dict(extra_data), list(outputs))
            self._pending.append(item)
            self._pending.sort(key=lambda queued: queued.number)
            self._condition.notify()
        self._on_change()
        return item

    def take(self, timeout: float | None = None) -> QueueItem | None:
        """The next pending item, now marked running; None after `timeout` seconds with nothing queued."""
        with self._condition:
            if not self._condition.wait_for(lambda: bool(self._pending), timeout):
                return None
            item = self._pending.pop(0)
            self._running[item.prompt_id] = item
        self._on_change()
        return item

    def finish(self, item: QueueItem, outputs: dict[str, Any], status_str: str,
               messages: list[tuple[str, dict[str, Any]]], *, notify: bool = True) -> None:
        """Move a running item to the history; `notify=False` leaves the change callback to the caller
        (the server first tells the client its prompt finished, then sends the new queue status)."""
        with self._condition:
            self._running.pop(item.prompt_id, None)
            self._history[item.prompt_id] = HistoryEntry(item, outputs, status_str, messages)
            while len(self._history) > self._history_limit:
                self._history.popitem(last=False)
        if notify:
            self._on_change()

    def running(self) -> list[QueueItem]:
        with self._condition:
            return list(self._running.values())

    def pending(self) -> list[QueueItem]:
        with self._condition:
            return list(self._pending)

    def remaining(self) -> int:
        """Pending plus running: ComfyUI's `queue_remaining`, whose 0 clients read as "my prompt is done"."""
        with self._condition:
            return len(self._pending) + len(self._running)

    def delete(self, prompt_ids: list[str]) -> None:
        with self._condition:
            doomed = set(prompt_ids)
            self._pending = [item for item in self._pending if item.prompt_id not in doomed]
        self._on_change()

    def clear(self) -> None:
        with self._condition:
            self._pending.clear()
        self._on_change()

    # --- history -----------------------------------------------------------------------------------------
    def history(self, max_items: int | None = None, offset: int | None = None) -> dict[str, Any]:
        """Oldest first, as ComfyUI returns it. Without `offset`, the newest `max_items` entries; with it,
        `max_items` entries starting `offset` entries after the oldest."""
        with self._condition:
            entries = list(self._history.items())
        if offset is None:
            entries = entries[max(0, len(entries) - max_items):] if max_items is not None else entries
        else:
            entries = entries[offset:offset + max_items] if max_items is not None else entries[offset:]
        return {prompt_id: entry.to_json() for prompt_id, entry in entries}

    def history_entry(self, prompt_id: str) -> dict[str, Any]:
        with self._condition:
            entry = self._history.get(prompt_id)
        return {} if entry is None else {prompt_id: entry.to_json()}

    def delete_history(self, prompt_ids: list[str]) -> None:
        with self._condition:
            for prompt_id in prompt_ids:
                self._history.pop(prompt_id, None)

    def clear_history(self) -> None:
        with self._condition:
            self._history.clear()
