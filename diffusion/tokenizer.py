"""The CLIP byte-pair-encoding tokenizer, in pure Python, built from the vocabulary file we ship.

Every Stable Diffusion text encoder up to SDXL (CLIP ViT-L/14, OpenCLIP ViT-H/14 and bigG) uses OpenAI's
CLIP tokenizer. We reproduce what `transformers.CLIPTokenizer` (5.x, backed by `tokenizers`) does, because
ComfyUI tokenizes through it:

1. the literal special tokens `<|startoftext|>` and `<|endoftext|>` are cut out of the raw text first
   (case-sensitive, as `tokenizers` extracts added tokens before normalising);
2. the rest is normalised: NFC, every whitespace run becomes one space, lower-cased character by character;
3. it is split into pieces: letter runs, single digits, runs of other symbols, and the contractions
   `'s 't 're 've 'm 'll 'd`; whitespace is dropped (model-formats 6.1);
4. each piece's UTF-8 bytes become printable stand-in characters (GPT-2's byte table), the last one gets the
   end-of-word mark `</w>`, and merges apply lowest rank first until none applies.

OpenAI's own tokenizer also repairs mojibake (ftfy) and unescapes HTML; transformers 5.x does not, and
neither do we. The two differ only on unusual Unicode and HTML entities.
"""
from __future__ import annotations

import functools
import gzip
import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path

VOCAB_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

# The vocabulary file holds a header line and then far more merges than CLIP was trained with; the model's
# 49408-entry vocabulary uses the first 49408 - 512 - 2 of them (model-formats 6.1).
NUM_MERGES = 48894
END_OF_WORD = "</w>"
BOS_TEXT = "<|startoftext|>"
EOS_TEXT = "<|endoftext|>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

