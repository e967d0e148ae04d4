"""Classifier-free guidance over ComfyUI CONDITIONING: areas, masks, strengths, timestep ranges, batching.

A CONDITIONING value is a list of `[cross_attn [B, T, C], extras]` pairs (comfyui-interface.md 3). Each
entry predicts D over its area; the predictions of one list are averaged with weights area-mask x
strength (area edges feathered over up to 8 latent pixels where they do not touch the border), and regions
no entry covers predict 0, as ComfyUI does. Entries of both lists whose inputs share a shape run through
the model in one batch; prompts of different token lengths are repeated to their least common multiple
(model-formats.md 6.6), which leaves cross-attention unchanged.

Models that take extra input channels (inpainting UNets: mask and masked-image latent) get a fixed `concat`
tensor appended to every call's input after the c_in scaling, cut to each entry's area like x, for cond and
uncond alike (diffusers' StableDiffusionInpaintPipeline and ComfyUI's concat conditioning both do this).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .model_sampling import ModelSampling

# ComfyUI only batches token lengths whose least common multiple is at most 4x the shorter one.
MAX_CONTEXT_REPEAT = 4
# Area edges fade in over at most this many latent pixels (ComfyUI's area feathering).
AREA_FEATHER = 8


class ApplyModel(Protocol):
    """The raw network: `apply_model(c_in * x, timestep [B], context=[B, T, C], y=[B, P] | None) -> output`."""

    def __call__(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor: ...


# Builds the model's `y` input (SDXL's label embedding) from a conditioning entry's extras and the latent
# shape; the model family supplies it. Entries that carry a ready `y` tensor in their extras bypass it.
EncodeY = Callable[[Mapping[str, Any], Sequence[int]], "Tensor | None"]


@dataclass(frozen=True)
class Condition:
    """One CONDITIONING entry with ComfyUI's extras spelled out."""

    cross_attn: Tensor
    extras: Mapping[str, Any]
    area: tuple | None = None  # (h, w, y, x) in latent pixels, or ("percentage", h, w, y, x) as fractions
    strength: float = 1.0
    mask: Tensor | None = None
    mask_strength: float = 1.0
    set_area_to_bounds: bool = False
    start_percent: float = 0.0
    end_percent: float = 1.0

    @classmethod
    def from_comfy(cls, entry: Sequence[Any]) -> Condition:
        if len(entry) != 2 or not isinstance(entry[0], Tensor) or not isinstance(entry[1], Mapping):
            raise ValueError("a CONDITIONING entry must be [cross_attn tensor, extras dict]")
        cross_attn, extras = entry
        if cross_attn.dim() != 3:
            raise ValueError(f"CONDITIONING cross_attn must be [B, T, C], got shape {tuple(cross_attn.shape)}")
        return cls(
            cross_attn=cross_attn,
            extras=extras,
            area=tuple(extras["area"]) if extras.get("area") is not None else None,
            strength=float(extras.get("strength", 1.0)),
            mask=extras.get("mask"),
            mask_strength=float(extras.get("mask_strength", 1.0)),
            set_area_to_bounds=bool(extras.get("set_area_to_bounds", False)),
            start_percent=float(extras.get("start_percent", 0.0)),
            end_percent=float(extras.get("end_percent", 1.0)),
        )


@dataclass(frozen=True)
class _Prepared:
    """A condition resolved against one latent: pixel area, latent-size mask, sigma range, model inputs."""

    cross_attn: Tensor
    y: Tensor | None
    area: tuple[int, int, int, int] | None
    weight: Tensor  # [1 or B, C, h, w]: mask x strength with feathering, already cropped to the area
    sigma_start: float
    sigma_end: float
    whole: bool = False  # covers the latent with one positive weight: alone, its D needs no averaging


def _resize_mask(mask: Tensor, height: int, width: int) -> Tensor:
    mask = mask.float()
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() == 4:
        mask = mask.reshape(-1, mask.shape[-2], mask.shape[-1])
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False).squeeze(1)
    return mask


