"""The LDM ``openaimodel`` UNet behind SD1.x, SD2.x and SDXL.

Module attribute names mirror the single-file checkpoint keys (``input_blocks``, ``middle_block``,
``output_blocks``, ``time_embed``, ``label_emb``, ``out``), so a checkpoint's ``model.diffusion_model.*`` keys
with the prefix stripped are exactly this module's ``state_dict`` keys. diffusers folders are renamed by
``diffusion.key_maps``. Slots that held dropout in the LDM training code are kept as ``nn.Identity`` so that
the numbered keys after them (``out_layers.3``, ``ff.net.2``) line up.

Numerics follow the reference (model-formats.md 2.1): resnet GroupNorm eps 1e-5, the spatial transformer's
outer GroupNorm eps 1e-6, LayerNorm eps 1e-5, GEGLU with the value first and the gate second, and a sinusoidal
timestep embedding in ``[cos, sin]`` order with max period 10000.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.acceleration import AccelerationOptions, BlockStreamer, StepAccelerator, memory_format_of
from diffusion.attention import attention, share_one_weight, stacked_weight

# SDXL's label_emb input is the pooled text vector followed by six (base) or five (refiner) size/crop/score
# numbers, each embedded sinusoidally at this width (diffusers `addition_time_embed_dim`).
SDXL_ADM_TIME_EMBED_DIM = 256


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of one UNet; the defaults are SD1.x."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; 0 = no attention at that level
    transformer_depth_middle: int = 1  # 0 = middle block of two resnets without attention
    num_heads: int | None = 8  # exactly one of num_heads / head_width is set
    head_width: int | None = None  # SD2 / SDXL: 64-wide heads
    context_dim: int = 768
    use_linear_proj: bool = False  # SD2 / SDXL linear proj_in/proj_out; SD1 1x1 conv
    adm_in_channels: int | None = None  # label_emb in-features (SDXL 2816 / 2560); None = no label_emb
    num_groups: int = 32
    upcast_attention: bool = False  # SD2.1 768-v computes attention in fp32

    def __post_init__(self) -> None:
        if (self.num_heads is None) == (self.head_width is None):
            raise ValueError(
                f"UNetConfig needs exactly one of num_heads / head_width, got num_heads={self.num_heads}, "
                f"head_width={self.head_width}"
            )
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"UNetConfig.transformer_depth has {len(self.transformer_depth)} levels, channel_mult has "
                f"{len(self.channel_mult)}"
            )
        for width in self.level_widths:
            if width % self.num_groups:
                raise ValueError(f"UNet width {width} is not divisible by num_groups={self.num_groups}")

    @property
    def level_widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * mult for mult in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def heads_for(self, channels: int) -> int:
        """Attention heads of a transformer ``channels`` wide (SD1: fixed count; SD2/SDXL: fixed width)."""
        if self.num_heads is not None:
            heads = self.num_heads
        else:
            heads = channels // self.head_width
        if heads < 1 or channels % heads:
            raise ValueError(
                f"transformer width {channels} does not split into heads (num_heads={self.num_heads}, "
                f"head_width={self.head_width})"
            )
        return heads


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of float timesteps ``[B]`` -> ``[B, dim]`` float32.

    DDPM's transformer-style position encoding with LDM's ordering (diffusers: ``flip_sin_to_cos=True``,
    ``freq_shift=0``). SDXL also embeds its size/crop numbers with this function at width 256.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.reshape(-1, 1).float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, emb_channels: int, num_groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(num_groups, channels, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(num_groups, out_channels, eps=1e-5),
            nn.SiLU(),
            nn.Identity(),  # dropout slot
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if channels == out_channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, upcast: bool, self_attention: bool):
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        self.self_attention = self_attention
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim))

    def share_projection_weights(self) -> None:
        """Stack the projections that read one input, so each runs as a single matmul (attention.py)."""
        if self.self_attention:
            share_one_weight([self.to_q, self.to_k, self.to_v])
        else:
            share_one_weight([self.to_k, self.to_v])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            stacked = stacked_weight([self.to_q, self.to_k, self.to_v])
            if stacked is not None:
                q, k, v = F.linear(x, stacked).chunk(3, dim=-1)
            else:
                q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        else:
            q = self.to_q(x)
            stacked = stacked_weight([self.to_k, self.to_v])
            if stacked is not None:
                k, v = F.linear(context, stacked).chunk(2, dim=-1)
            else:
                k, v = self.to_k(context), self.to_v(context)
        return self.to_out(attention(q, k, v, self.heads, upcast=self.upcast))


class GEGLU(nn.Module):
    """GLU with a GELU gate (Shazeer 2020): ``proj`` yields the value then the gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, upcast, self_attention=True)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, upcast, self_attention=False)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the ``H*W`` positions of a feature map, cross-attending to the text context."""

    def __init__(self, channels: int, depth: int, config: UNetConfig):
        super().__init__()
        heads = config.heads_for(channels)
        self.use_linear = config.use_linear_proj
        self.norm = nn.GroupNorm(config.num_groups, channels, eps=1e-6)
        if self.use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, channels)
            self.proj_out: nn.Module = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, config.context_dim, heads, config.upcast_attention)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        # Back to the input's layout: the transposed view has channels-last strides, which every later conv,
        # norm and add would inherit, and on CPU that layout made the whole UNet ~3x slower (on CUDA the
        # model may run channels-last on purpose: acceleration.py).
        h = h.transpose(1, 2).unflatten(2, (height, width)).contiguous(memory_format=memory_format_of(x))
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # Upsampling to the skip connection's size (not always 2x) lets latents whose sides are not
        # multiples of 8 run, as diffusers' `upsample_size` and ComfyUI's `output_shape` do.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """One UNet block: each layer gets the inputs it needs (time embedding, context, target size)."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Noise (or v) predictor ``(x [B,C,H,W], timesteps [B], context [B,T,D], y [B,adm]) -> [B,C',H,W]``."""

    def __init__(
        self,
        config: UNetConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.config = config
        # Building under the device context lets the loader construct on "meta" and then
        # load_state_dict(..., assign=True) without ever allocating random weights.
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(config)
        if dtype is not None:
            self.to(dtype)
        self.acceleration = StepAccelerator()

    def accelerate(self, options: AccelerationOptions) -> UNetModel:
        """Choose how steps run (acceleration.py); the defaults are safe and on where they help."""
        self.acceleration.configure(options)
        return self

    def share_projection_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, CrossAttention):
                module.share_projection_weights()

    def streaming_blocks(self) -> list[nn.Module]:
        """The units the low-VRAM mode uploads one at a time, in the order a step runs them."""
        embeddings = [self.time_embed] + ([self.label_emb] if hasattr(self, "label_emb") else [])
        return embeddings + [*self.input_blocks, self.middle_block, *self.output_blocks, self.out]

    def stream_weights(self, device: torch.device | str, **options) -> BlockStreamer:
        """``with unet.stream_weights("cuda"):`` runs steps with one block's weights on the device at a time."""
        return BlockStreamer(self.streaming_blocks(), device, accelerator=self.acceleration, **options)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def _build(self, config: UNetConfig) -> None:
        mc, ted = config.model_channels, config.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if config.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(config.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            )
        skip_widths = self._build_input_blocks(config)
        self._build_middle_block(config)
        self._build_output_blocks(config, skip_widths)
        self.out = nn.Sequential(
            nn.GroupNorm(config.num_groups, mc, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(mc, config.out_channels, 3, padding=1),
        )

    def _stage(self, config: UNetConfig, channels: int, out_channels: int, depth: int) -> list[nn.Module]:
        layers: list[nn.Module] = [ResBlock(channels, out_channels, config.time_embed_dim, config.num_groups)]
        if depth > 0:
            layers.append(SpatialTransformer(out_channels, depth, config))
        return layers

    def _build_input_blocks(self, config: UNetConfig) -> list[int]:
        """Builds ``input_blocks`` and returns the width of every skip connection they leave behind."""
        channels = config.model_channels
        blocks = [TimestepEmbedSequential(nn.Conv2d(config.in_channels, channels, 3, padding=1))]
        skip_widths = [channels]
        last_level = len(config.channel_mult) - 1
        for level, (width, depth) in enumerate(zip(config.level_widths, config.transformer_depth)):
            for _ in range(config.num_res_blocks):
                blocks.append(TimestepEmbedSequential(*self._stage(config, channels, width, depth)))
                channels = width
                skip_widths.append(channels)
            if level != last_level:
                blocks.append(TimestepEmbedSequential(Downsample(channels)))
                skip_widths.append(channels)
        self.input_blocks = nn.ModuleList(blocks)
        return skip_widths

    def _build_middle_block(self, config: UNetConfig) -> None:
        width = config.level_widths[-1]
        layers = self._stage(config, width, width, config.transformer_depth_middle)
        layers.append(ResBlock(width, width, config.time_embed_dim, config.num_groups))
        self.middle_block = TimestepEmbedSequential(*layers)

    def _build_output_blocks(self, config: UNetConfig, skip_widths: list[int]) -> None:
        channels = config.level_widths[-1]
        skip_widths = list(skip_widths)
        blocks = []
        levels = list(enumerate(zip(config.level_widths, config.transformer_depth)))
        for level, (width, depth) in reversed(levels):
            for index in range(config.num_res_blocks + 1):
                layers = self._stage(config, channels + skip_widths.pop(), width, depth)
                channels = width
                if level > 0 and index == config.num_res_blocks:
                    layers.append(Upsample(channels))
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs the UNet in its own dtype and returns the prediction in ``x``'s dtype."""
        if not isinstance(timesteps, torch.Tensor):
            # torch.full, not as_tensor: a fill on the device, where as_tensor would copy from the host.
            timesteps = torch.full((1,), float(timesteps), device=x.device)
        timesteps = timesteps.to(x.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(x.shape[0])
        self._check_label_input(y, x.shape[0])
        return self.acceleration(self, self.forward_eager, x, timesteps, context, y)

    def forward_eager(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The step itself, one kernel launch at a time: what CUDA graphs capture and torch.compile traces."""
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        emb = emb + self._label_embedding(y, dtype)
        context = context.to(dtype)

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h).to(x.dtype)

    def _check_label_input(self, y: torch.Tensor | None, batch: int) -> None:
        adm = self.config.adm_in_channels
        if adm is None:
            if y is not None:
                raise ValueError("this UNet has no label_emb (adm_in_channels is None) but y was given")
            return
        if y is None or tuple(y.shape) != (batch, adm):
            found = None if y is None else tuple(y.shape)
            raise ValueError(
                f"this UNet needs y of shape ({batch}, {adm}) (SDXL pooled + size embeddings), got {found}"
            )

    def _label_embedding(self, y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | float:
        return 0.0 if y is None else self.label_emb(y.to(dtype))


# Real architectures (model-formats.md 2.1). SD2.1 768-v wants upcast_attention in fp16; the loader sets it.
SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(num_heads=None, head_width=64, context_dim=1024, use_linear_proj=True)
SDXL_BASE_UNET = UNetConfig(
    channel_mult=(1, 2, 4),
    transformer_depth=(0, 2, 10),
    transformer_depth_middle=10,
    num_heads=None,
    head_width=64,
    context_dim=2048,
    use_linear_proj=True,
    adm_in_channels=2816,
)
SDXL_REFINER_UNET = UNetConfig(
    model_channels=384,
    transformer_depth=(0, 4, 4, 0),
    transformer_depth_middle=4,
    num_heads=None,
    head_width=64,
    context_dim=1280,
    use_linear_proj=True,
    adm_in_channels=2560,
)

# Tiny test models with the real layouts (model-formats.md 10.1): widths (32, 64, 128, 128), context 32 (the
# tiny CLIP width); SDXL: context 32 + 32 and label_emb in = pooled 32 + 6 * 256.
TINY_SD1_UNET = UNetConfig(model_channels=32, context_dim=32)
TINY_SD2_UNET = UNetConfig(
    model_channels=32, num_heads=None, head_width=16, context_dim=32, use_linear_proj=True
)
TINY_SDXL_UNET = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 4),
    transformer_depth=(0, 1, 2),
    transformer_depth_middle=2,
    num_heads=None,
    head_width=16,
    context_dim=64,
    use_linear_proj=True,
    adm_in_channels=32 + 6 * SDXL_ADM_TIME_EMBED_DIM,
)
TINY_SDXL_REFINER_UNET = UNetConfig(
    model_channels=32,
    transformer_depth=(0, 1, 1, 0),
    transformer_depth_middle=1,
    num_heads=None,
    head_width=16,
    context_dim=32,
    use_linear_proj=True,
    adm_in_channels=32 + 5 * SDXL_ADM_TIME_EMBED_DIM,
)


def sdxl_adm_input(pooled: torch.Tensor, size_numbers: torch.Tensor) -> torch.Tensor:
    """SDXL's ``y``: the pooled text vector, then every size/crop/score number embedded at width 256.

    ``size_numbers`` is ``[B, 6]`` for the base model (original h, w, crop top, left, target h, w) or
    ``[B, 5]`` for the refiner (h, w, crop top, left, aesthetic score), in that order.
    """
    batch = pooled.shape[0]
    numbers = timestep_embedding(size_numbers.reshape(-1), SDXL_ADM_TIME_EMBED_DIM).reshape(batch, -1)
    return torch.cat([pooled, numbers.to(pooled.dtype)], dim=-1)
