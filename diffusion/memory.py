"""Keep models on the compute device while they fit; offload the least recently used to CPU when they do not.

A node asks for the models it is about to run (`with manager.use(unet, vae): ...`). Whatever is already on
the device stays; what is missing is moved there, after moving the least recently used other models back to
the offload device until the weights fit the budget. The budget is either fixed in bytes or "free device
memory minus a reserve" (the reserve is room for activations, which the weights must not take).
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

Mover = Callable[[nn.Module, torch.device], None]

DEFAULT_RESERVE_BYTES = 1 << 30


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    tensors = {id(t): t for t in model.parameters()} | {id(t): t for t in model.buffers()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _move_module(model: nn.Module, device: torch.device) -> None:
    model.to(device)


def _free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but no tensor uses look taken to the driver; they are free
        # to us (after a sampling run they are gigabytes of activations).
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    raise ValueError(f"cannot measure free memory on {device}: give ModelManager a budget_bytes")


@dataclass
class _Resident:
    # Weak: the model cache owns models; one it drops frees its device memory with it (and leaves our table).
    ref: weakref.ref
    size: int
    pins: int = 0


class ModelManager:
    """Tracks which models are on `device` and moves them so that their weights stay within a budget.

    budget_bytes: a fixed budget; None means "free device memory (plus what our resident models hold) minus
    reserve_bytes", measured at each load. mover and free_bytes are injectable so the policy is testable
    without a GPU.
    """

    def __init__(
        self,
        device: str | torch.device,
        *,
        budget_bytes: int | None = None,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        offload_device: str | torch.device = "cpu",
        mover: Mover = _move_module,
        free_bytes: Callable[[torch.device], int] = _free_device_bytes,
    ):
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.budget_bytes = budget_bytes
        self.reserve_bytes = reserve_bytes
        self._mover = mover
        self._free_bytes = free_bytes
        self._resident: OrderedDict[int, _Resident] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self._dead: list[int] = []

    @property
    def resident(self) -> list[nn.Module]:
        """Models on the device, least recently used first."""
        with self._table():
            return [model for entry in self._resident.values() if (model := entry.ref()) is not None]

    @property
    def resident_bytes(self) -> int:
        with self._table():
            return sum(entry.size for entry in self._resident.values())

    def is_resident(self, model: nn.Module) -> bool:
        with self._table():
            return id(model) in self._resident

    def budget(self) -> int:
        if self.budget_bytes is not None:
            return self.budget_bytes
        return self.resident_bytes + self._free_bytes(self.device) - self.reserve_bytes

    def load_to_device(self, models: Iterable[nn.Module]) -> None:
        """Put every given model on the device, offloading least recently used others to make room."""
        with self._table():
            wanted = list({id(m): m for m in models}.values())
            missing = {id(m): (m, weight_bytes(m)) for m in wanted if id(m) not in self._resident}
            if missing:
                self._make_room(sum(size for _, size in missing.values()), keep={id(m) for m in wanted})
            for key, (model, size) in missing.items():
                self._mover(model, self.device)
                self._resident[key] = _Resident(weakref.ref(model, self._forget(key)), size)
            for model in wanted:
                self._resident.move_to_end(id(model))

    def _make_room(self, needed: int, keep: set[int]) -> None:
        budget = self.budget()
        for key in list(self._resident):
            if self.resident_bytes + needed <= budget:
                return
            entry = self._resident.get(key)
            if entry is None or key in keep or entry.pins:
                continue
            self._offload(key)
        if self.resident_bytes + needed > budget:
            # No partial (low-VRAM) loading yet: load anyway and let the device be the final judge.
            log.warning(
                "models need %d bytes on %s, over the budget of %d with %d bytes pinned",
                needed, self.device, budget, self.resident_bytes,
            )

    def _forget(self, key: int) -> Callable[[weakref.ref], None]:
        # Runs inside garbage collection, possibly mid-iteration of the table: only note the key here.
        return lambda _dead: self._dead.append(key)

    @contextmanager
    def _table(self) -> Iterator[None]:
        """The lock, with the entries of models that died since the last call dropped first."""
        with self._lock:
            while self._dead:
                key = self._dead.pop()
                entry = self._resident.get(key)
                if entry is not None and entry.ref() is None:
                    del self._resident[key]
            yield

    def _offload(self, key: int) -> None:
        entry = self._resident.pop(key)
        model = entry.ref()
        if model is not None:
            self._mover(model, self.offload_device)

    @contextmanager
    def use(self, *models: nn.Module) -> Iterator[None]:
        """Load the models and keep them on the device (not offloadable) for the duration of the block."""
        with self._table():
            self.load_to_device(models)
            for model in models:
                self._resident[id(model)].pins += 1
        try:
            yield
        finally:
            with self._table():
                for model in models:
                    entry = self._resident.get(id(model))
                    if entry is not None:
                        entry.pins -= 1

    def offload(self, model: nn.Module) -> None:
        """Move one model back to the offload device (no-op if it is not resident)."""
        with self._table():
            if id(model) in self._resident:
                self._offload(id(model))

    def free(self, unload: bool = True) -> None:
        """ComfyUI's POST /free: with unload, move every unpinned model off the device; then release the
        allocator's cached blocks."""
        with self._table():
            if unload:
                for key in [k for k, entry in self._resident.items() if not entry.pins]:
                    self._offload(key)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