# Unicode's White_Space property, which `\s` means in the Rust regex that transformers' tokenizer runs.
# Python's str.isspace() differs (it also accepts the information separators U+001C..U+001F).
WHITESPACE = frozenset(
    [chr(c) for c in range(0x09, 0x0E)]
    + [" ", "\x85", "\xa0", "\u1680", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000"]
    + [chr(c) for c in range(0x2000, 0x200B)]
)


WORD_CACHE_LIMIT = 100_000


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte table: printable Latin-1 bytes stand for themselves, the other 68 bytes are
    moved to code points 256 and up, so every byte string becomes printable text without spaces."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def read_merges(vocab_file: Path = VOCAB_FILE) -> list[tuple[str, str]]:
    """The merge pairs in rank order, from the gzipped vocabulary file."""
    with gzip.open(vocab_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = []
    for line in lines[1 : NUM_MERGES + 1]:
        first, second = line.split()
        merges.append((first, second))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{vocab_file}: expected {NUM_MERGES} merge lines after the header, found {len(merges)}")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token string -> id: the 256 byte symbols, the same with `</w>`, one entry per merge, then BOS, EOS."""
    symbols = list(byte_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS_TEXT, EOS_TEXT]
    return {token: i for i, token in enumerate(tokens)}


def normalize(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, lower-cased per character.

    Per-character lowering matches the Rust normaliser: str.lower() on a whole string would turn a final
    Greek sigma into 'ς', which transformers' tokenizer does not.
    """
    text = unicodedata.normalize("NFC", text)
    out: list[str] = []
    for ch in text:
        if ch in WHITESPACE:
            if not out or out[-1] != " ":
                out.append(" ")
        else:
            out.append(ch.lower())
    return "".join(out)


def _is_letter(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "L"


def _is_number(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "N"


def split_pieces(text: str) -> list[str]:
    """Pre-tokenisation of normalised text, the same pieces as CLIP's regex
    `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` (leftmost alternative first).

    The regex's `<|startoftext|>` alternatives are left out on purpose: in transformers the literal special
    tokens were already cut out before this step, and a lower-cased look-alike is re-split by the byte-level
    pre-tokenizer into `<|`, `endoftext`, `|>`, which is exactly what the symbol and letter rules give.
    """
    pieces = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in WHITESPACE:
            i += 1
            continue
        if ch == "'":
            contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
            if contraction is not None:
                pieces.append(contraction)
                i += len(contraction)
                continue
        j = i + 1
        if _is_letter(ch):
            while j < n and _is_letter(text[j]):
                j += 1
        elif not _is_number(ch):
            while j < n and text[j] not in WHITESPACE and not _is_letter(text[j]) and not _is_number(text[j]):
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


class ClipTokenizer:
    """CLIP's BPE tokenizer. `encode` gives the ids of the text only (no BOS/EOS framing)."""

    bos_id = 49406
    eos_id = 49407

    def __init__(self, merges: list[tuple[str, str]]) -> None:
        self.merges = merges
        self.vocab = build_vocab(merges)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._bytes = byte_to_unicode()
        self._byte_of = {ch: b for b, ch in self._bytes.items()}
        self._word_cache: dict[str, list[int]] = {}
        if self.vocab[BOS_TEXT] != self.bos_id or self.vocab[EOS_TEXT] != self.eos_id:
            raise ValueError(
                f"vocabulary puts BOS/EOS at {self.vocab[BOS_TEXT]}/{self.vocab[EOS_TEXT]}, "
                f"expected {self.bos_id}/{self.eos_id}"
            )

    @classmethod
    @functools.cache
    def default(cls) -> ClipTokenizer:
        """The shared tokenizer built from the shipped vocabulary (diffusion/data/)."""
        return cls(read_merges(VOCAB_FILE))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part, special_id in _split_special(text):
            if special_id is not None:
                ids.append(special_id)
                continue
            for piece in split_pieces(normalize(part)):
                ids.extend(self._encode_piece(piece))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text for ids, as transformers decodes: bytes re-joined across tokens, `</w>` read as a space.
        BOS and EOS are dropped unless `skip_special` is False."""
        tokens = []
        for i in map(int, ids):
            if i not in self.id_to_token:
                raise ValueError(f"token id {i} is outside the CLIP vocabulary (0..{self.vocab_size - 1})")
            if not (skip_special and i in (self.bos_id, self.eos_id)):
                tokens.append(self.id_to_token[i])
        raw = bytes(self._byte_of[ch] for ch in "".join(tokens))
        return raw.decode("utf-8", "replace").replace(END_OF_WORD, " ").strip()

    def _encode_piece(self, piece: str) -> list[int]:
        cached = self._word_cache.get(piece)
        if cached is None:
            symbols = [self._bytes[b] for b in piece.encode("utf-8")]
            symbols[-1] += END_OF_WORD
            cached = [self.vocab[s] for s in self._merge(symbols)]
            # A long-running server sees unbounded distinct words; a full cache starts over rather than grow.
            if len(self._word_cache) >= WORD_CACHE_LIMIT:
                self._word_cache.clear()
            self._word_cache[piece] = cached
        return cached

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply the lowest-ranked adjacent merge everywhere it occurs (left to right), until none applies."""
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, NUM_MERGES))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols


def _split_special(text: str) -> list[tuple[str, int | None]]:
    """Cut literal `<|startoftext|>` / `<|endoftext|>` out of the raw text: [(text, None) | ("", id)]."""
    specials = {BOS_TEXT: ClipTokenizer.bos_id, EOS_TEXT: ClipTokenizer.eos_id}
    parts: list[tuple[str, int | None]] = []
    start = i = 0
    while i < len(text):
        found = next((s for s in specials if text.startswith(s, i)), None)
        if found is None:
            i += 1
            continue
        if i > start:
            parts.append((text[start:i], None))
        parts.append(("", specials[found]))
        i = start = i + len(found)
    if start < len(text):
        parts.append((text[start:], None))
    return parts


def write_vocab_files(folder: str | Path, tokenizer: ClipTokenizer | None = None) -> None:
    """Write `vocab.json` and `merges.txt` (the files of a transformers/diffusers tokenizer folder)."""
    tokenizer = tokenizer or ClipTokenizer.default()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer.vocab, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in tokenizer.merges)


def write_tokenizer_folder(folder: str | Path, *, pad_token: str = EOS_TEXT) -> None:
    """A complete `tokenizer/` folder for transformers and diffusers: the vocabulary files plus the config
    that fixes the 77-token context and the family's padding (SD1 pads with `<|endoftext|>`, SD2's folders
    name `!`, id 0). Without `model_max_length`, diffusers pipelines would pad to a near-infinite length."""
    write_vocab_files(folder)
    special = {"bos_token": BOS_TEXT, "eos_token": EOS_TEXT, "unk_token": EOS_TEXT, "pad_token": pad_token}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(Path(folder) / name, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
