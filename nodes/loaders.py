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
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from diffusion import detection
from diffusion.checkpoints import LoadedCheckpoint, load_checkpoint, load_vae, open_tensor_file
from diffusion.detection import HeadOverrides
from diffusion.inpaint import grey_image_latent
from diffusion.latent_format import LatentFormat
from diffusion.latent_preview import fit_latent_to_rgb
from diffusion.safetensors_io import CheckpointError
from diffusion.sampling.model_sampling import DiscreteConfig, DiscreteModelSampling
from diffusion.standalone_files import load_text_encoder_file, load_unet_file
from diffusion.text_encoders import ClipTextEncoder, SDTextEncoder, embedding_folder_lookup
from diffusion.tiny_models import head_overrides_from_metadata, tiny_overrides_for_widths, write_tiny_checkpoint
from diffusion.vae import SD_VAE, AutoencoderKL
from engine import Combo, ExecutionContext, Int, RunSettings, Socket, node
from engine.model_folders import MODEL_FOLDERS, UnsafePathError, find_model_file, model_files
from engine.paths import list_files, resolve_inside
from engine.schema import FingerprintHook
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
    """Checkpoint files and diffusers folders under `checkpoints` and `diffusers` (a folder's own weight
    files are not listed), then the demo checkpoint, last, unless a real file already has its name."""
    folders = diffusers_folder_names(settings, "checkpoints")
    files = _files_outside(folders, model_files(settings.model_roots, "checkpoints"))
    names = sorted(set(files + folders + diffusers_folder_names(settings, "diffusers")))
    return names if DEMO_CHECKPOINT in names else [*names, DEMO_CHECKPOINT]


def diffusers_names(settings: RunSettings) -> list[str]:
    return diffusers_folder_names(settings, "diffusers")


def vae_names(settings: RunSettings) -> list[str]:
    return model_files(settings.model_roots, "vae")


def text_encoder_names(settings: RunSettings) -> list[str]:
    return model_files(settings.model_roots, "text_encoders")


def unet_names(settings: RunSettings) -> list[str]:
    return model_files(settings.model_roots, "diffusion_models")


def config_names(settings: RunSettings) -> list[str]:
    return model_files(settings.model_roots, "configs")


# --- finding and reading files ------------------------------------------------------------------------------


def model_file(settings: RunSettings, kind: str, name: str, input_name: str) -> Path:
    """The file (or diffusers folder) a COMBO value names, or a ValueError naming the input."""
    try:
        return find_model_file(settings.model_roots, kind, name)
    except (FileNotFoundError, UnsafePathError) as error:
        raise ValueError(f"{input_name}: {error}") from None


def _find_checkpoint(settings: RunSettings, name: str, input_name: str) -> Path | None:
    for kind in ("checkpoints", "diffusers"):
        try:
            return find_model_file(settings.model_roots, kind, name)
        except FileNotFoundError:
            continue
        except UnsafePathError as error:
            raise ValueError(f"{input_name}: {error}") from None
    return None


def checkpoint_path(settings: RunSettings, name: str, input_name: str = "ckpt_name") -> Path:
    """A checkpoint by name: the checkpoints folders, then diffusers folders, then the built-in demo."""
    found = _find_checkpoint(settings, name, input_name)
    if found is not None:
        return found
    if name == DEMO_CHECKPOINT:
        return demo_checkpoint_file(settings)
    return model_file(settings, "checkpoints", name, input_name)  # raises, naming the folders searched


def demo_checkpoint_file(settings: RunSettings) -> Path:
    """The demo checkpoint, written into the temp folder each time it is loaded (a fraction of a second, and
    only when the executor's cache misses): a file left there by another version is never trusted. The same
    seed gives the same bytes every time."""
    path = resolve_inside(settings.temp_dir, f"sdgraph-demo/{DEMO_CHECKPOINT}")
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


# --- cache fingerprints -------------------------------------------------------------------------------------
# The executor caches a loader's output by its inputs; a file replaced under the same name must reload, so
# the file's state joins the cache key. Stat calls only: nothing is read.


def file_state(path: Path) -> list:
    """[path, newest mtime_ns, total size] of a file, or of every file in a (diffusers) folder."""
    files = [path] if path.is_file() else [Path(d, f) for d, _, names in os.walk(path) for f in names]
    stats = [f.stat() for f in files]
    return [str(path), max((s.st_mtime_ns for s in stats), default=0), sum(s.st_size for s in stats)]


def file_fingerprint(kind: str, input_name: str) -> FingerprintHook:
    """A fingerprint hook for a node whose `input_name` names a file of `kind`; a missing file leaves the
    error to validation and the node."""
    def fingerprint(constants: Mapping[str, Any], settings: RunSettings) -> list | None:
        try:
            return file_state(find_model_file(settings.model_roots, kind, constants.get(input_name)))
        except (FileNotFoundError, UnsafePathError, OSError):
            return None
    return fingerprint


