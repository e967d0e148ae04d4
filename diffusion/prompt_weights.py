"""Prompt text to weighted CLIP token chunks, the way ComfyUI's CLIPTextEncode reads a prompt.

Three steps, each a function here:
- `parse_weighted_prompt`: ComfyUI's emphasis syntax, `(word)`, `(word:1.3)`, `\\(` escapes
  (model-formats 6.3);
- `tokenize_weighted_prompt`: each weighted segment tokenized on its own, `embedding:name` references
  replaced by their vectors, one token slot per vector (6.5);
- `chunk_token_groups`: 75 tokens per chunk between BOS and EOS, padded to 77; short groups never straddle a
  chunk boundary (6.6).

A token is an `int` id or a textual-inversion vector (a 1-D tensor of the encoder's width); this module only
moves vectors around and never imports torch.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

Token = Any  # an int id or a 1-D embedding vector (torch.Tensor)
WeightedToken = tuple[Token, float]
EmbeddingLookup = Callable[[str], Any]  # name -> tensor [n, C] or [C], or None when there is none

EMBEDDING_PREFIX = "embedding:"
CHUNK_LENGTH = 77
# ComfyUI keeps a weighted segment or embedding of fewer tokens than this in one chunk (its max_word_length).
KEEP_TOGETHER = 8

# Stand-ins for `\(` and `\)` while parentheses are parsed: the NUL pairs ComfyUI uses, so prompts parse the same.
_ESCAPED_OPEN = "\0\2"
_ESCAPED_CLOSE = "\0\1"
# ComfyUI only recognises a reference at the start of a segment or after a space or newline.
_EMBEDDING_BOUNDARY = re.compile(r" embedding:|\nembedding:")


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def parse_weighted_prompt(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (segment, weight) pairs, escapes resolved.

    `(x)` multiplies by 1.1 per pair; `(x:w)` sets the weight to w, replacing every enclosing weight while
    bare pairs inside still multiply it; the weight separator is the last `:` in the group and must not be
    its first character; a group whose weight is not a number is a bare pair with the text kept; `[x]` and
    unbalanced parentheses are plain text.
    """
    escaped = text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)
    return [(_unescape(segment), weight) for segment, weight in _weigh(escaped, 1.0)]


def _unescape(text: str) -> str:
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")


def _weigh(text: str, weight: float) -> list[tuple[str, float]]:
    segments: list[tuple[str, float]] = []
    for item in _top_level_items(text):
        if len(item) < 2 or item[0] != "(" or item[-1] != ")":
            segments.append((item, weight))
            continue
        inner, inner_weight = item[1:-1], weight * 1.1
        colon = inner.rfind(":")
        if colon > 0:
            try:
                inner_weight = float(inner[colon + 1 :])
                inner = inner[:colon]
            except ValueError:
                pass
        segments.extend(_weigh(inner, inner_weight))
    return segments


def _top_level_items(text: str) -> list[str]:
    """Plain runs and outermost `( ... )` groups, in order.

    ComfyUI's depth counter goes negative on a stray `)` and a group only opens again at depth 0, so text
    after an unmatched `)` stays plain until the depth climbs back; we keep that to parse the same.
    """
    items: list[str] = []
    current = ""
    depth = 0
    for ch in text:
        if ch == "(":
            if depth == 0 and current:
                items.append(current)
                current = ""
            current += ch
            depth += 1
        elif ch == ")":
            current += ch
            depth -= 1
            if depth == 0:
                items.append(current)
                current = ""
        else:
            current += ch
    if current:
        items.append(current)
    return items


def tokenize_weighted_prompt(
    text: str,
    tokenizer: TextTokenizer,
    *,
    embeddings: EmbeddingLookup | None = None,
    embedding_width: int | None = None,
) -> list[list[WeightedToken]]:
    """Token groups, one per weighted segment and per embedding reference, each token with its weight.

    Without an `embeddings` lookup, `embedding:name` is ordinary text (as in ComfyUI without an embeddings
    folder). An embedding whose width is not `embedding_width` is ignored with a warning. ComfyUI drops
    such vectors later, while encoding, and pads the chunk's end instead: the same ids in the same places
    unless the dropped slots would have moved a chunk boundary.
    """
    groups: list[list[WeightedToken]] = []
    for segment, weight in parse_weighted_prompt(text):
        for word in _split_embedding_references(segment):
            if embeddings is not None and word.startswith(EMBEDDING_PREFIX):
                vectors, word = _resolve_embedding(word[len(EMBEDDING_PREFIX) :], embeddings, embedding_width)
                if vectors:
                    groups.append([(v, weight) for v in vectors])
                if not word:
                    continue
            groups.append([(t, weight) for t in tokenizer.encode(word)])
    return groups


