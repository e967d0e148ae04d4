"""Conditioning nodes: text encoding, combining and averaging prompts, areas, masks and timestep ranges.

CONDITIONING is ComfyUI's list of `[cross_attn [B, T, C], extras]` (nodes/values.py); the extras keys set
here are the ones diffusion.sampling.guidance.Condition reads. Every node copies each entry's extras, so a
cached upstream conditioning is never changed by a node downstream.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Hashable, Mapping

import torch
from torch import Tensor

from diffusion.prompt_weights import EMBEDDING_PREFIX
from diffusion.text_encoders import embedding_folder_lookup
from engine import Combo, ExecutionContext, Float, Int, RunSettings, Socket, String, node
from engine.model_folders import MODEL_FOLDERS
from nodes.latent import LATENT_SCALE, MAX_RESOLUTION, mask_batch
from nodes.runtime import model_manager
from nodes.values import ClipHandle

log = logging.getLogger(__name__)

Conditioning = list[list[Any]]


def _entries(conditioning: Any, name: str) -> Conditioning:
    """A CONDITIONING input checked for its layout, or a clear error naming the input."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{name}: expected a non-empty CONDITIONING list, got {conditioning!r:.80}")
    for index, entry in enumerate(conditioning):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], Tensor)
                or not isinstance(entry[1], Mapping)):
            raise ValueError(f"{name}: entry {index} is not [cross_attn tensor, extras dict]")
    return conditioning


def _with_extras(conditioning: Any, name: str, **values: Any) -> tuple[Conditioning]:
    return ([[cross_attn, {**extras, **values}] for cross_attn, extras in _entries(conditioning, name)],)


def embedding_folders(settings: RunSettings) -> list[Path]:
    """Every `embeddings` folder under every model root, in search order (the first root wins)."""
    return [root / folder for root in settings.model_roots for folder in MODEL_FOLDERS["embeddings"]]


def _embedding_files_state(constants: Mapping[str, Any], settings: RunSettings) -> Hashable:
    """Joins CLIPTextEncode's cache key: a prompt naming embeddings re-encodes when those files change."""
    text = constants.get("text")
    if isinstance(text, str) and EMBEDDING_PREFIX not in text:
        return None
    state = []
    for folder in embedding_folders(settings):
        for directory, _, files in os.walk(folder, followlinks=True):
            for file in sorted(files):
                path = Path(directory) / file
                try:
                    stat = path.stat()
                except OSError:  # a dangling link: the lookup skips it too
                    continue
                state.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(state)


@node(category="conditioning", outputs=[("CONDITIONING", "CONDITIONING", "A conditioning containing the "
                                         "embedded text used to guide the diffusion model.")],
      fingerprint=_embedding_files_state,
      description="Encodes a text prompt using a CLIP model into an embedding that can be used to guide the "
                  "diffusion model towards generating specific images.")
def CLIPTextEncode(
    text: String("", multiline=True, dynamic_prompts=True, tooltip="The text to be encoded."),
    clip: Socket("CLIP", tooltip="The CLIP model used for encoding the text."),
    *, context: ExecutionContext,
) -> tuple:
    if not isinstance(clip, ClipHandle):
        raise ValueError("clip: the input is not a text encoder (a checkpoint without one gives None); "
                         f"got {type(clip).__name__}")
    if clip.text.embeddings is None:  # a CLIP from a loader has its lookup; any other gets the folders'
        lookup = embedding_folder_lookup(embedding_folders(context.settings))
        clip = replace(clip, text=clip.text.with_embeddings(lookup))
    # An `embedding:name` that no file matches is a logged warning and is left out, as in ComfyUI.
    cond, pooled = clip.encode(text, model_manager(context.settings))
    return ([[cond, {"pooled_output": pooled}]],)


@node(category="conditioning", outputs=["CONDITIONING"])
def ConditioningCombine(conditioning_1: Socket("CONDITIONING"), conditioning_2: Socket("CONDITIONING")) -> tuple:
    """Both lists side by side: the sampler averages their predictions (weighted by area and strength)."""
    return (_entries(conditioning_1, "conditioning_1") + _entries(conditioning_2, "conditioning_2"),)


def _first_entry(conditioning_from: Any, node_name: str) -> list[Any]:
    entries = _entries(conditioning_from, "conditioning_from")
    if len(entries) > 1:
        log.warning("%s: conditioning_from has %d entries; only the first is used", node_name, len(entries))
    return entries[0]


def _fit_tokens(tensor: Tensor, length: int) -> Tensor:
    """Cut or zero-pad the token axis of [B, T, C] to `length`."""
    if tensor.shape[1] >= length:
        return tensor[:, :length]
    padding = tensor.new_zeros(tensor.shape[0], length - tensor.shape[1], tensor.shape[2])
    return torch.cat([tensor, padding], dim=1)


