"""LoRA, LoHa and LoKr files -> weight deltas for our UNet and text encoder (model-formats 7).

A file names the module it adapts in one of several spellings: kohya/sd-scripts (`lora_unet_<path with
underscores>`, `lora_te_...`), diffusers/peft (`unet.<path>.lora_A.weight`), the older diffusers attention
processors (`...attn1.processor.to_q_lora.down.weight`) and LyCORIS (`hada_*`, `lokr_*`). Joining a path with
underscores is lossy, so names are never parsed back: every weight of the model gets all the spellings it can
have (LDM and diffusers paths, dots and underscores, with each prefix), and a file's module names are looked
up whole. Each match becomes a delta (a callable from the current weight to the change at strength 1), which
the MODEL/CLIP handles apply reversibly (nodes/values.py); nothing here touches a module's weights.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from diffusion.key_maps import unet_diffusers_key_map
from diffusion.legacy_pickle import load_pickle_state_dict
from diffusion.safetensors_io import CheckpointError
from diffusion.unet import UNetConfig

log = logging.getLogger(__name__)

# File-key suffix -> (the factor it holds). The longest suffix wins, so ".lora.down.weight" is not read as
# ".down.weight" of a module called "...lora".
_FACTOR_SUFFIXES = {
    ".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_mid.weight": "mid",
    ".lora_B.weight": "up", ".lora_A.weight": "down",
    ".lora.up.weight": "up", ".lora.down.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".up.weight": "up", ".down.weight": "down",  # old attention processors: `to_q_lora.up.weight`
    ".alpha": "alpha", ".dora_scale": "dora_scale",
    ".lora_magnitude_vector": "dora_scale", ".lora_magnitude_vector.weight": "dora_scale",  # peft's DoRA
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
}
_SUFFIXES_LONGEST_FIRST = sorted(_FACTOR_SUFFIXES, key=len, reverse=True)
# diffusers' saved adapter config (rank, alpha) lives in this safetensors metadata entry.
_PEFT_METADATA = "lora_adapter_metadata"

#: From the current weight (its device and dtype) to the change at strength 1, float32 (nodes.values.WeightDelta).
WeightDelta = Callable[[Tensor], Tensor]

# "diffusion_model." and "text_encoders.clip_?.transformer." are ComfyUI's generic spellings (the model's own
# state-dict keys, as its LoRA saver writes them); SD1 carries CLIP-L, SD2 OpenCLIP-H.
UNET_PREFIXES = ("lora_unet_", "unet.", "lycoris_", "diffusion_model.", "")
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "text_encoder.", "text_encoders.clip_l.transformer.",
                 "text_encoders.clip_h.transformer.", "")
_TEXT_FILE_PREFIXES = ("lora_te", "text_encoder", "text_model")


# --- deltas ---------------------------------------------------------------------------------------------------


def _tucker(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """[out, in, kh, kw] from a Tucker core [r, r, kh, kw] and factors left [r, out], right [r, in]."""
    return torch.einsum("pqhw,qi,po->oihw", core, right, left)


@dataclass(frozen=True)
class LoraDelta:
    """`up @ down · scale` (kohya, peft); with `mid`, the LoCon Tucker form whose kernel lives in `mid`."""

    up: Tensor
    down: Tensor
    scale: float
    mid: Tensor | None = None

    def __call__(self, weight: Tensor) -> Tensor:
        up, down = (t.to(weight.device, torch.float32) for t in (self.up, self.down))
        if self.mid is not None:
            mid = self.mid.to(weight.device, torch.float32)
            delta = torch.einsum("op,pqhw,qi->oihw", up.flatten(1), mid, down.flatten(1))
        else:
            delta = up.flatten(1) @ down.flatten(1)
        return _shaped(delta * self.scale, weight)


@dataclass(frozen=True)
class LohaDelta:
    """LyCORIS LoHa: the Hadamard product of two low-rank matrices (or two Tucker products)."""

    w1: tuple[Tensor, Tensor]  # (a [out, r], b [r, in·k·k]), or with t1: (a [r, out], b [r, in])
    w2: tuple[Tensor, Tensor]
    scale: float
    t1: Tensor | None = None
    t2: Tensor | None = None

    def __call__(self, weight: Tensor) -> Tensor:
        def factor(pair: tuple[Tensor, Tensor], core: Tensor | None) -> Tensor:
            a, b = (t.to(weight.device, torch.float32) for t in pair)
            if core is not None:
                return _tucker(core.to(weight.device, torch.float32), a, b)
            return a @ b.flatten(1)
        return _shaped(factor(self.w1, self.t1) * factor(self.w2, self.t2) * self.scale, weight)


@dataclass(frozen=True)
class LokrDelta:
    """LyCORIS LoKr: the Kronecker product of two factors, each whole or low-rank (w2 maybe Tucker)."""

    w1: Tensor | tuple[Tensor, Tensor]
    w2: Tensor | tuple[Tensor, Tensor]
    scale: float
    t2: Tensor | None = None

    def __call__(self, weight: Tensor) -> Tensor:
        def whole(part: Tensor | tuple[Tensor, Tensor], core: Tensor | None = None) -> Tensor:
            if isinstance(part, Tensor):
                return part.to(weight.device, torch.float32)
            a, b = (t.to(weight.device, torch.float32) for t in part)
            if core is not None:
                return _tucker(core.to(weight.device, torch.float32), a, b)
            return a @ b.flatten(1)
        w1, w2 = whole(self.w1), whole(self.w2, self.t2)
        if weight.ndim == 4:
            w1 = w1.reshape(*w1.shape[:2], 1, 1) if w1.ndim == 2 else w1
            if w2.ndim == 2:
                w2 = w2.reshape(w2.shape[0], -1, *weight.shape[2:])
        return _shaped(torch.kron(w1, w2) * self.scale, weight)


@dataclass(frozen=True)
class DoraDelta:
    """DoRA: W' = m ⊙ (W + Δ) / ‖W + Δ‖, the norm per output row (or per input column, by m's shape); the
    delta is W' − W, so a strength blends between the base and the fully adapted weight as ComfyUI does.
    The norm is that of W + Δ (the paper, LyCORIS and peft); ComfyUI's per-row case divides by the base W's
    row norms instead, so DoRA images differ from ComfyUI's slightly."""

    inner: LoraDelta | LohaDelta | LokrDelta
    magnitude: Tensor

    def __call__(self, weight: Tensor) -> Tensor:
        base = weight.float()
        adapted = base + self.inner(weight)
        magnitude = self.magnitude.to(weight.device, torch.float32)
        flat = adapted.flatten(1)
        if magnitude.shape[0] == weight.shape[0] and magnitude.numel() == weight.shape[0]:
            norm = flat.norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
        else:
            norm = adapted.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.ndim - 2))
        scaled = adapted * (magnitude.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps))
        return scaled - base