def _split_embedding_references(segment: str) -> list[str]:
    parts = _EMBEDDING_BOUNDARY.split(segment)
    words = [parts[0]] + [EMBEDDING_PREFIX + p for p in parts[1:]]
    return [w for w in words if w]


def _resolve_embedding(
    reference: str, embeddings: EmbeddingLookup, width: int | None
) -> tuple[list[Any], str]:
    """(vectors, leftover text) for the text after `embedding:`.

    The name is the first whitespace-free run; if nothing matches, trailing commas are stripped and tried
    again, and the commas join the leftover text (ComfyUI's _try_get_embedding).
    """
    words = reference.strip("\n").split()
    if not words:
        log.warning("empty embedding reference %r, ignoring", EMBEDDING_PREFIX + reference)
        return [], ""
    name, leftover = words[0], " ".join(words[1:])
    embed = embeddings(name)
    if embed is None:
        stripped = name.strip(",")
        if len(stripped) < len(name):
            embed = embeddings(stripped) if stripped else None
            leftover = f"{name[len(stripped):]} {leftover}"
            name = stripped
    if embed is None:
        log.warning("embedding:%s does not exist, ignoring", name)
        return [], leftover
    if embed.ndim == 1:
        embed = embed.reshape(1, -1)
    if width is not None and embed.shape[-1] != width:
        log.warning(
            "embedding:%s has width %d but this text encoder is %d wide, ignoring", name, embed.shape[-1], width
        )
        return [], leftover
    return [embed[i] for i in range(embed.shape[0])], leftover


def chunk_token_groups(
    groups: list[list[WeightedToken]],
    *,
    bos: int,
    eos: int,
    pad: int,
    length: int = CHUNK_LENGTH,
    keep_together: int = KEEP_TOGETHER,
) -> list[list[WeightedToken]]:
    """Pack token groups into BOS ... EOS pad... chunks of exactly `length` tokens.

    A group shorter than `keep_together` that does not fit in the current chunk closes it (EOS and padding)
    and starts the next one; a longer group fills the chunk and continues in the next. An empty prompt is
    one chunk: BOS, EOS, padding.
    """
    room_per_chunk = length - 2
    chunks: list[list[WeightedToken]] = []
    chunk: list[WeightedToken] = [(bos, 1.0)]
    for group in groups:
        splittable = len(group) >= keep_together or len(group) > room_per_chunk
        while group:
            room = length - 1 - len(chunk)
            if len(group) <= room:
                chunk.extend(group)
                break
            if splittable:
                chunk.extend(group[:room])
                group = group[room:]
                chunk.append((eos, 1.0))
            else:
                chunk.append((eos, 1.0))
                chunk.extend([(pad, 1.0)] * room)
            chunks.append(chunk)
            chunk = [(bos, 1.0)]
    chunk.append((eos, 1.0))
    chunk.extend([(pad, 1.0)] * (length - len(chunk)))
    chunks.append(chunk)
    return chunks


def tokenize_prompt(
    text: str,
    tokenizer: TextTokenizer,
    *,
    bos: int,
    eos: int,
    pad: int,
    length: int = CHUNK_LENGTH,
    embeddings: EmbeddingLookup | None = None,
    embedding_width: int | None = None,
) -> list[list[WeightedToken]]:
    """A prompt as the chunks a CLIP text encoder takes: parse weights, tokenize, pack."""
    groups = tokenize_weighted_prompt(text, tokenizer, embeddings=embeddings, embedding_width=embedding_width)
    return chunk_token_groups(groups, bos=bos, eos=eos, pad=pad, length=length)
