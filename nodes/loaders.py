"""Loader nodes: checkpoints, standalone VAEs, text encoders and UNets from the model folders -> MODEL, CLIP, VAE.

Each loader turns a COMBO file name into handles (nodes/values.py). The executor caches node outputs, so a
checkpoint is read once per name and reused until its inputs change; there is no second model cache here.
Weights are stored on the CPU in the compute dtype and moved to the compute device by the shared
ModelManager (nodes/runtime.py) when a node runs them.

The built-in demo checkpoint (DEMO_CHECKPOINT) is always offered, so the README's default workflow and the
example workflows run on a fresh install with no model files: a tiny random-weight SD1 model, generated
deterministically into the temp folder. A real file of that name in the checkpoints folder wins.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from diffusion import detection
from diffusion.checkpoints import LoadedCheckpoint, load_checkpoint, open_tensor_file
from diffusion.detection import HeadOverrides
from diffusion.latent_preview import fit_latent_to_rgb
from diffusion.safetensors_io import CheckpointError
from diffusion.sampling.model_sampling import DiscreteConfig, DiscreteModelSampling
from diffusion.text_encoders import SDTextEncoder, embedding_folder_lookup
from diffusion.tiny_models import head_overrides_from_metadata, tiny_overrides_for_widths, write_tiny_checkpoint
from diffusion.vae import AutoencoderKL
from engine import Combo, ExecutionContext, RunSettings, node
from engine.model_folders import MODEL_FOLDERS, UnsafePathError, find_model_file, model_files
from engine.paths import list_files, resolve_inside
from nodes.runtime import compute_dtype, model_manager
from nodes.values import ClipHandle, ModelHandle, VaeHandle

DEMO_CHECKPOINT = "sdgraph-demo-tiny-sd1.safetensors"
_DEMO_SEED = 0
_DIFFUSERS_MARKER = "model_index.json"


# --- COMBO options ------------------------------------------------------------------------------------------


def diffusers_folder_names(settings: RunSettings, kind: str) -> list[str]:
    """Folders holding a diffusers pipeline (a model_index.json) under a kind's folders, relative to them."""
    names: set[str] = set()
    for root in settings.model_roots:
        for folder in MODEL_FOLDERS[kind]:
            for marker in list_files(root / folder, (_DIFFUSERS_MARKER,)):
                if Path(marker).name == _DIFFUSERS_MARKER and "/" in marker:
                    names.add(marker.rsplit("/", 1)[0])
    return sorted(names)


def _files_outside(folders: list[str], files: list[str]) -> list[str]:
    return [name for name in files if not any(name.startswith(folder + "/") for folder in folders)]


def checkpoint_names(settings: RunSettings) -> list[str]:
    """Checkpoint files and diffusers folders under `checkpoints` (a folder's own weight files are not
    listed), then the demo checkpoint, last, unless a real file already has its name."""
    folders = diffusers_folder_names(settings, "checkpoints")
    names = sorted(_files_outside(folders, model_files(settings.model_roots, "checkpoints")) + folders)
    return names if DEMO_CHECKPOINT in names else [*names, DEMO_CHECKPOINT]


def diffusers_names(settings: RunSettings) -> list[str]:
    return diffusers_folder_names(settings, "diffusers")


def _files_of(kind: str):
    def options(settings: RunSettings) -> list[str]:
        return model_files(settings.model_roots, kind)
    options.__name__ = f"{kind}_names"
    return options


# --- finding and reading files ------------------------------------------------------------------------------


def model_path(settings: RunSettings, kind: str, name: str, input_name: str) -> Path:
    """The file (or diffusers folder) a COMBO value names, or a ValueError naming the input."""
    try:
        return find_model_file(settings.model_roots, kind, name)
    except (FileNotFoundError, UnsafePathError) as error:
        raise ValueError(f"{input_name}: {error}") from None


