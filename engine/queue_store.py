"""The durable side of the prompt queue: pending and running items and the history, in one SQLite file.

Every change is one committed transaction (WAL journal, `synchronous=FULL`), so a prompt whose `POST
/prompt` was answered survives a SIGKILL or a power cut. Reopening the file after a crash finds the prompt
that was running still marked running; `recover()` decides its fate:

- run once before the crash: it goes back to pending, keeping its place (it runs first again);
- already re-run once after an earlier crash: it goes to the history as failed, with a status message
  saying so, since a prompt that kills the server twice would otherwise kill it forever.

`":memory:"` keeps everything in memory (tests, `Server` without a database); the behaviour is the same.
Not thread-safe by itself: PromptQueue serialises access under its lock.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: A running prompt found after a crash runs again only this many times in all.
MAX_ATTEMPTS = 2
CRASHED_TWICE = ("the server stopped twice while running this prompt (crash or SIGKILL); it was re-queued "
                 "once and is not retried again")

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    prompt_id TEXT PRIMARY KEY,
    number REAL NOT NULL,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs_to_execute TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running')),
    attempts INTEGER NOT NULL DEFAULT 0,
    arrival INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS arrivals (seq INTEGER PRIMARY KEY AUTOINCREMENT);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    item TEXT NOT NULL,
    outputs TEXT NOT NULL,
    status_str TEXT NOT NULL,
    messages TEXT NOT NULL
);
"""


