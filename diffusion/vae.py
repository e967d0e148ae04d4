"""The LDM ``AutoencoderKL`` (SD1.x, SD2.x, SDXL; SD3 with 16 latent channels and no quant convs).

Module attribute names mirror the single-file keys (``encoder.down.0.block.0``, ``decoder.up.3.upsample``,
``mid.attn_1``, ``quant_conv``), so ``first_stage_model.*`` with the prefix stripped is exactly this module's
``state_dict``. VAE GroupNorms use eps 1e-6; the mid attention is single-head over all ``H*W`` positions with
its ``q, k, v, proj_out`` stored as 1x1 convolutions, as in the checkpoints (model-formats.md 2.3, 5).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.acceleration import memory_format_of, to_channels_last
from diffusion.attention import attention
from diffusion.latent_format import LatentFormat

log = logging.getLogger(__name__)

# torch >= 2.5 names the out-of-memory error at the top level; torch.cuda.OutOfMemoryError is the same class.
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and latent normalisation of one VAE; the defaults are the SD1.x/SD2.x VAE."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = True
    num_groups: int = 32
    scale_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        for width in self.level_widths:
            if width % self.num_groups:
                raise ValueError(f"VAE width {width} is not divisible by num_groups={self.num_groups}")

    @property
    def level_widths(self) -> tuple[int, ...]:
        return tuple(self.ch * mult for mult in self.ch_mult)

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(config: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.num_groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, config: VAEConfig, channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(config, channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = _norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if channels != out_channels:
            self.nin_shortcut: nn.Module = nn.Conv2d(channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over every position of the lowest-resolution feature map."""

    def __init__(self, config: VAEConfig, channels: int):
        super().__init__()
        self.norm = _norm(config, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        # Contiguous [B, HW, C]: with a transposed (strided) last dimension torch's CPU attention leaves its
        # fused kernel and builds the whole HW x HW score matrix (measured: 3-5x slower; 4 GB at 1920x1088).
        q, k, v = (conv(h).flatten(2).transpose(1, 2).contiguous() for conv in (self.q, self.k, self.v))
        # the input's layout again, so the decoder's convs do not inherit channels-last strides (unet.py says why)
        h = attention(q, k, v, heads=1).transpose(1, 2).unflatten(2, (height, width))
        h = h.contiguous(memory_format=memory_format_of(x))
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # LDM pads only the right and bottom edge, then convolves without padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, config: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(config, channels, channels)
        self.attn_1 = AttnBlock(config, channels)
        self.block_2 = ResnetBlock(config, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = config.level_widths
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels = config.ch
        for level, width in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock(config, channels, width))
                channels = width
            if level != len(widths) - 1:
                stage.downsample = Downsample(channels)
            self.down.append(stage)
        self.mid = MidBlock(config, channels)
        self.norm_out = _norm(config, channels)
        self.conv_out = nn.Conv2d(channels, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = config.level_widths
        channels = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, channels, 3, padding=1)
        self.mid = MidBlock(config, channels)
        stages: list[nn.Module] = []
        # LDM numbers `up` from the highest resolution (up.0) although it runs them lowest resolution first.
        for level in reversed(range(len(widths))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(config, channels, widths[level]))
                channels = widths[level]
            if level != 0:
                stage.upsample = Upsample(channels)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(config, channels)
        self.conv_out = nn.Conv2d(channels, config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Pixels ``[B,3,H,W]`` in [-1, 1] <-> raw latents ``[B,z,H/f,W/f]`` (``f`` = 8 with four levels)."""

    def __init__(
        self,
        config: VAEConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.config = config
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.encoder = Encoder(config)
            self.decoder = Decoder(config)
            if config.use_quant_conv:
                self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
                self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)
        if dtype is not None:
            self.to(dtype)
        # fp16 activations of some VAEs (SDXL's) overflow to inf/NaN; such a decode is redone in float32.
        self.upcast_on_overflow = True
        # cuDNN's fast layout for half-precision convolutions; None: on CUDA only (slower on CPU).
        self.channels_last: bool | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance (clamped to [-30, 20]) of the diagonal Gaussian posterior, in ``pixels``' dtype."""
        moments = self.encoder(pixels.to(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean.to(pixels.dtype), logvar.clamp(-30.0, 20.0).to(pixels.dtype)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The posterior mean: the raw (unscaled) latent, as ComfyUI's VAEEncode produces."""
        return self.encode_distribution(pixels)[0]

    def decode(self, latent: torch.Tensor, *, tiled_fallback: bool = False) -> torch.Tensor:
        """Raw latent -> pixels in about [-1, 1] (unclamped), in ``latent``'s dtype.

        With ``tiled_fallback`` an out-of-memory error retries with :meth:`decode_tiled`, at smaller tiles
        each time (ComfyUI's VAEDecode likewise falls back to tiles when a full decode does not fit).
        """
        try:
            return self._decode_full(latent)
        except _OUT_OF_MEMORY:
            if not tiled_fallback:
                raise
        # A tile as large as the latent would repeat the full decode that just failed.
        tiles = [tile for tile in (64, 32) if tile < max(latent.shape[-2:])] + [16]
        for tile in tiles[:-1]:
            try:
                return self._decode_tiled_after_oom(latent, tile)
            except _OUT_OF_MEMORY:
                pass
        return self._decode_tiled_after_oom(latent, tiles[-1])

    def _decode_tiled_after_oom(self, latent: torch.Tensor, tile: int) -> torch.Tensor:
        log.warning("VAE decode ran out of memory; retrying tiled with %d-latent tiles", tile)
        if latent.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.decode_tiled(latent, tile=tile, overlap=tile // 8)

    def _decode_full(self, latent: torch.Tensor) -> torch.Tensor:
        self._choose_layout(latent.device)
        h = latent.to(self.dtype)
        if self.config.use_quant_conv:
            h = self.post_quant_conv(h)
        pixels = self.decoder(h)
        # One host sync per decode (not per step): the price of knowing the image is usable.
        if self.dtype == torch.float16 and self.upcast_on_overflow and not bool(torch.isfinite(pixels).all()):
            log.warning("fp16 VAE decode overflowed (inf/NaN); decoding again in float32")
            pixels = self._decode_in_float32(latent)
        return pixels.to(latent.dtype)

    def _decode_in_float32(self, latent: torch.Tensor) -> torch.Tensor:
        """The decode with float32 copies of the decoder's weights, the module itself left in fp16."""
        def float32_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            weights = {name: tensor.float() for name, tensor in module.named_parameters()}
            return torch.func.functional_call(module, weights, (x,))
        h = latent.float()
        if self.config.use_quant_conv:
            h = float32_call(self.post_quant_conv, h)
        return float32_call(self.decoder, h)

    def _choose_layout(self, device: torch.device) -> None:
        wanted = self.channels_last if self.channels_last is not None else device.type == "cuda"
        weight = self.decoder.conv_in.weight
        if wanted and not weight.is_contiguous(memory_format=torch.channels_last):
            to_channels_last(self)

    def decode_tiled(self, latent: torch.Tensor, tile: int = 64, overlap: int = 8) -> torch.Tensor:
        """Decodes overlapping ``tile``-sized latent tiles and blends them with linear ramps.

        Each tile's pixels are weighted by a mask that rises linearly across the ``overlap`` on every edge
        shared with a neighbour; the weighted sum is divided by the summed masks. Close to, never equal to,
        a full decode: GroupNorm statistics and the mid attention see one tile only.
        """
        if not 0 <= overlap < tile:
            raise ValueError(f"decode_tiled needs 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
        factor = self.config.downscale_factor
        blended = blend_tiles(self._decode_full, latent, tuple(latent.shape[-2:]), tile, overlap, 1, factor,
                              self.config.out_channels)
        return blended.to(latent.dtype)

    @property
    def latent_format(self) -> LatentFormat:
        """How this VAE's raw latents map into the denoiser's space (and back)."""
        return LatentFormat(self.config.scale_factor, self.config.shift_factor)


def blend_tiles(run: Callable[[torch.Tensor], torch.Tensor], source: torch.Tensor, grid: tuple[int, int], tile: int,
                overlap: int,
                source_scale: int, result_scale: int, result_channels: int,
                on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run `run` on overlapping tiles of `source` and blend the results with linear ramps over the overlaps.

    Tiles are laid out on the latent grid (`grid` = latent height, width; `tile` and `overlap` in latent
    pixels); one latent pixel is `source_scale` pixels of `source` and `result_scale` of the result (8 and 1
    to encode, 1 and 8 to decode). `on_tile(done, total)`, if given, is called after each tile (progress)."""
    height, width = grid
    batch, device = source.shape[0], source.device
    blended = torch.zeros(batch, result_channels, height * result_scale, width * result_scale, device=device)
    weight = torch.zeros(height * result_scale, width * result_scale, device=device)
    tops, lefts = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    for row, top in enumerate(tops):
        rows = _ramp(top, min(tile, height), height, overlap, result_scale, device)
        for column, left in enumerate(lefts):
            cols = _ramp(left, min(tile, width), width, overlap, result_scale, device)
            piece = source[..., top * source_scale : (top + tile) * source_scale,
                           left * source_scale : (left + tile) * source_scale]
            mask = rows[:, None] * cols[None, :]
            region = (slice(top * result_scale, top * result_scale + mask.shape[0]),
                      slice(left * result_scale, left * result_scale + mask.shape[1]))
            blended[(..., *region)] += run(piece).float() * mask
            weight[region] += mask
            if on_tile is not None:
                on_tile(row * len(lefts) + column + 1, len(tops) * len(lefts))
    return blended / weight


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering ``[0, size)``; the last tile is pulled back to end exactly at ``size``."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(start: int, length: int, size: int, overlap: int, factor: int, device: torch.device) -> torch.Tensor:
    """1-D blend weights (in pixels) of a tile: linear ramps over the overlap on edges with a neighbour."""
    weights = torch.ones(length * factor, device=device)
    ramp_width = min(overlap * factor, length * factor)
    if ramp_width == 0:
        return weights
    rising = torch.arange(1, ramp_width + 1, device=device, dtype=torch.float32) / (ramp_width + 1)
    if start > 0:
        weights[:ramp_width] = rising
    if start + length < size:
        weights[-ramp_width:] = torch.minimum(weights[-ramp_width:], rising.flip(0))
    return weights


# Real VAEs (model-formats.md 5) and the tiny test model (10.1: four levels of 32 channels keep the 8x factor).
SD_VAE = VAEConfig()
SDXL_VAE = VAEConfig(scale_factor=0.13025)
SD3_VAE = VAEConfig(z_channels=16, use_quant_conv=False, scale_factor=1.5305, shift_factor=0.0609)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1))
TINY_SD3_VAE = VAEConfig(
    ch=32, ch_mult=(1, 1, 1, 1), z_channels=16, use_quant_conv=False, scale_factor=1.5305, shift_factor=0.0609
)
