"""What a running node may see of the engine: its run settings, its identity, progress and interrupts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEVICES = ("auto", "cpu", "cuda")
PREVIEW_MODES = ("auto", "none", "latent2rgb")


class Interrupted(Exception):
    """Raised inside a node when an interrupt was requested; the executor turns it into
    `execution_interrupted`. Nodes must let it propagate."""


@dataclass(frozen=True)
class RunSettings:
    """Folders and device for a run. The engine never reads them; it hands them to nodes and hooks."""

    models_dir: Path = Path("models")
    #: More model roots searched after `models_dir` (ComfyUI's extra_model_paths): a shared library of
    #: checkpoints on another disk. Files under several roots are listed once; the first root wins.
    extra_models_dirs: tuple[Path, ...] = ()
    input_dir: Path = Path("input")
    output_dir: Path = Path("output")
    temp_dir: Path = Path("temp")
    device: str = "auto"
    #: Live sampler previews: "none" sends none; "auto" and "latent2rgb" send a cheap linear latent->RGB
    #: projection (the only method so far; "auto" will pick a better one when there is one).
    preview: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.preview not in PREVIEW_MODES:
            raise ValueError(f"preview must be one of {PREVIEW_MODES}, got {self.preview!r}")
        for name in ("models_dir", "input_dir", "output_dir", "temp_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "extra_models_dirs", tuple(Path(p) for p in self.extra_models_dirs))

    @property
    def model_roots(self) -> tuple[Path, ...]:
        return (self.models_dir, *self.extra_models_dirs)

    def folder_for(self, kind: str) -> Path:
        """The folder behind a `ui` file entry's `type` ("output", "input" or "temp")."""
        folders = {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}
        if kind not in folders:
            raise ValueError(f"unknown folder type {kind!r}; expected one of {sorted(folders)}")
        return folders[kind]


@dataclass(frozen=True)
class ExecutionContext:
    """Handed to a node that declares a keyword-only `context` parameter."""

    node_id: str
    prompt_id: str
    class_type: str
    settings: RunSettings
    _report: Callable[[int | float, int | float, Any], None] = field(repr=False)
    _interrupt_requested: Callable[[], bool] = field(repr=False)

    def check_interrupt(self) -> None:
        if self._interrupt_requested():
            raise Interrupted(f"interrupted in node {self.node_id} ({self.class_type})")

    def progress(self, value: int | float, maximum: int | float, preview: Any = None) -> None:
        """Report `value` of `maximum` (e.g. a sampler step); raises Interrupted if an interrupt is pending,
        which is how an interrupt reaches inside a long loop."""
        self.check_interrupt()
        self._report(value, maximum, preview)