def _shaped(delta: Tensor, weight: Tensor) -> Tensor:
    if delta.numel() != weight.numel():
        raise ValueError(f"a LoRA delta of shape {list(delta.shape)} cannot patch a weight of {list(weight.shape)}")
    return delta.reshape(weight.shape)


# --- reading a file ------------------------------------------------------------------------------------------


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata); pickled `.pt`/`.ckpt`/`.bin` files only through the restricted
    unpickler."""
    path = Path(path)
    if path.suffix.lower() in (".safetensors", ".sft"):
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata() or {})
        except Exception as error:  # noqa: BLE001 - the library raises its own types for damaged files
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    return load_pickle_state_dict(path), {}


def group_by_module(tensors: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """File module name -> {factor: tensor}; plus the keys that are no LoRA factor at all."""
    groups: dict[str, dict[str, Tensor]] = {}
    others = []
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES_LONGEST_FIRST if key.endswith(s)), None)
        if suffix is None:
            others.append(key)
            continue
        module = _processor_module(key[: -len(suffix)])
        groups.setdefault(module, {})[_FACTOR_SUFFIXES[suffix]] = tensor
    return groups, others


def _processor_module(name: str) -> str:
    """`...attn1.processor.to_q_lora` (old diffusers attention processors) -> `...attn1.to_q`."""
    if ".processor." not in name or not name.endswith("_lora"):
        return name
    owner, _, projection = name.removesuffix("_lora").rpartition(".processor.")
    return f"{owner}.{projection}.0" if projection == "to_out" else f"{owner}.{projection}"


def _alpha_scale(factors: Mapping[str, Tensor], rank: int, default_alpha: float | None) -> float:
    if "alpha" in factors:
        return float(factors["alpha"]) / rank
    return default_alpha / rank if default_alpha is not None else 1.0


def delta_from_factors(factors: Mapping[str, Tensor], default_alpha: float | None = None) -> WeightDelta | None:
    """The delta a module's factors describe, or None when they are no complete LoRA/LoHa/LoKr."""
    if "up" in factors and "down" in factors:
        rank = factors["down"].shape[0]
        delta = LoraDelta(factors["up"], factors["down"], _alpha_scale(factors, rank, default_alpha),
                          factors.get("mid"))
    elif all(f"hada_w{i}_{p}" in factors for i in (1, 2) for p in "ab"):
        rank = factors["hada_w1_b"].shape[0]
        delta = LohaDelta((factors["hada_w1_a"], factors["hada_w1_b"]), (factors["hada_w2_a"], factors["hada_w2_b"]),
                          _alpha_scale(factors, rank, None), factors.get("hada_t1"), factors.get("hada_t2"))
    elif ("lokr_w1" in factors or "lokr_w1_a" in factors) and ("lokr_w2" in factors or "lokr_w2_a" in factors):
        w1 = factors.get("lokr_w1")
        w2 = factors.get("lokr_w2")
        low_rank = [name for name, whole in (("lokr_w2_b", w2), ("lokr_w1_b", w1)) if whole is None]
        # ComfyUI and LyCORIS scale by alpha / r only when a factor is low-rank (w2's rank first).
        scale = _alpha_scale(factors, factors[low_rank[0]].shape[0], None) if low_rank else 1.0
        delta = LokrDelta(w1 if w1 is not None else (factors["lokr_w1_a"], factors["lokr_w1_b"]),
                          w2 if w2 is not None else (factors["lokr_w2_a"], factors["lokr_w2_b"]),
                          scale, factors.get("lokr_t2"))
    else:
        return None
    if "dora_scale" in factors:
        return DoraDelta(delta, factors["dora_scale"])
    return delta


