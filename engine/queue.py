"""The prompt queue and its history, in ComfyUI's shapes (comfyui-interface.md section 8), kept in SQLite.

A queue item is `[number, prompt_id, prompt, extra_data, outputs_to_execute]`. Every change is written to
the QueueStore before the call returns, so an accepted prompt survives a crash (see engine/queue_store.py
for what happens to the prompt that was running). Thread-safe: the server's event loop adds and reads, a
worker thread takes items and finishes them.

Order, and fairness between clients (ComfyUI runs strictly by number, so one script queueing 500 prompts
starves everyone else):
- `front=True` items (ComfyUI gives them negative numbers) run first, by number;
- the rest run round-robin across clients (`extra_data.client_id`; prompts without one share a turn): each
  client's first pending prompt, in number order, then each client's second, and so on. A client alone
  in the queue sees plain FIFO.
Bounds: at most `max_pending` prompts wait in all (QueueFull beyond) and `max_pending_per_client` per client
(ClientQueueFull beyond). History keeps the newest `history_limit` entries, ComfyUI's 10,000 by default.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from engine.queue_store import HistoryEntry, QueueItem, QueueStore

HISTORY_LIMIT = 10_000
MAX_PENDING = 1_000
MAX_PENDING_PER_CLIENT = 500


class QueueFull(Exception):
    """The queue holds `max_pending` prompts already."""


class ClientQueueFull(QueueFull):
    """This client has `max_pending_per_client` prompts waiting already."""


class DuplicatePrompt(ValueError):
    """A prompt_id already queued or in the history."""


class PromptQueue:
    def __init__(self, store: QueueStore | str | Path | None = None, *, history_limit: int = HISTORY_LIMIT,
                 max_pending: int = MAX_PENDING, max_pending_per_client: int = MAX_PENDING_PER_CLIENT,
                 on_change: Callable[[], None] | None = None) -> None:
        """`store`: a QueueStore, a database path, or None for one in memory. Opening a store recovers the
        prompts a crash left running."""
        self._store = store if isinstance(store, QueueStore) else QueueStore(store or ":memory:")
        self.recovered_failures = self._store.recover()
        self._pending: list[QueueItem] = self._store.pending()
        self._running: dict[str, QueueItem] = {}
        self._history_limit = history_limit
        self.max_pending = max_pending
        self.max_pending_per_client = max_pending_per_client
        self._condition = threading.Condition()
        self._on_change = on_change or (lambda: None)

    @property
    def store(self) -> QueueStore:
        return self._store

    def close(self) -> None:
        with self._condition:
            self._store.close()

    # --- the queue ---------------------------------------------------------------------------------------
    def put(self, prompt_id: str, prompt: dict[str, Any], extra_data: dict[str, Any], outputs: list[str],
            *, front: bool = False, number: float | None = None) -> QueueItem:
        """Queue a validated prompt, durably; raises QueueFull, ClientQueueFull or DuplicatePrompt."""
        with self._condition:
            self._check_room(extra_data.get("client_id"))
            arrival = self._store.next_arrival()
            if number is None:
                lowest = min((item.number for item in self._pending), default=0)
                number = (min(lowest, 0) - 1) if front else arrival
            item = QueueItem(number, prompt_id, prompt, dict(extra_data), list(outputs), arrival)
            if self._store.knows(prompt_id):
                raise DuplicatePrompt(f"prompt_id {prompt_id!r} was queued before; leave it out to get a new one")
            self._store.add(item)
            self._pending.append(item)
            self._condition.notify()
        self._on_change()
        return item

    def _check_room(self, client_id: str | None) -> None:
        if len(self._pending) >= self.max_pending:
            raise QueueFull(f"the queue is full ({self.max_pending} prompts waiting); try again later")
        mine = sum(1 for item in self._pending if item.client_id == client_id)
        if mine >= self.max_pending_per_client:
            raise ClientQueueFull(f"client {client_id!r} has {mine} prompts waiting, the most one client may "
                                  f"queue; wait for some to finish")

    def take(self, timeout: float | None = None) -> QueueItem | None:
        """The next pending item in fair order, now marked running; None after `timeout` with none queued."""
        with self._condition:
            if not self._condition.wait_for(lambda: bool(self._pending), timeout):
                return None
            item = fair_order(self._pending)[0]
            self._pending.remove(item)
            item.attempts += 1
            self._store.mark_running(item)
            self._running[item.prompt_id] = item
        self._on_change()
        return item

    def requeue(self, item: QueueItem) -> None:
        """Put a running item back as it was before `take` (a graceful shutdown stopped it; no crash)."""
        with self._condition:
            self._running.pop(item.prompt_id, None)
            item.attempts = max(0, item.attempts - 1)
            self._store.mark_pending(item.prompt_id, item.attempts)
            self._pending.append(item)
            self._condition.notify()
        self._on_change()

    def finish(self, item: QueueItem, outputs: dict[str, Any], status_str: str,
               messages: list[tuple[str, dict[str, Any]]], *, notify: bool = True) -> None:
        """Move a running item to the history; `notify=False` leaves the change callback to the caller
        (the server first tells the client its prompt finished, then sends the new queue status)."""
        with self._condition:
            self._running.pop(item.prompt_id, None)
            self._store.finish(item, HistoryEntry(item, outputs, status_str, messages), self._history_limit)
        if notify:
            self._on_change()

    def running(self) -> list[QueueItem]:
        with self._condition:
            return list(self._running.values())

    def pending(self) -> list[QueueItem]:
        """Pending items in the order they will run."""
        with self._condition:
            return fair_order(self._pending)

    def remaining(self) -> int:
        """Pending plus running: ComfyUI's `queue_remaining`, whose 0 clients read as "my prompt is done"."""
        with self._condition:
            return len(self._pending) + len(self._running)

    def delete(self, prompt_ids: list[str]) -> None:
        with self._condition:
            doomed = set(prompt_ids)
            self._store.remove(list(doomed))
            self._pending = [item for item in self._pending if item.prompt_id not in doomed]
        self._on_change()

    def clear(self) -> None:
        with self._condition:
            self._store.clear_pending()
            self._pending.clear()
        self._on_change()

    # --- history -----------------------------------------------------------------------------------------
    def history(self, max_items: int | None = None, offset: int | None = None) -> dict[str, Any]:
        """Oldest first, as ComfyUI returns it. Without `offset`, the newest `max_items` entries; with it,
        `max_items` entries starting `offset` entries after the oldest."""
        with self._condition:
            entries = self._store.history(max_items, offset)
        return {entry.item.prompt_id: entry.to_json() for entry in entries}

    def history_entry(self, prompt_id: str) -> dict[str, Any]:
        with self._condition:
            entry = self._store.history_entry(prompt_id)
        return {} if entry is None else {prompt_id: entry.to_json()}

    def delete_history(self, prompt_ids: list[str]) -> None:
        with self._condition:
            self._store.delete_history(prompt_ids)

    def clear_history(self) -> None:
        with self._condition:
            self._store.clear_history()


def fair_order(items: list[QueueItem]) -> list[QueueItem]:
    """Front items by number, then round-robin across clients (see the module docstring)."""
    front = sorted((item for item in items if item.number < 0), key=lambda item: (item.number, item.arrival))
    turns: dict[str | None, int] = {}
    ranked = []
    for item in sorted((item for item in items if item.number >= 0), key=lambda item: (item.number, item.arrival)):
        turn = turns.get(item.client_id, 0)
        turns[item.client_id] = turn + 1
        ranked.append((turn, item.number, item.arrival, item))
    return front + [entry[-1] for entry in sorted(ranked, key=lambda entry: entry[:3])]


__all__ = ["ClientQueueFull", "DuplicatePrompt", "HistoryEntry", "PromptQueue", "QueueFull", "QueueItem",
           "fair_order"]
