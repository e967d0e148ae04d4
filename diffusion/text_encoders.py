"""CLIP text encoders for SD1.x (CLIP ViT-L/14) and SD2.x (OpenCLIP ViT-H/14), on `transformers.CLIPTextModel`.

The module tree is transformers' own, so diffusers folders and SD1 single files load by name. OpenCLIP towers
(SD2, SDXL's bigG) are renamed on load by `open_clip_to_transformers` (model-formats 2.4). Encoding follows
ComfyUI: prompts become 77-token chunks (prompt_weights.py), every chunk is encoded, the chosen hidden layer is
taken (CLIP skip, 6.7), weighted tokens are pulled away from the empty prompt's encoding (6.4) and the chunks
are concatenated along the sequence; the pooled vector is the first chunk's.

Textual-inversion vectors go in as input embeddings, one token slot each, so the vocabulary never changes.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from .legacy_pickle import refusal_message
from .prompt_weights import EmbeddingLookup, WeightedToken, tokenize_prompt
from .tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

TEXT_MODEL_PREFIX = "text_model."
HEAD_WIDTH = 64  # CLIP-L, OpenCLIP-H and bigG all use 64-wide attention heads
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class TextEncoderConfig:
    """One CLIP text tower and how SD reads it."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str  # "quick_gelu" (OpenAI CLIP-L) or "gelu" (OpenCLIP)
    projection_dim: int | None  # rows of text_projection, None when the tower has none
    pad_token_id: int  # 49407 for OpenAI CLIP-L, 0 for OpenCLIP (model-formats 6.2)
    default_layer: int  # hidden layer used without CLIP skip: -1 last, -2 penultimate
    final_norm: bool  # apply final_layer_norm to the selected layer (SD1/SD2 yes, SDXL no)
    vocab_size: int = 49408
    max_positions: int = 77
    # Blocks the original tower had after this one's last: diffusers' SD2 folders drop OpenCLIP's final block.
    # CLIP-skip layers count from the original tower, so "-2" means the same hidden state in both forms.
    missing_last_layers: int = 0

    def to_transformers(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            projection_dim=self.projection_dim or self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_positions,
            hidden_act=self.hidden_act,
            layer_norm_eps=LAYER_NORM_EPS,
            pad_token_id=self.pad_token_id,
            bos_token_id=ClipTokenizer.bos_id,
            eos_token_id=ClipTokenizer.eos_id,
        )


SD1_CLIP_L = TextEncoderConfig(
    hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, hidden_act="quick_gelu",
    projection_dim=None, pad_token_id=49407, default_layer=-1, final_norm=True,
)
# SD2's last OpenCLIP block was not trained for this use; Stability's configs read the penultimate one.
SD2_OPENCLIP_H = TextEncoderConfig(
    hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, hidden_act="gelu",
    projection_dim=1024, pad_token_id=0, default_layer=-2, final_norm=True,
)
SDXL_CLIP_L = dataclasses.replace(SD1_CLIP_L, default_layer=-2, final_norm=False)
SDXL_OPENCLIP_G = TextEncoderConfig(
    hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, hidden_act="gelu",
    projection_dim=1280, pad_token_id=0, default_layer=-2, final_norm=False,
)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def text_encoder_config_from_state_dict(
    state_dict_or_shapes: Mapping[str, Any], *, base: TextEncoderConfig, num_heads: int | None = None
) -> TextEncoderConfig:
    """Widths, depth, vocabulary, positions and projection read from tensor shapes; the rest from `base`.

    Accepts tensors or shapes, transformers names (with or without `text_model.`) or open_clip names. Heads
    follow the family rule (64 wide) unless `num_heads` is given, as tiny test models need.
    """
    shapes = {_strip_text_model(k): _shape(v) for k, v in state_dict_or_shapes.items()}
    if "positional_embedding" in shapes:
        names = {
            "token": "token_embedding.weight", "position": "positional_embedding",
            "fc1": "transformer.resblocks.0.mlp.c_fc.weight", "layer": r"transformer\.resblocks\.(\d+)\.",
        }
    else:
        names = {
            "token": "embeddings.token_embedding.weight", "position": "embeddings.position_embedding.weight",
            "fc1": "encoder.layers.0.mlp.fc1.weight", "layer": r"encoder\.layers\.(\d+)\.",
        }
    for role in ("token", "position", "fc1"):
        if names[role] not in shapes:
            raise ValueError(f"text encoder weights lack {names[role]!r}; cannot infer the configuration")
    vocab_size, hidden_size = shapes[names["token"]]
    layer_ids = {int(m.group(1)) for k in shapes if (m := re.match(names["layer"], k))}
    if num_heads is None:
        if hidden_size % HEAD_WIDTH:
            raise ValueError(f"text encoder width {hidden_size} is not a multiple of {HEAD_WIDTH}; pass num_heads")
        num_heads = hidden_size // HEAD_WIDTH
    projection_dim = None
    if "text_projection.weight" in shapes:
        projection_dim = shapes["text_projection.weight"][0]
    elif "text_projection" in shapes:  # open_clip stores it [C, P]
        projection_dim = shapes["text_projection"][1]
    return dataclasses.replace(
        base,
        hidden_size=hidden_size,
        num_layers=max(layer_ids) + 1,
        num_heads=num_heads,
        intermediate_size=shapes[names["fc1"]][0],
        projection_dim=projection_dim,
        vocab_size=vocab_size,
        max_positions=shapes[names["position"]][0],
    )