def _checkpoint_fingerprint(constants: Mapping[str, Any], settings: RunSettings) -> list | None:
    try:
        found = _find_checkpoint(settings, constants.get("ckpt_name"), "ckpt_name")
        # The demo is generated from a fixed seed: the same model whatever its temp file's time stamp.
        state = file_state(found) if found is not None else ["demo", _DEMO_SEED]
    except (ValueError, OSError):
        return None
    if "config_name" in constants:
        return [state, file_fingerprint("configs", "config_name")(constants, settings)]
    return state


# --- handles ------------------------------------------------------------------------------------------------


def preview_factors_for(vae: AutoencoderKL, settings: RunSettings) -> torch.Tensor | None:
    if settings.preview == "none":
        return None
    with model_manager(settings).use(vae):
        return fit_latent_to_rgb(vae)


def embeddings_lookup(settings: RunSettings) -> Callable[[str], torch.Tensor | None]:
    """`embedding:name` lookups over every model root's embeddings folders (searched at encode time)."""
    folders = [root / folder for root in settings.model_roots for folder in MODEL_FOLDERS["embeddings"]]
    return embedding_folder_lookup(folders)


def clip_handle(encoder: ClipTextEncoder, settings: RunSettings) -> ClipHandle:
    return ClipHandle(SDTextEncoder(encoder, embeddings=embeddings_lookup(settings)))


def handles_from(
    loaded: LoadedCheckpoint, settings: RunSettings
) -> tuple[ModelHandle, ClipHandle | None, VaeHandle | None]:
    """MODEL, CLIP, VAE of a loaded checkpoint; CLIP or VAE is None when the file has no weights for it
    (as ComfyUI: the nodes that need one say so and name a loader to add)."""
    sampling = DiscreteModelSampling(DiscreteConfig(prediction=loaded.prediction, zero_terminal_snr=loaded.zsnr))
    vae = loaded.vae
    # Without a VAE the family's own latent space still holds (SD1 and SD2 share the KL VAE's scale).
    latent_format = vae.latent_format if vae is not None else LatentFormat(SD_VAE.scale_factor, SD_VAE.shift_factor)
    model = ModelHandle(
        unet=loaded.unet, model_sampling=sampling, latent_format=latent_format, family=loaded.family,
        preview_factors=preview_factors_for(vae, settings) if vae is not None else None,
    )
    if model.concat_channels and vae is not None:
        with model_manager(settings).use(vae):
            model = replace(model, inpaint_blank_latent=grey_image_latent(vae))
    clip = clip_handle(loaded.text_encoder, settings) if loaded.text_encoder is not None else None
    return model, clip, VaeHandle(vae) if vae is not None else None


def load_checkpoint_handles(
    path: Path, settings: RunSettings, *, prediction: str | None = None, input_name: str = "ckpt_name"
) -> tuple[ModelHandle, ClipHandle, VaeHandle]:
    try:
        loaded = load_checkpoint(
            path, dtype=compute_dtype(settings), device="cpu", prediction=prediction,
            overrides=_overrides(path, input_name),
        )
    except CheckpointError as error:
        raise ValueError(f"{input_name}: {error}") from None
    return handles_from(loaded, settings)


def _overrides(path: Path, input_name: str) -> HeadOverrides | None:
    try:
        return head_overrides_for(path)
    except (CheckpointError, ValueError) as error:
        raise ValueError(f"{input_name}: {error}") from None


_PARAMETERIZATION = re.compile(r"^\s*parameterization:\s*[\"']?(\w+)", re.MULTILINE)


def config_prediction(path: Path) -> str:
    """An LDM model config's prediction type: `parameterization: "v"` means v, anything else eps. Read as
    text (the one key we use): a yaml parser would be a dependency, and yaml tags can construct objects."""
    match = _PARAMETERIZATION.search(path.read_text(encoding="utf-8", errors="replace"))
    return "v_prediction" if match is not None and match.group(1) == "v" else "eps"


# --- nodes --------------------------------------------------------------------------------------------------


@node(category="loaders", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
      display_name="Load Checkpoint", fingerprint=_checkpoint_fingerprint)
def CheckpointLoaderSimple(ckpt_name: Combo(checkpoint_names), *, context: ExecutionContext) -> tuple:
    """A checkpoint (single file or diffusers folder) as its diffusion model, text encoder and VAE."""
    path = checkpoint_path(context.settings, ckpt_name)
    return load_checkpoint_handles(path, context.settings)


@node(category="advanced/loaders", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
      display_name="Load Checkpoint With Config (DEPRECATED)", deprecated=True,
      fingerprint=_checkpoint_fingerprint)
