"""The prompt queue: fair order across clients, bounds, and durability across a reopened database."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.queue import ClientQueueFull, DuplicatePrompt, PromptQueue, QueueFull
from engine.queue_store import CRASHED_TWICE, QueueStore

PROMPT = {"1": {"class_type": "Constant", "inputs": {"value": 1}}}


def put(queue: PromptQueue, prompt_id: str, client: str | None = None, **options) -> None:
    queue.put(prompt_id, PROMPT, {"client_id": client} if client else {}, ["1"], **options)


def order(queue: PromptQueue) -> list[str]:
    return [item.prompt_id for item in queue.pending()]


def test_a_single_client_runs_first_in_first_out() -> None:
    queue = PromptQueue()
    for name in ("a", "b", "c"):
        put(queue, name, "alice")
    assert [queue.take(0).prompt_id for _ in range(3)] == ["a", "b", "c"]


def test_clients_take_turns_instead_of_waiting_behind_a_flood() -> None:
    queue = PromptQueue()
    for index in range(4):
        put(queue, f"alice{index}", "alice")
    put(queue, "bob0", "bob")
    put(queue, "bob1", "bob")
    put(queue, "carol0", "carol")
    assert order(queue) == ["alice0", "bob0", "carol0", "alice1", "bob1", "alice2", "alice3"]


def test_front_prompts_run_before_everything_else() -> None:
    queue = PromptQueue()
    put(queue, "back", "alice")
    put(queue, "first_front", "bob", front=True)
    put(queue, "second_front", "bob", front=True)
    assert order(queue) == ["second_front", "first_front", "back"]


def test_the_queue_refuses_prompts_beyond_its_bound() -> None:
    queue = PromptQueue(max_pending=3, max_pending_per_client=3)
    for index in range(3):
        put(queue, f"p{index}", f"client{index}")
    with pytest.raises(QueueFull, match="the queue is full"):
        put(queue, "one_too_many", "client9")
    assert len(queue.pending()) == 3


def test_one_client_may_not_fill_the_queue_alone() -> None:
    queue = PromptQueue(max_pending=10, max_pending_per_client=2)
    put(queue, "a", "alice")
    put(queue, "b", "alice")
    with pytest.raises(ClientQueueFull, match="client 'alice' has 2 prompts waiting"):
        put(queue, "c", "alice")
    put(queue, "d", "bob")
    assert order(queue) == ["a", "d", "b"]


def test_a_prompt_id_cannot_be_queued_twice() -> None:
    queue = PromptQueue()
    put(queue, "same")
    queue.finish(queue.take(0), {}, "success", [])
    with pytest.raises(DuplicatePrompt, match="'same' was queued before"):
        put(queue, "same")


def test_pending_prompts_and_history_survive_a_reopen(tmp_path: Path) -> None:
    database = tmp_path / "queue.sqlite3"
    queue = PromptQueue(database)
    put(queue, "done", "alice")
    put(queue, "waiting", "alice")
    queue.finish(queue.take(0), {"1": {"value": [1]}}, "success", [("execution_success", {"prompt_id": "done"})])
    queue.close()
    reopened = PromptQueue(database)
    assert order(reopened) == ["waiting"]
    entry = reopened.history_entry("done")["done"]
    assert entry["outputs"] == {"1": {"value": [1]}} and entry["status"]["completed"] is True
    assert entry["prompt"] == [1, "done", PROMPT, {"client_id": "alice"}, ["1"]]


def test_numbers_keep_growing_across_reopens(tmp_path: Path) -> None:
    database = tmp_path / "queue.sqlite3"
    queue = PromptQueue(database)
    put(queue, "a")
    queue.close()
    reopened = PromptQueue(database)
    put(reopened, "b")
    assert [item.number for item in reopened.pending()] == [1, 2]


def test_a_prompt_running_at_a_crash_runs_again_once_then_fails(tmp_path: Path) -> None:
    database = tmp_path / "queue.sqlite3"
    queue = PromptQueue(database)
    put(queue, "fatal")
    put(queue, "next")
    assert queue.take(0).prompt_id == "fatal"
    queue.store.close()  # the process dies: no finish, no requeue

    after_first_crash = PromptQueue(database)
    assert order(after_first_crash) == ["fatal", "next"] and after_first_crash.recovered_failures == []
    assert after_first_crash.take(0).prompt_id == "fatal"
    after_first_crash.store.close()

    after_second_crash = PromptQueue(database)
    assert after_second_crash.recovered_failures == ["fatal"]
    assert order(after_second_crash) == ["next"]
    status = after_second_crash.history_entry("fatal")["fatal"]["status"]
    assert status["status_str"] == "error" and status["completed"] is False
    assert status["messages"][0][1]["exception_message"] == CRASHED_TWICE


def test_a_requeued_prompt_keeps_its_retry(tmp_path: Path) -> None:
    database = tmp_path / "queue.sqlite3"
    queue = PromptQueue(database)
    put(queue, "stopped")
    queue.requeue(queue.take(0))  # a graceful shutdown: not a crash, so no attempt is used up
    queue.close()
    assert QueueStore(database).pending()[0].attempts == 0


def test_history_keeps_only_the_newest_entries() -> None:
    queue = PromptQueue(history_limit=2)
    for name in ("a", "b", "c"):
        put(queue, name)
        queue.finish(queue.take(0), {}, "success", [])
    assert list(queue.history()) == ["b", "c"]
    assert list(queue.history(max_items=1)) == ["c"] and list(queue.history(max_items=1, offset=0)) == ["b"]


def test_delete_and_clear_touch_only_pending_prompts_and_history_separately() -> None:
    queue = PromptQueue()
    for name in ("a", "b", "c"):
        put(queue, name)
    running = queue.take(0)
    queue.delete(["b", running.prompt_id])
    assert order(queue) == ["c"] and [item.prompt_id for item in queue.running()] == ["a"]
    queue.clear()
    assert order(queue) == [] and queue.remaining() == 1
    queue.finish(running, {}, "success", [])
    queue.delete_history(["a"])
    assert queue.history() == {}