def _strip_text_model(name: str) -> str:
    return name.removeprefix(TEXT_MODEL_PREFIX)


# open_clip name -> transformers name, per residual block and for the rest of the tower (model-formats 2.4).
_BLOCK_PARTS = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOWER_PARTS = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPEN_CLIP_SKIPPED = ("logit_scale", "attn_mask")
_OPEN_CLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OPEN_CLIP_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_TRANSFORMERS_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def open_clip_to_transformers(named_tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """Rename an open_clip text tower (prefix already removed) to transformers names, one key at a time.

    The fused `in_proj` is split in thirds (q, k, v rows), `text_projection` [C, P] is transposed to a Linear
    weight [P, C], `logit_scale` and `attn_mask` are dropped. Unknown names pass through unchanged so that a
    strict load reports them.
    """
    for name, tensor in named_tensors:
        if name in _OPEN_CLIP_SKIPPED:
            continue
        if name in _TOWER_PARTS:
            yield _TOWER_PARTS[name], tensor
        elif name == "text_projection":
            yield "text_projection.weight", tensor.t().contiguous()
        elif m := _OPEN_CLIP_IN_PROJ.match(name):
            layer, kind = m.groups()
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                yield f"encoder.layers.{layer}.self_attn.{part}.{kind}", chunk
        elif (m := _OPEN_CLIP_BLOCK.match(name)) and m.group(2) in _BLOCK_PARTS:
            layer, part, kind = m.groups()
            yield f"encoder.layers.{layer}.{_BLOCK_PARTS[part]}.{kind}", tensor
        else:
            yield name, tensor


def transformers_to_open_clip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `open_clip_to_transformers` (q, k, v fused back, projection transposed back)."""
    tower = {v: k for k, v in _TOWER_PARTS.items()}
    block = {v: k for k, v in _BLOCK_PARTS.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, tensor in state_dict.items():
        name = _strip_text_model(name)
        m = _TRANSFORMERS_BLOCK.match(name)
        if name.endswith("position_ids"):
            continue
        if name in tower:
            out[tower[name]] = tensor
        elif name == "text_projection.weight":
            out["text_projection"] = tensor.t().contiguous()
        elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            layer, part, kind = m.groups()
            qkv.setdefault((layer, kind), {})[part] = tensor
        elif m and m.group(2) in block:
            layer, part, kind = m.groups()
            out[f"transformer.resblocks.{layer}.{block[part]}.{kind}"] = tensor
        else:
            out[name] = tensor
    for (layer, kind), parts in qkv.items():
        missing = [p for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if p not in parts]
        if missing:
            raise ValueError(f"encoder.layers.{layer} has no {', '.join(f'{p}.{kind}' for p in missing)} to fuse")
        fused = torch.cat([parts["self_attn.q_proj"], parts["self_attn.k_proj"], parts["self_attn.v_proj"]])
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return out


def resolve_layer(layer: int, num_layers: int, missing_last_layers: int = 0) -> int:
    """0-based block index for a CLIP-skip layer (-1 last block, -2 the one before, ...), counted from the
    original tower when this one lacks its `missing_last_layers` final blocks.

    Like ComfyUI, asking for more layers than the tower has falls back to the last one; so does asking for a
    block the tower no longer has (the nearest one it keeps).
    """
    if layer >= 0:
        raise ValueError(f"CLIP layer must be negative (-1 is the last), got {layer}")
    original = num_layers + missing_last_layers
    if -layer > original:
        return num_layers - 1
    return min(original + layer, num_layers - 1)


class ClipTextEncoder(nn.Module):
    """A CLIP text tower (transformers' CLIPTextModel) plus the optional text projection SD2/SDXL carry."""

    def __init__(self, config: TextEncoderConfig, *, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        self.config = config
        with torch.device(device if device is not None else "cpu"):
            self.transformer = CLIPTextModel(config.to_transformers())
            self.text_projection = None
            if config.projection_dim is not None:
                self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        if dtype is not None:
            self.to(dtype=dtype)
        self.requires_grad_(False)
        self.eval()

    def _module_key(self, name: str) -> str:
        name = _strip_text_model(name)
        return name if name.startswith("text_projection.") else "transformer." + name

    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], *, strict: bool = True) -> None:
        """Load transformers-named weights (with or without `text_model.`); `position_ids` are ignored
        (positions are always 0..76; some merged files store them as inexact floats).

        Weights are cast to the module's dtype; a module built on the meta device takes the tensors as-is
        (same device, no copy). Raises ValueError listing every missing, unexpected or mis-shaped key.
        """
        targets = dict(self.named_parameters())
        incoming: dict[str, Tensor] = {}
        unexpected, mis_shaped = [], []
        for name, tensor in named_tensors:
            if name.endswith("position_ids"):
                continue
            key = self._module_key(name)
            if key not in targets:
                unexpected.append(name)
            elif tuple(tensor.shape) != tuple(targets[key].shape):
                mis_shaped.append(f"{name}: expected {tuple(targets[key].shape)}, found {tuple(tensor.shape)}")
            else:
                incoming[key] = tensor.to(dtype=targets[key].dtype)
        missing = [k.removeprefix("transformer.") for k in targets if k not in incoming]
        problems = []
        if mis_shaped:
            problems.append("wrong shapes: " + "; ".join(mis_shaped))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        on_meta = any(p.is_meta for p in targets.values())
        if missing and on_meta and not problems:
            problems.append("missing keys (nothing to fill them on the meta device): " + ", ".join(missing))
        if problems:
            raise ValueError("text encoder weights do not fit the configuration: " + " | ".join(problems))
        if missing or unexpected:
            log.warning("text encoder: %d keys missing, %d unexpected (ignored)", len(missing), len(unexpected))
        self.load_state_dict(incoming, strict=False, assign=on_meta)
        embeddings = self.transformer.embeddings
        if embeddings.position_ids.is_meta:
            device = embeddings.token_embedding.weight.device
            embeddings.position_ids = torch.arange(self.config.max_positions, device=device).expand(1, -1)

    @torch.no_grad()
    def encode_token_chunks(
        self, chunks: list[list[WeightedToken]], *, layer: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """(cond [1, T*k, C], pooled [1, P or C]) in float32 for k chunks of T tokens each.

        Tokens are ids or embedding vectors of width C. When any weight differs from 1, each weighted
        position j becomes z_empty[j] + w (z[j] - z_empty[j]), z_empty being the empty prompt's encoding
        (ComfyUI's rule, model-formats 6.4); the pooled vector is never weighted.
        """
        if not chunks:
            raise ValueError("no token chunks to encode")
        lengths = sorted({len(c) for c in chunks})
        if len(lengths) > 1 or lengths[0] > self.config.max_positions:
            raise ValueError(
                f"token chunks must share one length of at most {self.config.max_positions}, found {lengths}"
            )
        rows = [[token for token, _ in chunk] for chunk in chunks]
        weights = torch.tensor([[float(w) for _, w in chunk] for chunk in chunks])
        weighted = bool((weights != 1.0).any())
        if weighted:
            rows.append(self.empty_tokens(lengths[0]))
        hidden, pooled = self.encode_tokens(rows, layer=layer)
        if weighted:
            z_empty = hidden[-1]
            hidden = hidden[:-1]
            w = weights.to(hidden.device)[..., None]
            # ComfyUI's operation order, (z - z_empty) * w + z_empty, so results match to the last bit.
            hidden = torch.where(w != 1.0, (hidden - z_empty) * w + z_empty, hidden)
        return hidden.reshape(1, -1, hidden.shape[-1]), pooled[:1]

    def empty_tokens(self, length: int) -> list[int]:
        """BOS, EOS, then this family's padding (model-formats 6.2)."""
        pad = self.config.pad_token_id
        return [ClipTokenizer.bos_id, ClipTokenizer.eos_id] + [pad] * (length - 2)

    def encode_tokens(self, rows: Sequence[Sequence[Any]], *, layer: int | None = None) -> tuple[Tensor, Tensor]:
        """Unweighted encoding of equal-length token rows: (hidden [B, T, C], pooled [B, P or C]), float32.

        `hidden` is the selected layer (`layer`, default the config's), final-normed if the config says so;
        `pooled` is the final-normed last layer at each row's first EOS, projected when there is a projection.
        """
        model = self.transformer
        config = self.config
        block = resolve_layer(config.default_layer if layer is None else layer, config.num_layers,
                              config.missing_last_layers)
        inputs = self._input_embeddings(rows)
        length = inputs.shape[1]
        positions = torch.arange(length, device=inputs.device)[None]
        h = model.embeddings(position_ids=positions, inputs_embeds=inputs)
        # CLIP text towers are causal; SD never masks padding (model-formats 2.4).
        mask = torch.full((length, length), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device)
        mask = mask.triu(1)[None, None]
        selected = None
        for i, encoder_layer in enumerate(model.encoder.layers):
            h = encoder_layer(h, mask)
            if i == block:
                selected = h
        last = model.final_layer_norm(h)
        if self.config.final_norm:
            selected = last if block == self.config.num_layers - 1 else model.final_layer_norm(selected)
        pooled = last[torch.arange(len(rows), device=h.device), self._eos_positions(rows).to(h.device)]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return selected.float(), pooled.float()

    def _input_embeddings(self, rows: Sequence[Sequence[Any]]) -> Tensor:
        table = self.transformer.embeddings.token_embedding
        ids = [[int(t) if isinstance(t, numbers.Integral) else 0 for t in row] for row in rows]
        embeds = table(torch.tensor(ids, device=table.weight.device))
        for b, row in enumerate(rows):
            for j, token in enumerate(row):
                if isinstance(token, numbers.Integral):
                    continue
                if tuple(token.shape) != (self.config.hidden_size,):
                    raise ValueError(
                        f"embedding vector at chunk {b}, position {j} has shape {tuple(token.shape)}, "
                        f"expected ({self.config.hidden_size},)"
                    )
                embeds[b, j] = token.to(device=embeds.device, dtype=embeds.dtype)
        return embeds

    @staticmethod
    def _eos_positions(rows: Sequence[Sequence[Any]]) -> Tensor:
        """First EOS per row (position 0 when there is none, as transformers' argmax gives)."""
        eos = ClipTokenizer.eos_id
        positions = []
        for row in rows:
            hits = [j for j, t in enumerate(row) if isinstance(t, numbers.Integral) and int(t) == eos]
            positions.append(hits[0] if hits else 0)
        return torch.tensor(positions)


class SDTextEncoder:
    """What a CLIP handle holds: tokenizer, encoder and settings. Copies share the encoder's weights."""

    def __init__(
        self,
        encoder: ClipTextEncoder,
        tokenizer: ClipTokenizer | None = None,
        *,
        layer: int | None = None,
        embeddings: EmbeddingLookup | None = None,
    ) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer or ClipTokenizer.default()
        self.layer = encoder.config.default_layer if layer is None else layer
        resolve_layer(self.layer, encoder.config.num_layers, encoder.config.missing_last_layers)
        self.embeddings = embeddings

    @property
    def config(self) -> TextEncoderConfig:
        return self.encoder.config

    def tokenize(self, prompt: str) -> list[list[WeightedToken]]:
        """77-token chunks (BOS, up to 75 tokens, EOS, padding) of (token, weight)."""
        return tokenize_prompt(
            prompt,
            self.tokenizer,
            bos=self.tokenizer.bos_id,
            eos=self.tokenizer.eos_id,
            pad=self.config.pad_token_id,
            length=self.config.max_positions,
            embeddings=self.embeddings,
            embedding_width=self.config.hidden_size,
        )

    def encode(self, prompt: str) -> tuple[Tensor, Tensor]:
        """(cond [1, 77k, C], pooled [1, P or C]) for a prompt."""
        return self.encoder.encode_token_chunks(self.tokenize(prompt), layer=self.layer)

    def with_layer(self, layer: int) -> SDTextEncoder:
        """CLIPSetLastLayer: the same encoder stopping at `layer` (-1 = last)."""
        return SDTextEncoder(self.encoder, self.tokenizer, layer=layer, embeddings=self.embeddings)

    def with_embeddings(self, embeddings: EmbeddingLookup | None) -> SDTextEncoder:
        return SDTextEncoder(self.encoder, self.tokenizer, layer=self.layer, embeddings=embeddings)


EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


def load_textual_inversion(path: str | os.PathLike, *, key: str | None = None) -> Tensor:
    """The [n, C] vectors of a textual-inversion file (model-formats 7.6).

    Reads A1111 `.pt` (`string_to_param`), A1111 `.safetensors` (`emb_params`), diffusers `learned_embeds`
    (one key) and per-encoder files (`clip_l`, `clip_g`, ...: `key` picks the part). Pickles are opened with
    `weights_only=True` only; a file that needs more is refused.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        data: Any = safetensors.torch.load_file(path, device="cpu")
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = refusal_message(path, str(exc))
            raise ValueError(f"{path}: not an embedding file that can be read safely ({reason})") from None
        except (RuntimeError, EOFError) as exc:
            raise ValueError(f"{path}: not an embedding file that can be read safely ({exc})") from exc
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of tensors, found {type(data).__name__}")
    if "string_to_param" in data:
        data = data["string_to_param"]
    elif key is not None and key in data:
        data = {key: data[key]}
    tensor = next((v for v in data.values() if isinstance(v, Tensor)), None)
    if tensor is None or tensor.ndim not in (1, 2):
        raise ValueError(f"{path}: no [n, C] embedding tensor found (keys: {', '.join(map(str, data))})")
    return tensor.reshape(-1, tensor.shape[-1]).float()


def embedding_folder_lookup(
    folders: Iterable[str | os.PathLike], *, key: str | None = None
) -> Callable[[str], Tensor | None]:
    """A name -> vectors lookup over embeddings folders and their subfolders, as ComfyUI searches them:
    the exact file name, then with `.safetensors`, `.pt`, `.bin` appended; the first folder that has it wins.
    Names never escape a folder, through `..` or through a symlink. Unreadable files are skipped with a
    warning."""
    roots = [Path(f).resolve() for f in folders]

    def inside(root: Path, path: Path) -> Path | None:
        resolved = path.resolve()
        return resolved if resolved.is_relative_to(root) and resolved.is_file() else None

    def lookup(name: str) -> Tensor | None:
        for root in roots:
            search = [root] + sorted(Path(d) for d, _, _ in os.walk(root, followlinks=True) if Path(d) != root)
            for folder in search:
                for option in [name] + [name + extension for extension in EMBEDDING_EXTENSIONS]:
                    path = inside(root, folder / option)
                    if path is None:
                        continue
                    try:
                        return load_textual_inversion(path, key=key)
                    except ValueError as exc:
                        log.warning("skipping embedding %s: %s", path, exc)
                        return None
        return None

    return lookup
