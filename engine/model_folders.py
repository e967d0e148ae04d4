"""ComfyUI's model folder layout (comfyui-interface.md section 9): kind -> sub-folders of the models folder.

The first name is where new files go; the later ones are older spellings still searched. Loader nodes list
their COMBO options from here and the server's `/models` routes describe the same folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from engine.paths import UnsafePathError, list_files, resolve_inside

MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin")

MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "vae": ("vae",),
    "loras": ("loras",),
    "embeddings": ("embeddings",),
    "text_encoders": ("text_encoders", "clip"),
    "diffusion_models": ("diffusion_models", "unet"),
    "diffusers": ("diffusers",),
    "upscale_models": ("upscale_models",),
    "controlnet": ("controlnet",),
    "configs": ("configs",),
}


def _roots(models_dirs: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(models_dirs, (str, Path)):
        return [Path(models_dirs)]
    return [Path(root) for root in models_dirs]


def model_files(models_dirs: str | Path | Iterable[str | Path], kind: str) -> list[str]:
    """File names of one kind, relative to its folder, sorted; a name found under several roots or
    spellings is listed once. `models_dirs` is one models root or several (RunSettings.model_roots)."""
    if kind not in MODEL_FOLDERS:
        raise KeyError(f"unknown model folder kind {kind!r}; known: {', '.join(MODEL_FOLDERS)}")
    extensions = (".yaml", ".yml") if kind == "configs" else MODEL_EXTENSIONS
    names: set[str] = set()
    for root in _roots(models_dirs):
        for folder in MODEL_FOLDERS[kind]:
            names.update(list_files(root / folder, extensions))
    return sorted(names)


def find_model_file(models_dirs: str | Path | Iterable[str | Path], kind: str, name: str) -> Path:
    """The file behind a COMBO value: the first root and folder spelling that has it, resolved safely.

    Raises UnsafePathError for names that would leave the folder and FileNotFoundError (naming every
    folder searched) when no root has it; node code turns both into the node's error message.
    """
    if kind not in MODEL_FOLDERS:
        raise KeyError(f"unknown model folder kind {kind!r}; known: {', '.join(MODEL_FOLDERS)}")
    searched = []
    for root in _roots(models_dirs):
        for folder in MODEL_FOLDERS[kind]:
            base = root / folder
            candidate = resolve_inside(base, name)
            if candidate.exists():
                return candidate
            searched.append(str(base))
    raise FileNotFoundError(f"{name!r} is not in the {kind} folder ({', '.join(searched)})")


__all__ = ["MODEL_EXTENSIONS", "MODEL_FOLDERS", "UnsafePathError", "find_model_file", "model_files"]