def checkpoint_path(settings: RunSettings, name: str, input_name: str = "ckpt_name") -> Path:
    """A checkpoint by name: the checkpoints folders, then diffusers folders, then the built-in demo."""
    try:
        return find_model_file(settings.model_roots, "checkpoints", name)
    except FileNotFoundError:
        if name == DEMO_CHECKPOINT:
            return demo_checkpoint_file(settings)
        try:
            return find_model_file(settings.model_roots, "diffusers", name)
        except FileNotFoundError:
            pass
        except UnsafePathError as error:
            raise ValueError(f"{input_name}: {error}") from None
        return model_path(settings, "checkpoints", name, input_name)
    except UnsafePathError as error:
        raise ValueError(f"{input_name}: {error}") from None


def demo_checkpoint_file(settings: RunSettings) -> Path:
    """The demo checkpoint, (re)written into the temp folder; the same seed gives the same bytes every time,
    so writing it again (the temp folder is cleared at start) changes nothing a cache could see."""
    path = resolve_inside(settings.temp_dir, f"sdgraph-demo/{DEMO_CHECKPOINT}")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        write_tiny_checkpoint(partial, "sd1", seed=_DEMO_SEED)
        os.replace(partial, path)  # atomic: a concurrent reader sees the whole file or none
    return path


def head_overrides_for(path: Path) -> HeadOverrides | None:
    """Head counts a single file cannot tell from its weights: recorded in its metadata (tiny files) or,
    for tiny files without metadata, read off the tiny widths."""
    if path.is_dir():
        return None  # a diffusers folder's config.json carries them
    with open_tensor_file(path) as source:
        recorded = head_overrides_from_metadata(source.metadata)
        if recorded is not None:
            return recorded
        shapes = source.shapes()
        try:
            family = detection.detect_family(shapes).family
        except CheckpointError:
            return None  # load_checkpoint reports the layout properly
        return tiny_overrides_for_widths(shapes, family)


# --- handles ------------------------------------------------------------------------------------------------


def preview_factors_for(vae: AutoencoderKL, settings: RunSettings) -> torch.Tensor | None:
    if settings.preview == "none":
        return None
    with model_manager(settings).use(vae):
        return fit_latent_to_rgb(vae)


def embeddings_lookup(settings: RunSettings):
    """`embedding:name` lookups over every model root's embeddings folders (searched at encode time)."""
    folders = [root / folder for root in settings.model_roots for folder in MODEL_FOLDERS["embeddings"]]
    return embedding_folder_lookup(folders)


def clip_handle(encoder, settings: RunSettings) -> ClipHandle:
    return ClipHandle(SDTextEncoder(encoder, embeddings=embeddings_lookup(settings)))


def handles_from(loaded: LoadedCheckpoint, settings: RunSettings) -> tuple[ModelHandle, ClipHandle, VaeHandle]:
    sampling = DiscreteModelSampling(DiscreteConfig(prediction=loaded.prediction, zero_terminal_snr=loaded.zsnr))
    model = ModelHandle(
        unet=loaded.unet, model_sampling=sampling, latent_format=loaded.vae.latent_format, family=loaded.family,
        preview_factors=preview_factors_for(loaded.vae, settings),
    )
    return model, clip_handle(loaded.text_encoder, settings), VaeHandle(loaded.vae)


def load_checkpoint_handles(
    path: Path, settings: RunSettings, *, prediction: str | None = None, input_name: str = "ckpt_name"
) -> tuple[ModelHandle, ClipHandle, VaeHandle]:
    try:
        loaded = load_checkpoint(
            path, dtype=compute_dtype(settings), device="cpu", prediction=prediction,
            overrides=head_overrides_for(path),
        )
    except CheckpointError as error:
        raise ValueError(f"{input_name}: {error}") from None
    return handles_from(loaded, settings)


# --- nodes --------------------------------------------------------------------------------------------------


@node(category="loaders", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
      display_name="Load Checkpoint")
def CheckpointLoaderSimple(ckpt_name: Combo(checkpoint_names), *, context: ExecutionContext) -> tuple:
    """A checkpoint (single file or diffusers folder) as its diffusion model, text encoder and VAE."""
    path = checkpoint_path(context.settings, ckpt_name)
    return load_checkpoint_handles(path, context.settings)
