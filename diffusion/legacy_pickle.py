"""Legacy pickled checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) through torch's restricted unpickler only.

`torch.load(weights_only=True)` rebuilds tensors and plain containers and refuses every other global, so a
pickle that tries to run code fails before anything runs (model-formats 1.3). Lightning-era CompVis `.ckpt`
files also pickle a `ModelCheckpoint` callback and numpy scalars next to the weights; for those we allow, for
the duration of one load, a do-nothing stand-in class under the Lightning name and the few numpy
reconstructors, so those files load without importing pytorch_lightning or executing anything.
"""
from __future__ import annotations

import codecs
import pickle
import re
from pathlib import Path

import numpy
import torch

from diffusion.safetensors_io import CheckpointError

_LIGHTNING_CHECKPOINT = "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"


class LightningCheckpointStandIn:
    """Takes the place of Lightning's ModelCheckpoint callback: keeps the pickled attributes, does nothing."""

    def __setstate__(self, state: object) -> None:
        self.state = state


def _numpy_globals() -> list[tuple[object, str]]:
    multiarray = getattr(numpy, "_core", None) or numpy.core
    scalar = multiarray.multiarray.scalar
    # Files written with numpy < 2 name the module numpy.core; numpy 2 calls it numpy._core.
    allowed: list[tuple[object, str]] = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (numpy.dtype, "numpy.dtype"),
        (codecs.encode, "_codecs.encode"),
    ]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType"):
        dtype_class = getattr(numpy.dtypes, name, None)
        if dtype_class is not None:
            allowed.append((dtype_class, f"numpy.dtypes.{name}"))
    return allowed


def safe_globals() -> list[tuple[object, str]]:
    return [(LightningCheckpointStandIn, _LIGHTNING_CHECKPOINT), *_numpy_globals()]


def load_pickle_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a legacy checkpoint, memory-mapped where the file's format allows it.

    Raises CheckpointError "unsafe or unsupported checkpoint: <file> wants <global>" when the pickle names
    anything outside the allowlist; nothing from the file is executed.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                # Pre-1.6 (non-zip) torch files cannot be memory-mapped; read them whole.
                loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(refusal_message(path, str(error))) from None
    except Exception as error:  # noqa: BLE001 - the unpickler fails on garbage with any exception type
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from None
    return _unwrap(loaded, path)


def refusal_message(path: Path, message: str) -> str:
    """"unsafe or unsupported checkpoint: <file> wants <global>" (or the unpickler's reason) from torch's error."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match:
        return f"unsafe or unsupported checkpoint: {path} wants {match.group(1)}"
    # torch's message opens with advice to retry with weights_only=False (running the file's code); report
    # only the restricted unpickler's own reason, e.g. "Unsupported operand 103".
    reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", message, re.S)
    detail = reason.group(1) if reason else message.splitlines()[-1]
    return f"unsafe or unsupported checkpoint: {path}: {detail}"


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(loaded, dict):
        if isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        elif len(loaded) == 1 and isinstance(next(iter(loaded.values())), dict):
            loaded = next(iter(loaded.values()))  # ComfyUI also unwraps a lone nested dict
        else:
            break
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a state dict of tensors")
    return {name: value for name, value in loaded.items() if isinstance(value, torch.Tensor)}


class PickleTensors:
    """A legacy checkpoint viewed like SafetensorsFiles: names, shapes, one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.description = str(self.path)
        self.metadata: dict[str, str] = {}
        self._tensors = load_pickle_state_dict(self.path)
        self._shapes = {name: tuple(t.shape) for name, t in self._tensors.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape (computed once). Treat as read-only."""
        return self._shapes

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        # Dropping our references lets the loaded model own the only copies (the file stays mapped for them).
        self._tensors = {}

    def __enter__(self) -> PickleTensors:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
