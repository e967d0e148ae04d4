"""ComfyUI's model folder layout (comfyui-interface.md section 9): kind -> sub-folders of the models folder.

The first name is where new files go; the later ones are older spellings still searched. Loader nodes list
their COMBO options from here and the server's `/models` routes describe the same folders.
"""
from __future__ import annotations

from pathlib import Path

from engine.paths import list_files

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


def model_files(models_dir: str | Path, kind: str) -> list[str]:
    """File names of one kind, relative to its folder, sorted; files found under several spellings once."""
    if kind not in MODEL_FOLDERS:
        raise KeyError(f"unknown model folder kind {kind!r}; known: {', '.join(MODEL_FOLDERS)}")
    extensions = (".yaml", ".yml") if kind == "configs" else MODEL_EXTENSIONS
    names: set[str] = set()
    for folder in MODEL_FOLDERS[kind]:
        names.update(list_files(Path(models_dir) / folder, extensions))
    return sorted(names)
