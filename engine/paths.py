"""Safe file access under a root folder: every node that reads or writes a file goes through here.

A relative name from a prompt or an upload (`sd15/model.safetensors`, `portraits/img`) must stay inside its
root: absolute paths, drive letters, `..` components, NUL bytes and symlinks that lead outside are refused.
ComfyUI's `/view` only rejects `..` and a leading `/`; symlink escapes are the gap this closes. A symlinked
root folder itself is fine (the root is resolved first), so a models folder may live on another disk.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Iterable

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafePathError(ValueError):
    """A relative name that would leave its root folder (or cannot be a file name at all)."""


def resolve_inside(root: str | Path, relative: str) -> Path:
    """`root / relative`, resolved, after proving it stays inside `root`; raises UnsafePathError."""
    if not isinstance(relative, str):
        raise UnsafePathError(f"file name must be a string, got {type(relative).__name__}")
    if "\x00" in relative:
        raise UnsafePathError(f"file name {relative!r} contains a NUL byte")
    if relative.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(relative):
        raise UnsafePathError(f"file name {relative!r} must be relative to {root}, not absolute")
    if ".." in re.split(r"[\\/]", relative):
        raise UnsafePathError(f"file name {relative!r} must not contain '..'")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"file name {relative!r} leads outside {base} (to {target}) through a symlink")
    return target


def list_files(root: str | Path, extensions: Iterable[str] = ()) -> list[str]:
    """Files under `root` (sub-folders included) as sorted relative posix paths, for COMBO options.

    `extensions` (".safetensors", ...) match case-insensitively; empty means every file. A missing root
    gives an empty list; hidden sub-folders (`.git`, `.cache`) are skipped. Entries that a symlink leads
    outside the root are left out, since `resolve_inside` would refuse to open them.
    """
    wanted = tuple(e.lower() for e in extensions)
    base = Path(root)
    if not base.is_dir():
        return []
    found = []
    for folder, subfolders, files in os.walk(base, followlinks=False):
        subfolders[:] = [s for s in subfolders if not s.startswith(".")]
        for name in files:
            if wanted and not name.lower().endswith(wanted):
                continue
            relative = PurePosixPath(Path(folder, name).relative_to(base)).as_posix()
            try:
                resolve_inside(base, relative)
            except UnsafePathError:
                continue
            found.append(relative)
    return sorted(found)