def _mask_bounds(mask: Tensor) -> tuple[int, int, int, int]:
    """(h, w, y, x) of the box around the mask's nonzero pixels over the batch; an empty mask gets 8x8 at 0."""
    nonzero = torch.nonzero(mask.abs().amax(dim=0))
    if nonzero.numel() == 0:
        return (8, 8, 0, 0)
    top, left = nonzero.min(dim=0).values.tolist()
    bottom, right = nonzero.max(dim=0).values.tolist()
    return (bottom - top + 1, right - left + 1, top, left)


def _resolve_area(cond: Condition, mask: Tensor | None, height: int, width: int) -> tuple[int, int, int, int] | None:
    if cond.set_area_to_bounds and mask is not None:
        # ComfyUI grows the box to at least 8 latent pixels (ConditioningSetArea's 64-pixel minimum).
        h, w, y, x = _mask_bounds(mask)
        return (max(8, h), max(8, w), y, x)
    if cond.area is None:
        return None
    if cond.area[0] == "percentage":
        _, h, w, y, x = cond.area
        return (max(1, round(h * height)), max(1, round(w * width)), round(y * height), round(x * width))
    h, w, y, x = (int(v) for v in cond.area)
    return (h, w, y, x)


def _edge_ramp(size: int, start: int, full: int) -> Tensor:
    """Per-row weights that fade an area in from each edge not lying on the latent's border.

    ComfyUI fades over min(8, size // 4) rows with weights 1/n, 2/n, ..., 1, so areas under 4 latent
    pixels are not faded at all.
    """
    ramp = torch.ones(size)
    n = min(AREA_FEATHER, size // 4)
    if n == 0:
        return ramp
    fade = torch.arange(1, n + 1, dtype=torch.float32) / n
    if start != 0:
        ramp[:n] *= fade
    if start + size < full:
        ramp[size - n :] *= fade.flip(0)
    return ramp


def _prepare(cond: Condition, latent_shape: Sequence[int], ms: ModelSampling, encode_y: EncodeY | None) -> _Prepared:
    _, channels, height, width = latent_shape
    mask = _resize_mask(cond.mask, height, width) * cond.mask_strength if cond.mask is not None else None
    area = _resolve_area(cond, mask, height, width)
    h, w, y, x = area if area is not None else (height, width, 0, 0)
    h, w = max(0, min(h, height - y)), max(0, min(w, width - x))
    if mask is not None:
        weight = mask[:, y : y + h, x : x + w].unsqueeze(1).expand(-1, channels, -1, -1) * cond.strength
    else:
        weight = torch.full((1, channels, h, w), cond.strength)
        if area is not None:
            ramp = _edge_ramp(h, y, height)[:, None] * _edge_ramp(w, x, width)[None, :]
            weight = weight * ramp
    y_input = cond.extras.get("y")
    if y_input is None and encode_y is not None:
        y_input = encode_y(cond.extras, latent_shape)
    return _Prepared(
        cross_attn=cond.cross_attn,
        y=y_input,
        area=(h, w, y, x),
        weight=weight,
        sigma_start=ms.percent_to_sigma(cond.start_percent),
        sigma_end=ms.percent_to_sigma(cond.end_percent),
        whole=mask is None and area is None and cond.strength > 0.0,
    )


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: half-precision sums of weighted predictions lose whole ulps, and fp16's smallest
    normal (6e-5) is no longer a negligible floor next to feathered weights of 1/64."""
    return torch.promote_types(dtype, torch.float32)


def repeat_to_batch(tensor: Tensor, batch: int) -> Tensor:
    """Tile or cut the leading axis to `batch` (a batch-1 prompt serves every latent in the batch)."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] > batch:
        return tensor[:batch]
    reps = math.ceil(batch / tensor.shape[0])
    return tensor.repeat(reps, *([1] * (tensor.dim() - 1)))[:batch]


@dataclass(frozen=True)
class _Chunk:
    slot: int  # which list's output (0 = positive, 1 = negative)
    area: tuple[int, int, int, int]
    x: Tensor
    weight: Tensor
    cross_attn: Tensor
    y: Tensor | None
    whole: bool = False
    concat: Tensor | None = None


def _compatible(a: _Chunk, b: _Chunk) -> bool:
    if a.x.shape != b.x.shape or (a.y is None) != (b.y is None):
        return False
    if a.y is not None and b.y is not None and a.y.shape[1:] != b.y.shape[1:]:
        return False
    ta, tb = a.cross_attn.shape[1], b.cross_attn.shape[1]
    if a.cross_attn.shape[2] != b.cross_attn.shape[2]:
        return False
    return math.lcm(ta, tb) // min(ta, tb) <= MAX_CONTEXT_REPEAT


def _concat_context(contexts: list[Tensor]) -> Tensor:
    tokens = math.lcm(*(c.shape[1] for c in contexts))
    return torch.cat([c.repeat(1, tokens // c.shape[1], 1) for c in contexts], dim=0)


class CondBatcher:
    """Evaluates D for several CONDITIONING lists at once, batching whatever shares input shapes."""

    def __init__(
        self,
        apply_model: ApplyModel,
        model_sampling: ModelSampling,
        cond_lists: Sequence[Sequence[Condition]],
        latent_shape: Sequence[int],
        encode_y: EncodeY | None = None,
        concat: Tensor | None = None,
    ) -> None:
        """`concat` [1 or B, C', h, w], in the model's latent space, joins x's channels in every model call."""
        if concat is not None and tuple(concat.shape[-2:]) != tuple(latent_shape[-2:]):
            raise ValueError(f"concat conditioning is {tuple(concat.shape[-2:])} latent pixels but the latent is "
                             f"{tuple(latent_shape[-2:])}")
        self.concat = concat
        self._concat_moved: dict[tuple, Tensor] = {}
        self.apply_model = apply_model
        self.ms = model_sampling
        self.prepared = [[_prepare(c, latent_shape, model_sampling, encode_y) for c in conds] for conds in cond_lists]
        self._moved: dict[tuple, _Prepared] = {}
        self._contexts: dict[tuple[int, ...], Tensor] = {}

    def _on_device(self, cond: _Prepared, like: Tensor) -> _Prepared:
        """The condition's tensors on the sampling device and dtype, moved once per run, not per step."""
        key = (id(cond), like.device, like.dtype, like.shape[0])
        moved = self._moved.get(key)
        if moved is None:
            batch = like.shape[0]

            def move(tensor: Tensor | None, dtype: torch.dtype = like.dtype) -> Tensor | None:
                return None if tensor is None else repeat_to_batch(tensor, batch).to(like.device, dtype)

            weight = move(cond.weight, _accumulation_dtype(like.dtype))
            moved = replace(cond, cross_attn=move(cond.cross_attn), y=move(cond.y), weight=weight)
            self._moved[key] = moved
        return moved

    def _concat_on_device(self, like: Tensor) -> Tensor | None:
        if self.concat is None:
            return None
        key = (like.device, like.dtype, like.shape[0])
        moved = self._concat_moved.get(key)
        if moved is None:
            moved = self._concat_moved[key] = repeat_to_batch(self.concat, like.shape[0]).to(like.device, like.dtype)
        return moved

    def _chunks(self, x: Tensor, sigma: float, slots: Sequence[int]) -> list[_Chunk]:
        chunks = []
        concat = self._concat_on_device(x)
        for slot in slots:
            for cond in self.prepared[slot]:
                # ComfyUI's timestep ranges: inactive above start's sigma or below end's sigma.
                if sigma > cond.sigma_start or sigma < cond.sigma_end:
                    continue
                h, w, y, x0 = cond.area
                region = x[:, :, y : y + h, x0 : x0 + w]
                moved = self._on_device(cond, x)
                concat_region = concat[:, :, y : y + h, x0 : x0 + w] if concat is not None else None
                chunks.append(_Chunk(slot, cond.area, region, moved.weight, moved.cross_attn, moved.y, cond.whole,
                                     concat_region))
        return chunks

    def _run(self, group: list[_Chunk], sigma: float) -> list[Tensor]:
        x_in = torch.cat([c.x for c in group], dim=0)
        # The same conditions batch together at every step: build their joint context once per run.
        key = tuple(id(c.cross_attn) for c in group)
        context = self._contexts.get(key)
        if context is None:
            context = self._contexts[key] = _concat_context([c.cross_attn for c in group])
        y_input = torch.cat([c.y for c in group], dim=0) if group[0].y is not None else None
        timestep = torch.full((x_in.shape[0],), self.ms.timestep(sigma), device=x_in.device, dtype=torch.float32)
        model_input = x_in * self.ms.c_in(sigma)
        if group[0].concat is not None:
            model_input = torch.cat([model_input, torch.cat([c.concat for c in group], dim=0)], dim=1)
        output = self.apply_model(model_input, timestep, context=context, y=y_input)
        denoised = self.ms.calculate_denoised(sigma, output, x_in)
        return list(denoised.split([c.x.shape[0] for c in group], dim=0))

    def __call__(self, x: Tensor, sigma: float, slots: Sequence[int]) -> list[Tensor]:
        """The weighted D of each requested list, in the order of `slots`."""
        pending = self._chunks(x, sigma, slots)
        per_slot = {slot: sum(c.slot == slot for c in pending) for slot in slots}
        results: dict[int, Tensor] = {}
        totals: dict[int, Tensor] = {}
        counts: dict[int, Tensor] = {}
        while pending:
            group = [c for c in pending if _compatible(pending[0], c)]
            pending = [c for c in pending if not any(c is g for g in group)]
            for chunk, denoised in zip(group, self._run(group, sigma)):
                if chunk.whole and per_slot[chunk.slot] == 1:
                    # The weighted average of one uniformly weighted prediction is that prediction.
                    results[chunk.slot] = denoised
                    continue
                if chunk.slot not in totals:
                    dtype = chunk.weight.dtype
                    totals[chunk.slot] = torch.zeros_like(x, dtype=dtype)
                    # A tiny floor instead of 0 makes uncovered pixels come out 0, not NaN (ComfyUI: 1e-37).
                    counts[chunk.slot] = torch.full_like(x, torch.finfo(dtype).tiny, dtype=dtype)
                h, w, y, x0 = chunk.area
                totals[chunk.slot][:, :, y : y + h, x0 : x0 + w] += denoised.to(chunk.weight.dtype) * chunk.weight
                counts[chunk.slot][:, :, y : y + h, x0 : x0 + w] += chunk.weight
        for slot in slots:
            if slot not in results:
                results[slot] = (totals[slot] / counts[slot]).to(x.dtype) if slot in totals else torch.zeros_like(x)
        return [results[slot] for slot in slots]


def rescale_guidance(x: Tensor, sigma: float, guided: Tensor, cond: Tensor, multiplier: float) -> Tensor:
    """Lin et al. 2024, sec. 3.4, as ComfyUI's RescaleCFG applies it: in v-space, scale the guided
    prediction's per-sample std (over C, H, W; unbiased) to the conditional one's, then mix."""
    if multiplier == 0.0:
        return guided
    scale = math.sqrt(sigma * sigma + 1.0)

    def to_v(denoised: Tensor) -> Tensor:
        return (x / (sigma * sigma + 1.0) - denoised) * (scale / sigma)

    v_guided, v_cond = to_v(guided), to_v(cond)
    dims = tuple(range(1, x.dim()))
    ratio = v_cond.std(dim=dims, keepdim=True) / v_guided.std(dim=dims, keepdim=True)
    v_final = v_guided * (multiplier * ratio + (1.0 - multiplier))
    return x / (sigma * sigma + 1.0) - v_final * (sigma / scale)


class CFGDenoiser:
    """D = D_uncond + cfg * (D_cond - D_uncond) (Ho & Salimans 2022), both from one batched model call.

    At cfg == 1 the uncond pass is skipped (8.7); `denoise_with_uncond`, which CFG++ samplers call, always
    evaluates it.
    """

    def __init__(
        self,
        batcher: CondBatcher,
        cfg: float,
        rescale: float = 0.0,
    ) -> None:
        self.batcher = batcher
        self.cfg = cfg
        self.rescale = rescale

    def _guide(self, x: Tensor, sigma: float, cond: Tensor, uncond: Tensor) -> Tensor:
        guided = uncond + (cond - uncond) * self.cfg
        return rescale_guidance(x, sigma, guided, cond, self.rescale)

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        # At cfg == 1 the guided prediction is the conditional one, and rescaling it changes nothing.
        if math.isclose(self.cfg, 1.0):
            return self.batcher(x, sigma, [0])[0]
        cond, uncond = self.batcher(x, sigma, [0, 1])
        return self._guide(x, sigma, cond, uncond)

    def denoise_with_uncond(self, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        cond, uncond = self.batcher(x, sigma, [0, 1])
        return self._guide(x, sigma, cond, uncond), uncond