def CheckpointLoader(config_name: Combo(config_names), ckpt_name: Combo(checkpoint_names), *,
                     context: ExecutionContext) -> tuple:
    """A checkpoint whose prediction type comes from an LDM yaml in models/configs (`parameterization`)."""
    prediction = config_prediction(model_file(context.settings, "configs", config_name, "config_name"))
    path = checkpoint_path(context.settings, ckpt_name)
    return load_checkpoint_handles(path, context.settings, prediction=prediction)


@node(category="advanced/loaders", outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
      display_name="DiffusersLoader", fingerprint=file_fingerprint("diffusers", "model_path"))
def DiffusersLoader(model_path: Combo(diffusers_names), *, context: ExecutionContext) -> tuple:
    """A diffusers pipeline folder under models/diffusers."""
    folder = model_file(context.settings, "diffusers", model_path, "model_path")
    return load_checkpoint_handles(folder, context.settings, input_name="model_path")


@node(category="loaders", outputs=[("VAE", "VAE")], display_name="Load VAE",
      fingerprint=file_fingerprint("vae", "vae_name"))
def VAELoader(vae_name: Combo(vae_names), *, context: ExecutionContext) -> tuple:
    """A standalone VAE (LDM or diffusers names, or a full checkpoint's VAE part)."""
    path = model_file(context.settings, "vae", vae_name, "vae_name")
    try:
        vae = load_vae(path, dtype=compute_dtype(context.settings), device="cpu")
    except CheckpointError as error:
        raise ValueError(f"vae_name: {error}") from None
    return (VaeHandle(vae),)


#: ComfyUI's CLIPLoader types this loader can build; SD1's CLIP-L and SD2's OpenCLIP-H are both
#: "stable_diffusion" there (told apart by the weights), so workflows keep that name.
CLIP_TYPES = ("stable_diffusion",)


@node(category="advanced/loaders", outputs=[("CLIP", "CLIP")], display_name="Load CLIP",
      fingerprint=file_fingerprint("text_encoders", "clip_name"))
def CLIPLoader(clip_name: Combo(text_encoder_names), type: Combo(CLIP_TYPES, default="stable_diffusion"), *,
               context: ExecutionContext) -> tuple:
    """A standalone text encoder from models/text_encoders (CLIP-L for SD1, OpenCLIP-H for SD2)."""
    path = model_file(context.settings, "text_encoders", clip_name, "clip_name")
    overrides = _overrides(path, "clip_name")
    try:
        encoder = load_text_encoder_file(path, dtype=compute_dtype(context.settings), device="cpu",
                                         num_heads=overrides.text_num_heads if overrides else None)
    except CheckpointError as error:
        raise ValueError(f"clip_name: {error}") from None
    return (clip_handle(encoder, context.settings),)


WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")


def _refuse_fp8(constants: Mapping[str, Any]) -> str | None:
    if constants.get("weight_dtype", "default") != "default":
        return (f"weight_dtype: {constants['weight_dtype']} is not supported (fp8 weights need kernels sdgraph "
                "does not have); use 'default' (fp16 on CUDA, fp32 on the CPU)")
    return None


@node(category="advanced/loaders", outputs=[("MODEL", "MODEL")], display_name="Load Diffusion Model",
      validate=_refuse_fp8, fingerprint=file_fingerprint("diffusion_models", "unet_name"))
def UNETLoader(unet_name: Combo(unet_names), weight_dtype: Combo(WEIGHT_DTYPES, default="default"), *,
               context: ExecutionContext) -> tuple:
    """A standalone UNet from models/diffusion_models. With no VAE to fit them to, it has no live previews."""
    problem = _refuse_fp8({"weight_dtype": weight_dtype})
    if problem:
        raise ValueError(problem)
    path = model_file(context.settings, "diffusion_models", unet_name, "unet_name")
    try:
        loaded = load_unet_file(path, dtype=compute_dtype(context.settings), device="cpu",
                                overrides=_overrides(path, "unet_name"))
    except CheckpointError as error:
        raise ValueError(f"unet_name: {error}") from None
    sampling = DiscreteModelSampling(DiscreteConfig(prediction=loaded.prediction.prediction,
                                                    zero_terminal_snr=loaded.prediction.zsnr))
    # SD1 and SD2 share one VAE and so one latent format.
    latent_format = LatentFormat(SD_VAE.scale_factor, SD_VAE.shift_factor)
    return (ModelHandle(unet=loaded.unet, model_sampling=sampling, latent_format=latent_format,
                        family=loaded.family),)


@node(category="conditioning", outputs=[("CLIP", "CLIP")], display_name="CLIP Set Last Layer")
def CLIPSetLastLayer(clip: Socket("CLIP"), stop_at_clip_layer: Int(-1, min=-24, max=-1, step=1)) -> tuple:
    """Encode prompts with an earlier hidden layer of the text encoder (-1 the last, -2 the one before; past
    the first layer it stays at the last, as ComfyUI does)."""
    return (clip.with_layer(stop_at_clip_layer),)
