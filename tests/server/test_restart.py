"""`sdgraph serve` as a real process: killed with SIGKILL mid-run, its queue and history come back; stopped
with SIGTERM, it puts the running prompt back, closes its sockets and leaves the database consistent."""
from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from engine.client import Client
from engine.queue_store import CRASHED_TWICE, QueueStore
from live_server import TOY_NODES, free_port

SDGRAPH = Path(sys.executable).with_name("sdgraph")
SERVER_NODES = Path(__file__).with_name("server_nodes.py")


class ServeProcess:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (root / f"serve-{self.port}.log").open("wb")
        self.process = subprocess.Popen(
            [str(SDGRAPH), "serve", "--no-default-nodes", "--nodes", str(TOY_NODES), "--nodes", str(SERVER_NODES),
             "--port", str(self.port), "--database", str(root / "queue.sqlite3"), *folders(root)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        with Client(self.url) as client:
            while True:
                try:
                    client.queue()
                    return
                except (aiohttp.ClientError, OSError):
                    assert self.process.poll() is None, self.output()
                    assert time.monotonic() < deadline, "sdgraph serve did not answer within 30 s"
                    time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, sig: signal.Signals) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(20)
        self.log.close()
        return code


def folders(root: Path) -> list[str]:
    return [f"--{kind}-dir={root / kind}" for kind in ("output", "input", "temp", "models")]


def slow(ticks: int) -> dict[str, Any]:
    return {"1": {"class_type": "Wait", "inputs": {"value": 1, "ticks": ticks}},
            "2": {"class_type": "Output", "inputs": {"value": ["1", 0]}}}


def saving(name: str, value: int) -> dict[str, Any]:
    return {"1": {"class_type": "Constant", "inputs": {"value": value}},
            "2": {"class_type": "ToText", "inputs": {"value": ["1", 0], "upper": False}},
            "3": {"class_type": "SaveText", "inputs": {"text": ["2", 0], "filename": name}}}


def wait_until_running(client: Client, prompt_id: str) -> None:
    deadline = time.monotonic() + 20
    while [item[1] for item in client.queue()["queue_running"]] != [prompt_id]:
        assert time.monotonic() < deadline, f"{prompt_id} never started"
        time.sleep(0.02)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for serve in started:
        if serve.process.poll() is None:
            serve.stop(signal.SIGKILL)


def test_sigkill_mid_run_loses_nothing_and_a_prompt_that_crashes_twice_fails(
        tmp_path: Path, processes: list[ServeProcess]) -> None:
    processes.append(first := ServeProcess(tmp_path))
    with Client(first.url) as client:
        done = client.submit(saving("before.txt", 7))
        client.wait(done, timeout=20)
        fatal = client.submit(slow(300))
        wait_until_running(client, fatal)
        later = [client.submit(saving(f"after{index}.txt", index)) for index in range(2)]
    first.process.kill()
    first.process.wait(10)

    processes.append(second := ServeProcess(tmp_path))  # the prompt running at the crash runs again, first
    with Client(second.url) as client:
        wait_until_running(client, fatal)
        assert [item[1] for item in client.queue()["queue_pending"]] == later
    second.process.kill()
    second.process.wait(10)

    processes.append(third := ServeProcess(tmp_path))  # crashed twice: failed, with a message saying why
    with Client(third.url) as client:
        entries = {prompt_id: client.wait(prompt_id, timeout=20) for prompt_id in later}
        history = client.history()
    assert list(history) == [done, fatal, *later]
    status = history[fatal]["status"]
    assert status["status_str"] == "error" and status["messages"][0][1]["exception_message"] == CRASHED_TWICE
    assert history[done]["outputs"]["3"]["files"] == [{"filename": "before.txt", "subfolder": "", "type": "output"}]
    assert (tmp_path / "output" / "before.txt").read_text() == "7"
    assert [entry["status"]["status_str"] for entry in entries.values()] == ["success", "success"]
    assert [(tmp_path / "output" / f"after{index}.txt").read_text() for index in range(2)] == ["0", "1"]


def test_sigkill_once_reruns_the_interrupted_prompt_to_success(tmp_path: Path, processes: list[ServeProcess]) -> None:
    processes.append(first := ServeProcess(tmp_path))
    with Client(first.url) as client:
        interrupted = client.submit(slow(40))
        wait_until_running(client, interrupted)
    first.process.kill()
    first.process.wait(10)
    processes.append(second := ServeProcess(tmp_path))
    with Client(second.url) as client:
        assert client.wait(interrupted, timeout=20)["outputs"] == {"2": {"value": [1]}}


def test_sigterm_puts_the_running_prompt_back_closes_sockets_and_exits(tmp_path: Path,
                                                                       processes: list[ServeProcess]) -> None:
    processes.append(serve := ServeProcess(tmp_path))

    async def scenario() -> tuple[str, str, int | None, float]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{serve.url}/ws?clientId=watcher") as socket:
                async def submit(prompt: dict[str, Any]) -> str:
                    async with session.post(f"{serve.url}/prompt",
                                            json={"prompt": prompt, "client_id": "watcher"}) as answer:
                        return (await answer.json())["prompt_id"]
                running, waiting = await submit(slow(500)), await submit(saving("never.txt", 1))
                while json.loads((await socket.receive(10)).data)["type"] != "progress":
                    pass
                stopped_at = time.monotonic()
                serve.process.send_signal(signal.SIGTERM)
                while (message := await socket.receive(15)).type not in (aiohttp.WSMsgType.CLOSE,
                                                                          aiohttp.WSMsgType.CLOSED):
                    pass
                return running, waiting, socket.close_code, stopped_at
    running, waiting, close_code, stopped_at = asyncio.run(scenario())
    assert serve.process.wait(20) == 0, serve.output()
    assert time.monotonic() - stopped_at < 8  # the 10 s node stopped at its next tick
    assert close_code == 1001  # going away
    database = tmp_path / "queue.sqlite3"
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = QueueStore(database)
    assert [(item.prompt_id, item.attempts) for item in store.pending()] == [(running, 0), (waiting, 0)]
    assert store.history() == [] and not (tmp_path / "output" / "never.txt").exists()
