"""Content-addressed node signatures and the LRU result cache with an entry and byte budget.

A node's signature hashes its class, its constant inputs (canonical JSON), for each linked input the
signature of the source node and the output index, and the node's fingerprint of external state. Node ids
take no part (except for nodes asking for their UNIQUE_ID, whose output may depend on it), so an identical
sub-graph in another workflow, under other ids, hits the same entries.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping


def canonical(value: Any) -> Any:
    """A JSON-encodable canonical form of a constant or fingerprint; refuses values with no stable form."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # JSON has no NaN or infinity; int 1 and float 1.0 stay distinct, as a node could tell them apart.
        return {"float": repr(value)} if not math.isfinite(value) else value
    if isinstance(value, (list, tuple)):
        return [canonical(item) for item in value]
    if isinstance(value, dict):
        return {"dict": sorted([[canonical(k), canonical(v)] for k, v in value.items()], key=json.dumps)}
    if isinstance(value, (set, frozenset)):
        return {"set": sorted((canonical(item) for item in value), key=json.dumps)}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    raise TypeError(f"cannot build a cache key from a {type(value).__name__} ({value!r:.60}); "
                    "constants and fingerprints must be JSON-like values, bytes or sets")


def signature(class_type: str, constants: Mapping[str, Any], links: Mapping[str, tuple[str, int]],
              fingerprint: Any = None, node_id: str | None = None) -> str:
    """The cache key of one node; `links` maps input name to (source signature, output index)."""
    document = {"class": class_type, "constants": canonical(dict(constants)),
                "links": {name: list(source) for name, source in sorted(links.items())},
                "fingerprint": canonical(fingerprint), "node_id": node_id}
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


def estimate_nbytes(value: Any, _seen: set[int] | None = None) -> int:
    """Memory held by a cached value, without importing torch: `cache_nbytes()` if the object defines it
    (model handles report what they choose), else an integer `nbytes` attribute (tensors, arrays), else the
    sum over tuples, lists and dict values, else the object's own size."""
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    custom = getattr(value, "cache_nbytes", None)
    if callable(custom):
        return int(custom())
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int) and not isinstance(value, type):
        return nbytes
    if isinstance(value, (tuple, list, set, frozenset)):
        return sum(estimate_nbytes(item, seen) for item in value)
    if isinstance(value, dict):
        return sum(estimate_nbytes(item, seen) for item in value.values())
    return sys.getsizeof(value)


@dataclass(frozen=True)
class CacheEntry:
    outputs: tuple
    ui: Mapping[str, Any] | None
    nbytes: int


class ResultCache:
    """Node results by signature, least recently used evicted first once over `max_entries` or `max_bytes`
    (None: no limit on that axis; `max_entries=0` disables caching). Safe to use from several threads."""

    def __init__(self, max_entries: int | None = 1024, max_bytes: int | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, outputs: tuple, ui: Mapping[str, Any] | None = None) -> bool:
        """Store a result; False when it alone exceeds the budget and was not kept."""
        entry = CacheEntry(outputs, ui, estimate_nbytes(outputs))
        with self._lock:
            if self.max_entries == 0 or (self.max_bytes is not None and entry.nbytes > self.max_bytes):
                return False
            previous = self._entries.pop(key, None)
            self._bytes -= previous.nbytes if previous else 0
            self._entries[key] = entry
            self._bytes += entry.nbytes
            self._evict()
            return True

    def _evict(self) -> None:
        def over_budget() -> bool:
            too_many = self.max_entries is not None and len(self._entries) > self.max_entries
            return too_many or (self.max_bytes is not None and self._bytes > self.max_bytes)
        while self._entries and over_budget():
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._bytes