@dataclass
class QueueItem:
    """ComfyUI's queue item `[number, prompt_id, prompt, extra_data, outputs_to_execute]`; `arrival` orders
    items of equal number and `attempts` counts the times the worker took it."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any] = field(default_factory=dict)
    outputs_to_execute: list[str] = field(default_factory=list)
    arrival: int = 0
    attempts: int = 0

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


class QueueStore:
    def __init__(self, path: str | Path = ":memory:") -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        # The queue's lock serialises every call, from the event loop's threads and the worker alike.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # --- the queue ---------------------------------------------------------------------------------------
    def next_arrival(self) -> int:
        """A number never handed out before in this file (AUTOINCREMENT never reuses one)."""
        with self._db:
            arrival = self._db.execute("INSERT INTO arrivals DEFAULT VALUES").lastrowid
            self._db.execute("DELETE FROM arrivals")
        return int(arrival)

    def add(self, item: QueueItem) -> None:
        with self._db:
            self._db.execute("INSERT INTO queue VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                             (item.prompt_id, item.number, json.dumps(item.prompt), json.dumps(item.extra_data),
                              json.dumps(item.outputs_to_execute), item.attempts, item.arrival))

    def mark_running(self, item: QueueItem) -> None:
        with self._db:
            self._db.execute("UPDATE queue SET state = 'running', attempts = ? WHERE prompt_id = ?",
                             (item.attempts, item.prompt_id))

    def mark_pending(self, prompt_id: str, attempts: int) -> None:
        with self._db:
            self._db.execute("UPDATE queue SET state = 'pending', attempts = ? WHERE prompt_id = ?",
                             (attempts, prompt_id))

    def remove(self, prompt_ids: list[str]) -> None:
        with self._db:
            self._db.executemany("DELETE FROM queue WHERE prompt_id = ? AND state = 'pending'",
                                 [(prompt_id,) for prompt_id in prompt_ids])

    def clear_pending(self) -> None:
        with self._db:
            self._db.execute("DELETE FROM queue WHERE state = 'pending'")

    def pending(self) -> list[QueueItem]:
        rows = self._db.execute("SELECT number, prompt_id, prompt, extra_data, outputs_to_execute, arrival, "
                                "attempts FROM queue WHERE state = 'pending' ORDER BY arrival").fetchall()
        return [_item(row) for row in rows]

    def recover(self) -> list[str]:
        """After a crash: re-queue or fail the prompts left running (see the module docstring); returns the
        ids failed."""
        rows = self._db.execute("SELECT number, prompt_id, prompt, extra_data, outputs_to_execute, arrival, "
                                "attempts FROM queue WHERE state = 'running'").fetchall()
        failed = []
        for item in map(_item, rows):
            if item.attempts >= MAX_ATTEMPTS:
                message = {"prompt_id": item.prompt_id, "exception_message": CRASHED_TWICE,
                           "exception_type": "ServerCrashed", "node_id": "", "node_type": ""}
                self.finish(item, HistoryEntry(item, {}, "error", [("execution_error", message)]))
                failed.append(item.prompt_id)
            else:
                self.mark_pending(item.prompt_id, item.attempts)
        return failed

    # --- history -----------------------------------------------------------------------------------------
    def finish(self, item: QueueItem, entry: HistoryEntry, history_limit: int | None = None) -> None:
        """In one transaction: the item leaves the queue and its history entry is written."""
        with self._db:
            self._db.execute("DELETE FROM queue WHERE prompt_id = ?", (item.prompt_id,))
            self._db.execute("INSERT OR REPLACE INTO history (prompt_id, item, outputs, status_str, messages) "
                             "VALUES (?, ?, ?, ?, ?)",
                             (item.prompt_id, json.dumps(_item_row(item)), json.dumps(entry.outputs),
                              entry.status_str, json.dumps([list(message) for message in entry.messages])))
            if history_limit is not None:
                self._db.execute("DELETE FROM history WHERE seq NOT IN "
                                 "(SELECT seq FROM history ORDER BY seq DESC LIMIT ?)", (history_limit,))

    def history(self, max_items: int | None = None, offset: int | None = None) -> list[HistoryEntry]:
        """Oldest first. Without `offset`, the newest `max_items`; with it, `max_items` from `offset`."""
        limit = -1 if max_items is None else max_items
        if offset is None:
            query = ("SELECT * FROM (SELECT item, outputs, status_str, messages, seq FROM history "
                     "ORDER BY seq DESC LIMIT ?) ORDER BY seq")
            rows = self._db.execute(query, (limit,)).fetchall()
        else:
            rows = self._db.execute("SELECT item, outputs, status_str, messages, seq FROM history ORDER BY seq "
                                    "LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [_entry(row) for row in rows]

    def knows(self, prompt_id: str) -> bool:
        """Whether the id is queued, running or in the history."""
        return any(self._db.execute(f"SELECT 1 FROM {table} WHERE prompt_id = ?", (prompt_id,)).fetchone()
                   for table in ("queue", "history"))

    def history_entry(self, prompt_id: str) -> HistoryEntry | None:
        row = self._db.execute("SELECT item, outputs, status_str, messages, seq FROM history "
                               "WHERE prompt_id = ?", (prompt_id,)).fetchone()
        return None if row is None else _entry(row)

    def delete_history(self, prompt_ids: list[str]) -> None:
        with self._db:
            self._db.executemany("DELETE FROM history WHERE prompt_id = ?", [(p,) for p in prompt_ids])

    def clear_history(self) -> None:
        with self._db:
            self._db.execute("DELETE FROM history")


def _item(row: tuple) -> QueueItem:
    number, prompt_id, prompt, extra_data, outputs, arrival, attempts = row
    return QueueItem(number, prompt_id, json.loads(prompt), json.loads(extra_data), json.loads(outputs),
                     arrival, attempts)


def _item_from_list(values: list[Any]) -> QueueItem:
    number, prompt_id, prompt, extra_data, outputs, arrival, attempts = values
    return QueueItem(number, prompt_id, prompt, extra_data, outputs, arrival, attempts)


def _item_row(item: QueueItem) -> list[Any]:
    return [*item.to_json(), item.arrival, item.attempts]


def _entry(row: tuple) -> HistoryEntry:
    item, outputs, status_str, messages, _ = row
    return HistoryEntry(_item_from_list(json.loads(item)), json.loads(outputs), status_str,
                        [(kind, data) for kind, data in json.loads(messages)])