# --- matching module names -------------------------------------------------------------------------------------


def _spellings(path: str, prefixes: Iterable[str]) -> Iterator[str]:
    for prefix in prefixes:
        if prefix.endswith("_"):
            yield prefix + path.replace(".", "_")
        else:
            yield prefix + path


def unet_lora_names(config: UNetConfig) -> dict[str, str]:
    """Every spelling a LoRA file may use for a UNet weight -> our weight key (`...weight`)."""
    names: dict[str, str] = {}
    for diffusers_key, ours in unet_diffusers_key_map(config).items():
        if not ours.endswith(".weight"):
            continue
        for path in (ours.removesuffix(".weight"), diffusers_key.removesuffix(".weight")):
            for spelling in _spellings(path, UNET_PREFIXES):
                names.setdefault(spelling, ours)
    return names


def text_lora_names(weight_keys: Iterable[str]) -> dict[str, str]:
    """The same for the text encoder, whose keys are `transformer.<transformers path>` / `text_projection`."""
    names: dict[str, str] = {}
    for ours in weight_keys:
        if not ours.endswith(".weight"):
            continue
        path = ours.removesuffix(".weight").removeprefix("transformer.")
        for candidate in (f"text_model.{path}", path):
            for spelling in _spellings(candidate, TEXT_PREFIXES):
                names.setdefault(spelling, ours)
    return names


