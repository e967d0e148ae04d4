"""Demand-driven execution of a validated prompt: signatures, cache hits, events, interrupts and errors.

Only the outputs (or the given targets) and the ancestors they need run. The scheduler is a stack: a node
runs once every linked input it asks for has a value, so a later lazy input only has to ask for less.
Node results of this prompt live in the run itself, so cache eviction during a run cannot lose them.
The executor is synchronous (a server calls `execute` from a worker thread); `interrupt()` may be called
from any thread and is honoured between nodes and at every `context.progress` tick.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from engine.cache import CacheEntry, ResultCache, signature
from engine.context import ExecutionContext, Interrupted, RunSettings
from engine.events import (Event, ExecutionCached, ExecutionError, ExecutionInterrupted, ExecutionStart,
                           ExecutionSuccess, Executed, Executing, NodeDone, Progress, Subscriber)
from engine.schema import NodeType, Registry
from engine.validate import ValidationResult, validate_prompt
from engine.workflow import Link, PromptNode, Workflow

log = logging.getLogger("sdgraph.engine")


class NodeFailure(Exception):
    """Raised inside a run to stop it at a node; carries the event that reports it."""

    def __init__(self, event: ExecutionError | ExecutionInterrupted) -> None:
        super().__init__(event.type)
        self.event = event


@dataclass(frozen=True)
class ExecutionResult:
    """`status` is "success", "error", "interrupted" or "invalid" (validation failed; nothing ran).
    `outputs` holds the `ui` data per node, ComfyUI's history `outputs` shape."""

    prompt_id: str
    status: str
    validation: ValidationResult
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: tuple[str, ...] = ()
    cached: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    error: ExecutionError | ExecutionInterrupted | None = None

    @property
    def ok(self) -> bool:
        return self.status == "success"


