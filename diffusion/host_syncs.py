"""Finding the places where the host would wait for the GPU, without a GPU.

Reading a device tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, a copy
to the CPU, ``nonzero``'s data-dependent shape) or a blocking upload from pageable host memory stalls the host until the device has caught up, and a step
loop that does so every step loses the head start that hides kernel-launch cost. :func:`record_host_syncs`
notes every such call with the line of our code that made it. Run on tensors on the ``meta`` device, it
separates device values (meta: would sync) from host values that never sync (sigmas kept on the CPU), and
stands in a dummy answer for each read so that the code runs on.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

_READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero"}
_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class HostSync:
    """One read of a device value on the host: what read it and the line of project code responsible."""

    read: str
    site: str  # "diffusion/sampling/sample.py:123 in sample_custom"


def _project_site() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path.is_relative_to(_ROOT) and path != Path(__file__).resolve() and ".venv" not in path.parts:
            return f"{path.relative_to(_ROOT)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "outside the project"


def _reads_device(func: object, args: tuple, kwargs: dict) -> str | None:
    name = getattr(func, "__name__", "")
    if name in ("to", "copy_") and args and isinstance(args[0], torch.Tensor):
        source, target = (args[0], _target_device(args[1:], kwargs)) if name == "to" else (args[1], args[0].device)
        if not isinstance(source, torch.Tensor) or target is None or source.device == target:
            return None
        if source.device.type != "cpu" and target.type == "cpu":
            return f"{name}(cpu)"
        # An upload from pageable host memory waits for the device stream too (torch synchronises after
        # a blocking host -> device copy); pinned memory with non_blocking=True does not.
        non_blocking = bool(kwargs.get("non_blocking", False)) or (len(args) > 2 and args[-1] is True)
        if source.device.type == "cpu" and target.type != "cpu" and not (non_blocking and source.is_pinned()):
            return f"{name}({target.type}) from host"
        return None
    if name in ("tensor", "as_tensor") and _target_device((), kwargs) not in (None, torch.device("cpu")):
        return f"{name}(device=...) from host"
    if name not in _READS:
        return None
    tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if tensor is None or tensor.device.type == "cpu":
        return None
    return name


def _target_device(args: tuple, kwargs: dict) -> torch.device | None:
    for value in (*args, kwargs.get("device")):
        if isinstance(value, (str, torch.device)):
            return torch.device(value)
    return None


def _stand_in(read: str, tensor: torch.Tensor) -> object:
    """A plausible value for a read of a meta tensor, which has no data."""
    if read == "__bool__":
        return False
    if read in ("__int__", "__index__"):
        return 1
    if read in ("item", "__float__"):
        return 0.5
    if read == "tolist":
        return torch.full(tensor.shape, 0.5).tolist()
    if read == "nonzero":
        return torch.zeros((0, tensor.dim()), dtype=torch.long, device=tensor.device)
    return torch.full(tensor.shape, 0.5, dtype=tensor.dtype)


class _Recorder(TorchFunctionMode):
    def __init__(self, found: list[HostSync]) -> None:
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        read = _reads_device(func, args, kwargs)
        if read is None:
            return func(*args, **kwargs)
        self.found.append(HostSync(read, _project_site()))
        if read in ("to(cpu)", "copy_(cpu)"):
            source = args[0] if read == "to(cpu)" else args[1]
            if source.device.type == "meta":  # a meta tensor has no data to copy out
                stand_in = _stand_in("cpu", source)
                return stand_in if read == "to(cpu)" else args[0].copy_(stand_in)
        if "(" in read:  # an upload: meta tensors take one fine, and real copies must really happen
            return func(*args, **kwargs)
        if args[0].device.type == "meta":
            return _stand_in(read, args[0])
        return func(*args, **kwargs)


@contextmanager
def record_host_syncs() -> Iterator[list[HostSync]]:
    """``with record_host_syncs() as found:`` lists every host read of a non-CPU tensor, and every blocking
    upload to one, made in the block."""
    found: list[HostSync] = []
    with _Recorder(found):
        yield found