@node(category="conditioning", outputs=["CONDITIONING"])
def ConditioningAverage(
    conditioning_to: Socket("CONDITIONING"),
    conditioning_from: Socket("CONDITIONING"),
    conditioning_to_strength: Float(1.0, min=0.0, max=1.0, step=0.01),
) -> tuple:
    """to * strength + from * (1 - strength), token by token; `from` is cut or zero-padded to `to`'s length."""
    cond_from, extras_from = _first_entry(conditioning_from, "ConditioningAverage")
    pooled_from = extras_from.get("pooled_output")
    averaged = []
    for cond_to, extras_to in _entries(conditioning_to, "conditioning_to"):
        if cond_from.shape[-1] != cond_to.shape[-1]:
            raise ValueError(f"conditioning_from: width {cond_from.shape[-1]} does not match conditioning_to's "
                             f"{cond_to.shape[-1]} (prompts of different text encoders)")
        mixed = cond_to * conditioning_to_strength + _fit_tokens(cond_from, cond_to.shape[1]).to(cond_to) * (
            1.0 - conditioning_to_strength)
        extras = dict(extras_to)
        pooled_to = extras_to.get("pooled_output")
        if pooled_from is not None and pooled_to is not None:
            extras["pooled_output"] = pooled_to * conditioning_to_strength + pooled_from * (
                1.0 - conditioning_to_strength)
        elif pooled_from is not None:
            extras["pooled_output"] = pooled_from
        averaged.append([mixed, extras])
    return (averaged,)


@node(category="conditioning", outputs=["CONDITIONING"])
def ConditioningConcat(conditioning_to: Socket("CONDITIONING"), conditioning_from: Socket("CONDITIONING")) -> tuple:
    """Append conditioning_from's tokens after each entry of conditioning_to (one longer prompt)."""
    cond_from, _ = _first_entry(conditioning_from, "ConditioningConcat")
    joined = []
    for cond_to, extras in _entries(conditioning_to, "conditioning_to"):
        if cond_from.shape[-1] != cond_to.shape[-1]:
            raise ValueError(f"conditioning_from: width {cond_from.shape[-1]} does not match conditioning_to's "
                             f"{cond_to.shape[-1]} (prompts of different text encoders)")
        joined.append([torch.cat([cond_to, cond_from.to(cond_to)], dim=1), dict(extras)])
    return (joined,)


@node(category="conditioning", outputs=["CONDITIONING"])
def ConditioningSetArea(
    conditioning: Socket("CONDITIONING"),
    width: Int(64, min=64, max=MAX_RESOLUTION, step=8),
    height: Int(64, min=64, max=MAX_RESOLUTION, step=8),
    x: Int(0, min=0, max=MAX_RESOLUTION, step=8),
    y: Int(0, min=0, max=MAX_RESOLUTION, step=8),
    strength: Float(1.0, min=0.0, max=10.0, step=0.01),
) -> tuple:
    """Apply the prompt only inside a rectangle given in image pixels."""
    area = (height // LATENT_SCALE, width // LATENT_SCALE, y // LATENT_SCALE, x // LATENT_SCALE)
    return _with_extras(conditioning, "conditioning", area=area, strength=strength, set_area_to_bounds=False)


@node(category="conditioning", outputs=["CONDITIONING"])
def ConditioningSetAreaPercentage(
    conditioning: Socket("CONDITIONING"),
    width: Float(1.0, min=0.0, max=1.0, step=0.01),
    height: Float(1.0, min=0.0, max=1.0, step=0.01),
    x: Float(0.0, min=0.0, max=1.0, step=0.01),
    y: Float(0.0, min=0.0, max=1.0, step=0.01),
    strength: Float(1.0, min=0.0, max=10.0, step=0.01),
) -> tuple:
    """Apply the prompt only inside a rectangle given as fractions of the image."""
    return _with_extras(conditioning, "conditioning", area=("percentage", height, width, y, x), strength=strength,
                        set_area_to_bounds=False)


@node(category="conditioning", outputs=["CONDITIONING"])
def ConditioningSetMask(
    conditioning: Socket("CONDITIONING"),
    mask: Socket("MASK"),
    strength: Float(1.0, min=0.0, max=10.0, step=0.01),
    set_cond_area: Combo(["default", "mask bounds"]),
) -> tuple:
    """Weight the prompt by a mask; "mask bounds" also runs it only on the box around the mask."""
    return _with_extras(conditioning, "conditioning", mask=mask_batch(mask, "mask"), mask_strength=strength,
                        set_area_to_bounds=set_cond_area != "default")


@node(category="advanced/conditioning", outputs=["CONDITIONING"])
def ConditioningSetTimestepRange(
    conditioning: Socket("CONDITIONING"),
    start: Float(0.0, min=0.0, max=1.0, step=0.001),
    end: Float(1.0, min=0.0, max=1.0, step=0.001),
) -> tuple:
    """Use the prompt only from `start` to `end` of the sampling run (0 = first step, 1 = last)."""
    return _with_extras(conditioning, "conditioning", start_percent=start, end_percent=end)


@node(category="advanced/conditioning", outputs=["CONDITIONING"])
def ConditioningZeroOut(conditioning: Socket("CONDITIONING")) -> tuple:
    """All-zero embeddings (and pooled vectors) of the same shapes: the "no prompt at all" input."""
    zeroed = []
    for cross_attn, extras in _entries(conditioning, "conditioning"):
        extras = dict(extras)
        if extras.get("pooled_output") is not None:
            extras["pooled_output"] = torch.zeros_like(extras["pooled_output"])
        zeroed.append([torch.zeros_like(cross_attn), extras])
    return (zeroed,)
