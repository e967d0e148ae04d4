"""Fixtures for engine tests: a registry of the toy nodes, an executor and an event recorder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import toy_nodes
from engine import Executor, Registry, ResultCache, RunSettings
from engine.events import Event


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    registry.load_module(toy_nodes)
    return registry


@pytest.fixture
def settings(tmp_path: Path) -> RunSettings:
    return RunSettings(models_dir=tmp_path / "models", input_dir=tmp_path / "input",
                       output_dir=tmp_path / "output", temp_dir=tmp_path / "temp", device="cpu")


@pytest.fixture
def executor(registry: Registry, settings: RunSettings) -> Executor:
    return Executor(registry, cache=ResultCache(), settings=settings)


class EventLog(list):
    """Every event an executor emitted, in order."""

    def __call__(self, event: Event) -> None:
        self.append(event)

    def kinds(self) -> list[str]:
        return [event.type for event in self if event.comfyui]

    def of(self, event_type: str) -> list[Any]:
        return [event for event in self if event.type == event_type]


@pytest.fixture
def events(executor: Executor) -> EventLog:
    log = EventLog()
    executor.subscribe(log)
    return log

