"""Reading safetensors files: the header validated by hand, tensors one at a time through a memory map.

The format (model-formats 1.1): an 8-byte little-endian header length `N`, `N` bytes of UTF-8 JSON, then the
raw tensor bytes back to back. We parse and check the header ourselves before handing the file to
`safetensors.safe_open`, because the library's own errors ("HeaderTooLarge", "MetadataIncompleteBuffer")
name neither the file nor the tensor that is wrong, and users mostly meet them on truncated downloads.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

# The reference implementation refuses headers above 100 MB; a larger "length" means the first eight bytes
# were never a safetensors length, i.e. some other file renamed to `.safetensors`.
MAX_HEADER_BYTES = 100_000_000

# dtype tag -> (torch dtype or None where torch has none, bytes per element).
_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "C64": (torch.complex64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E4M3FNUZ": (torch.float8_e4m3fnuz, 1),
    "F8_E5M2FNUZ": (torch.float8_e5m2fnuz, 1),
    "F8_E8M0": (None, 1),
}
# Sub-byte floats packed two (or more) to a byte: known to the format, not loadable as weights here.
_PACKED_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")


class CheckpointError(ValueError):
    """A model file that cannot be read, or whose contents are not what the loader expected."""


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: where a tensor's bytes lie, relative to the end of the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.dtype][0] if self.dtype in _DTYPES else None


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one file: tensor entries in file order and the `__metadata__` strings."""

    path: Path
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate a safetensors header without touching the tensor data.

    Raises CheckpointError naming the file and, where one is to blame, the tensor: garbage or a non-safetensors
    file, bad JSON, an unknown dtype, a size that disagrees with the shape, overlapping or gapped ranges, and
    truncation (the first tensor whose bytes are past the end of the file).
    """
    path = Path(path)
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({file_size} bytes, shorter than the header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise CheckpointError(
                f"{path}: not a safetensors file (its first 8 bytes give a header of {header_len} bytes, "
                f"the file has {file_size})"
            )
        raw = handle.read(header_len)
    entries, metadata = _parse_header_json(path, raw)
    tensors = {name: _tensor_info(path, name, entry) for name, entry in entries}
    _check_ranges(path, tensors.values(), file_size - 8 - header_len)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata)


def _parse_header_json(path: Path, raw: bytes) -> tuple[list[tuple[str, object]], dict[str, str]]:
    def reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            duplicate = next(name for name in names if names.count(name) > 1)
            raise CheckpointError(f"{path}: header names tensor {duplicate!r} twice")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a safetensors file (header is not UTF-8 JSON: {error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    return list(header.items()), metadata


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets: {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype in _PACKED_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has packed sub-byte dtype {dtype}, which is not supported")
    if dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * _DTYPES[dtype][1]
    if begin < 0 or end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} ({dtype} {shape}) needs {expected} bytes, its offsets [{begin}, {end}] "
            f"give {end - begin}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_ranges(path: Path, tensors: Iterable[TensorInfo], data_size: int) -> None:
    ordered = sorted(tensors, key=lambda info: (info.begin, info.end))
    for info in ordered:
        if info.end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {info.name!r} needs bytes up to {info.end} of the data section, "
                f"which has only {data_size} (incomplete download?)"
            )
    position, previous = 0, None
    for info in ordered:
        if info.begin < position:
            raise CheckpointError(f"{path}: tensors {previous!r} and {info.name!r} overlap in the file")
        if info.begin > position:
            raise CheckpointError(f"{path}: {info.begin - position} unused bytes before tensor {info.name!r}")
        position, previous = info.end, info.name
    if position != data_size:
        raise CheckpointError(f"{path}: {data_size - position} bytes after the last tensor are not described")


class SafetensorsFiles:
    """The tensors of one or more safetensors files (e.g. shards) read one at a time through memory maps.

    Headers are validated up front, so names and shapes are available for detection before any data is read.
    Use as a context manager, or call close(); tensors already returned stay valid after closing.
    """

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.headers = [read_header(p) for p in paths]
        if not self.headers:
            raise CheckpointError("no safetensors files given")
        self._owner: dict[str, SafetensorsHeader] = {}
        for header in self.headers:
            for name in header.tensors:
                if name in self._owner:
                    raise CheckpointError(f"tensor {name!r} is in both {self._owner[name].path} and {header.path}")
                self._owner[name] = header
        self._handles: dict[Path, object] = {}
        self._shapes = {name: header.tensors[name].shape for name, header in self._owner.items()}

    @property
    def description(self) -> str:
        first = str(self.headers[0].path)
        return first if len(self.headers) == 1 else f"{first} (+{len(self.headers) - 1} shards)"

    @property
    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for header in self.headers:
            merged.update(header.metadata)
        return merged

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape (computed once; loaders ask many times). Treat as read-only."""
        return self._shapes

    def info(self, name: str) -> TensorInfo:
        return self._owner[name].tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._owner

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, file dtype) through the memory map."""
        header = self._owner.get(name)
        if header is None:
            raise KeyError(name)
        info = header.tensors[name]
        if info.torch_dtype is None:
            raise CheckpointError(f"{header.path}: tensor {name!r} has dtype {info.dtype}, which torch cannot hold")
        handle = self._handles.get(header.path)
        if handle is None:
            handle = self._handles[header.path] = safe_open(str(header.path), framework="pt", device="cpu")
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> SafetensorsFiles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