@dataclass(frozen=True)
class LoraPatches:
    """What one file adapts: our weight key -> delta, per model, and the module names that matched nothing."""

    source: str
    unet: dict[str, WeightDelta] = field(default_factory=dict)
    text: dict[str, WeightDelta] = field(default_factory=dict)
    unmatched: tuple[str, ...] = ()
    incomplete: tuple[str, ...] = ()  # module names whose factors form no known delta
    mismatched: tuple[str, ...] = ()  # module names whose delta has another shape than the weight
    ignored: tuple[str, ...] = ()  # file keys of no LoRA format we know (bundled embeddings, ...)

    @property
    def matched(self) -> int:
        return len(self.unet) + len(self.text)

    def summary(self) -> str:
        problems = [f"{len(names)} {what}" for names, what in ((self.incomplete, "incomplete"),
                                                              (self.mismatched, "of another shape (skipped)"),
                                                              (self.ignored, "keys of no known LoRA format"))
                    if names]
        return (f"{Path(self.source).name}: {len(self.unet)} UNet and {len(self.text)} text encoder weights "
                f"patched, {len(self.unmatched)} modules matched nothing" + "".join(f", {p}" for p in problems))


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    """diffusers' `lora_adapter_metadata`: `{"unet.lora_alpha": 8, "text_encoder.lora_alpha": 4, ...}`."""
    raw = metadata.get(_PEFT_METADATA)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        log.warning("ignoring unreadable %s metadata", _PEFT_METADATA)
        return {}
    alphas = {}
    for component in ("unet", "text_encoder"):
        alpha = config.get(f"{component}.lora_alpha", config.get("lora_alpha"))
        if isinstance(alpha, (int, float)):
            alphas[component] = float(alpha)
    return alphas


def _fits(delta: WeightDelta, shape: tuple[int, ...] | None) -> bool:
    """Whether the delta can patch a weight of `shape`, worked out on the meta device (no arithmetic)."""
    if shape is None:
        return True
    try:
        delta(torch.empty(shape, device="meta"))
    except (ValueError, RuntimeError):
        return False
    return True


def lora_patches(
    tensors: Mapping[str, Tensor],
    *,
    unet_names: Mapping[str, str],
    text_names: Mapping[str, str] | None,
    metadata: Mapping[str, str] | None = None,
    source: str = "",
    weight_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> LoraPatches:
    """Match a LoRA file's tensors against the model's weight names (unet_lora_names, text_lora_names).

    text_names None: the text encoder is not being patched, so its modules are left out of the counts.
    weight_shapes (our key -> shape, UNet keys and `text:`-prefixed text keys): a delta of another shape is
    skipped with a warning, as ComfyUI does, instead of failing later in the middle of sampling.
    """
    groups, others = group_by_module(tensors)
    if text_names is None:
        groups = {name: factors for name, factors in groups.items() if not name.startswith(_TEXT_FILE_PREFIXES)}
        text_names = {}
    alphas = _peft_alphas(metadata or {})
    unet: dict[str, WeightDelta] = {}
    text: dict[str, WeightDelta] = {}
    unmatched, incomplete, mismatched = [], [], []
    for module, factors in groups.items():
        is_text = module in text_names and module not in unet_names
        target = text_names.get(module) if is_text else unet_names.get(module)
        if target is None:
            unmatched.append(module)
            continue
        peft_style = module.startswith(("unet.", "text_encoder."))
        default_alpha = alphas.get("text_encoder" if is_text else "unet") if peft_style else None
        delta = delta_from_factors(factors, default_alpha)
        if delta is None:
            incomplete.append(module)
            continue
        if not _fits(delta, (weight_shapes or {}).get(f"text:{target}" if is_text else target)):
            mismatched.append(module)
            continue
        (text if is_text else unet)[target] = delta
    result = LoraPatches(source, unet, text, tuple(sorted(unmatched)), tuple(sorted(incomplete)),
                         tuple(sorted(mismatched)), tuple(sorted(others)))
    if result.matched == 0:
        log.warning("LoRA %s matched no weight of this model (%d modules in the file)", source, len(groups))
    elif unmatched or incomplete or mismatched or others:
        log.warning("LoRA %s", result.summary())
    return result


def load_lora(
    path: str | os.PathLike, *, unet_names: Mapping[str, str], text_names: Mapping[str, str] | None,
    weight_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> LoraPatches:
    tensors, metadata = read_lora_file(path)
    return lora_patches(tensors, unet_names=unet_names, text_names=text_names, metadata=metadata, source=str(path),
                        weight_shapes=weight_shapes)


__all__ = [
    "DoraDelta", "LohaDelta", "LokrDelta", "LoraDelta", "LoraPatches", "delta_from_factors", "group_by_module",
    "load_lora", "lora_patches", "read_lora_file", "text_lora_names", "unet_lora_names",
]