class Executor:
    def __init__(self, registry: Registry, cache: ResultCache | None = None,
                 settings: RunSettings | None = None) -> None:
        self.registry = registry
        self.cache = cache if cache is not None else ResultCache()
        self.settings = settings or RunSettings()
        self._subscribers: list[Subscriber] = []
        self._interrupt = threading.Event()
        self._running = threading.Lock()

    def subscribe(self, subscriber: Subscriber) -> Subscriber:
        self._subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.remove(subscriber)

    def interrupt(self) -> None:
        """Stop the running prompt at its next check; a no-op when nothing runs."""
        if self._running.locked():
            self._interrupt.set()

    def interrupt_requested(self) -> bool:
        return self._interrupt.is_set()

    def emit(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:  # a broken listener must not fail the prompt
                log.exception("event subscriber %r failed on %s", subscriber, event.type)

    def execute(self, prompt: Mapping[str, Any], prompt_id: str | None = None,
                targets: Sequence[str] | None = None, extra_data: Mapping[str, Any] | None = None) -> ExecutionResult:
        """Validate and run an API prompt; one prompt at a time (concurrent calls wait)."""
        prompt_id = prompt_id or str(uuid.uuid4())
        with self._running:
            self._interrupt.clear()
            try:
                # Validated inside the lock: an interrupt that arrives meanwhile already finds the prompt running.
                validation = validate_prompt(prompt, self.registry, targets, self.settings)
                if not validation.ok or validation.workflow is None:
                    return ExecutionResult(prompt_id, "invalid", validation)
                return _Run(self, prompt, prompt_id, validation, extra_data or {}).execute()
            finally:
                self._interrupt.clear()


class _Run:
    def __init__(self, executor: Executor, prompt: Mapping[str, Any], prompt_id: str,
                 validation: ValidationResult, extra_data: Mapping[str, Any]) -> None:
        self.executor = executor
        self.prompt = prompt
        self.prompt_id = prompt_id
        self.validation = validation
        self.workflow: Workflow = validation.workflow  # type: ignore[assignment]
        self.extra_data = extra_data
        self.signatures: dict[str, str] = {}
        self.volatile: set[str] = set()
        self.results: dict[str, tuple] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        self.executed: list[str] = []
        self.cached: list[str] = []
        self.timings: dict[str, float] = {}

    def execute(self) -> ExecutionResult:
        emit = self.executor.emit
        emit(ExecutionStart(self.prompt_id))
        status, error = "success", None
        try:
            needed = self._needed_nodes()
            self._compute_signatures(needed)
            hits = self._cache_hits(needed)
            emit(ExecutionCached(self.prompt_id, nodes=[n for n in needed if n in hits]))
            self._schedule(hits)
            emit(ExecutionSuccess(self.prompt_id))
        except NodeFailure as failure:
            status = "interrupted" if isinstance(failure.event, ExecutionInterrupted) else "error"
            error = failure.event
            emit(failure.event)
        emit(Executing(self.prompt_id, None))
        return ExecutionResult(self.prompt_id, status, self.validation, self.outputs, tuple(self.executed),
                               tuple(self.cached), self.timings, error)

    def _node_type(self, node_id: str) -> NodeType:
        return self.executor.registry[self.workflow[node_id].class_type]

    def _needed_nodes(self) -> list[str]:
        """The outputs' ancestry in dependency order (sources first)."""
        order: list[str] = []
        seen: set[str] = set()
        for output in self.validation.outputs:
            stack = [(output, False)]
            while stack:
                node_id, expanded = stack.pop()
                if expanded:
                    order.append(node_id)
                elif node_id not in seen:
                    seen.add(node_id)
                    stack.append((node_id, True))
                    sources = [link.node_id for _, link in self.workflow[node_id].links()]
                    stack.extend((s, False) for s in reversed(sources) if s not in seen)
        return order

    def _compute_signatures(self, needed: list[str]) -> None:
        for node_id in needed:
            prompt_node, node_type = self.workflow[node_id], self._node_type(node_id)
            constants = prompt_node.constants()
            fingerprint = self._guarded(node_id, lambda: _fingerprint(node_type, constants, self.executor.settings))
            links = {name: (self.signatures[link.node_id], link.output_index) for name, link in prompt_node.links()}
            rerun = not node_type.cacheable or _is_always_rerun(fingerprint)
            if rerun or any(link.node_id in self.volatile for _, link in prompt_node.links()):
                self.volatile.add(node_id)
            own_id = node_id if node_type.hidden_input("UNIQUE_ID") else None
            self.signatures[node_id] = self._guarded(
                node_id, lambda: signature(node_type.name, constants, links, None if rerun else fingerprint, own_id))

    def _cache_hits(self, needed: list[str]) -> dict[str, CacheEntry]:
        hits = {}
        for node_id in needed:
            if node_id not in self.volatile:
                entry = self.executor.cache.get(self.signatures[node_id])
                if entry is not None:
                    hits[node_id] = entry
        return hits

    def _schedule(self, hits: dict[str, CacheEntry]) -> None:
        stack = list(reversed(self.validation.outputs))
        while stack:
            node_id = stack[-1]
            if node_id in self.results:
                stack.pop()
            elif node_id in hits:
                stack.pop()
                self._use_cached(node_id, hits[node_id])
            else:
                pending = [link.node_id for _, link in self.workflow[node_id].links()
                           if link.node_id not in self.results]
                if pending:
                    stack.extend(reversed(pending))
                    continue
                stack.pop()
                self._run_node(node_id)

    def _use_cached(self, node_id: str, entry: CacheEntry) -> None:
        self.results[node_id] = entry.outputs
        self.cached.append(node_id)
        if entry.ui is not None:
            self.outputs[node_id] = dict(entry.ui)
            self.executor.emit(Executed(self.prompt_id, node_id, dict(entry.ui)))

    def _run_node(self, node_id: str) -> None:
        prompt_node, node_type = self.workflow[node_id], self._node_type(node_id)
        emit = self.executor.emit
        self._guarded(node_id, self._check_interrupt)
        emit(Executing(self.prompt_id, node_id))
        arguments = self._arguments(prompt_node, node_type)
        started = time.perf_counter()
        result = self._guarded(node_id, lambda: node_type.result_of(node_type.function(**arguments)), arguments)
        self.timings[node_id] = time.perf_counter() - started
        self.results[node_id] = result.outputs
        self.executed.append(node_id)
        if result.ui is not None:
            self.outputs[node_id] = dict(result.ui)
            emit(Executed(self.prompt_id, node_id, dict(result.ui)))
        if node_id not in self.volatile:
            self.executor.cache.put(self.signatures[node_id], result.outputs, result.ui)
        emit(NodeDone(self.prompt_id, node_id, self.timings[node_id]))

    def _check_interrupt(self) -> None:
        if self.executor.interrupt_requested():
            raise Interrupted("interrupted between nodes")

    def _arguments(self, prompt_node: PromptNode, node_type: NodeType) -> dict[str, Any]:
        arguments = {name: self.results[value.node_id][value.output_index] if isinstance(value, Link) else value
                     for name, value in prompt_node.inputs.items()}
        hidden_values = {"UNIQUE_ID": prompt_node.id, "PROMPT": self.prompt,
                         "EXTRA_PNGINFO": self.extra_data.get("extra_pnginfo")}
        for name, spec in node_type.hidden.items():
            arguments[name] = hidden_values[spec.kind]
        if node_type.wants_context:
            arguments["context"] = self._context(prompt_node)
        return arguments

    def _context(self, prompt_node: PromptNode) -> ExecutionContext:
        def report(value: int | float, maximum: int | float, preview: Any) -> None:
            self.executor.emit(Progress(self.prompt_id, prompt_node.id, value, maximum, preview))
        return ExecutionContext(prompt_node.id, self.prompt_id, prompt_node.class_type, self.executor.settings,
                                report, self.executor.interrupt_requested)

    def _guarded(self, node_id: str, action: Any, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run `action`, turning an exception into the NodeFailure that ends this prompt at `node_id`."""
        try:
            return action()
        except Interrupted:
            raise NodeFailure(ExecutionInterrupted(self.prompt_id, node_id, self.workflow[node_id].class_type,
                                                   self.executed + self.cached)) from None
        except Exception as error:
            raise NodeFailure(ExecutionError(
                self.prompt_id, node_id, self.workflow[node_id].class_type, self.executed + self.cached,
                str(error), type(error).__name__, traceback.format_exception(error),
                {name: _short(value) for name, value in (arguments or {}).items() if name != "context"},
                list(self.results))) from None


def _fingerprint(node_type: NodeType, constants: dict[str, Any], settings: RunSettings) -> Any:
    return node_type.fingerprint(constants, settings) if node_type.fingerprint is not None else None


def _is_always_rerun(fingerprint: Any) -> bool:
    return isinstance(fingerprint, float) and math.isnan(fingerprint)


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
