"""The pure-Python CLIP tokenizer against transformers.CLIPTokenizer built from the same shipped vocabulary."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer

from diffusion.prompt_weights import tokenize_prompt
from diffusion.tokenizer import NUM_MERGES, ClipTokenizer, write_tokenizer_folder, write_vocab_files

BOS, EOS = 49406, 49407

PLAIN_PROMPTS = [
    "a photo of a cat",
    "A PHOTO of a Cat, MiXeD CaSe",
    "masterpiece, best quality; ultra-detailed: 8k!!! (no weights here?)",
    "1girl, 2 boys, 1999, 3.14159, 1,000,000 dollars",
    "it's, we're, they'll, I'd, you've, I'm, don't, ''quoted'' 'S",
    "naïve café, Ελληνικά ΟΔΟΣ, Москва, 日本語のテキスト, 한국어",
    "emoji 😀👍🏽 and symbols © ® ™ ½ № → ∞",
    "tabs\tand\nnewlines   and  many    spaces  ",
    "snake_case-and/slashes\\back.dots#hash@at$dollar%percent^caret&amp",
    "x<|endoftext|>y <|startoftext|>z",
    "lower-cased look-alike <|ENDOFTEXT|> is plain text",
    "İstanbul, straße, ǅemal, e\u0301 decomposed",
    "",
    "   ",
    " ".join(["a very long prompt about a castle on a hill at sunset with dramatic clouds"] * 12),
]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer.default()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    write_vocab_files(folder)
    return CLIPTokenizer.from_pretrained(folder)


def test_a_photo_of_a_cat_gives_the_documented_ids(tokenizer):
    assert [BOS, *tokenizer.encode("a photo of a cat"), EOS] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_vocabulary_layout_matches_clip(tokenizer):
    assert tokenizer.vocab_size == 49408
    assert len(tokenizer.merges) == NUM_MERGES == 48894
    assert tokenizer.vocab["!"] == 0
    assert tokenizer.vocab["!</w>"] == 256
    assert tokenizer.vocab["<|startoftext|>"] == tokenizer.bos_id == BOS
    assert tokenizer.vocab["<|endoftext|>"] == tokenizer.eos_id == EOS


def test_written_vocab_files_hold_every_token_and_merge(tokenizer, tmp_path):
    write_vocab_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert vocab == tokenizer.vocab
    assert merges[0] == "#version: 0.2"
    assert len(merges) == 1 + 48894
    assert merges[1] == "i n"


@pytest.mark.parametrize(("pad_token", "pad_id"), [("<|endoftext|>", 49407), ("!", 0)])
def test_tokenizer_folder_pads_to_77_with_the_family_pad_token(tokenizer, tmp_path, pad_token, pad_id):
    write_tokenizer_folder(tmp_path, pad_token=pad_token)
    folder_tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    (chunk,) = tokenize_prompt("a photo of a cat", tokenizer, bos=BOS, eos=EOS, pad=pad_id)
    assert folder_tokenizer.model_max_length == 77
    assert folder_tokenizer("a photo of a cat", padding="max_length")["input_ids"] == [t for t, _ in chunk]


@pytest.mark.parametrize("prompt", PLAIN_PROMPTS)
def test_ids_equal_transformers_tokenizer(tokenizer, reference, prompt):
    assert [BOS, *tokenizer.encode(prompt), EOS] == reference(prompt)["input_ids"]


# Characters unassigned in Python's Unicode 14 tables are left out: transformers' Rust regex knows newer
# Unicode versions, so for those (and only those) letter classes differ.
ASSIGNED_CHARACTERS = st.characters(exclude_categories=("Cs", "Cn"))
WORDISH = "abcdefghijklmnopqrstuvwxyzABCXYZ '0123456789,.!:()-_\n"


@settings(max_examples=300, derandomize=True, deadline=None)
@given(prompt=st.text(ASSIGNED_CHARACTERS, max_size=40) | st.text(WORDISH, max_size=80))
def test_ids_equal_transformers_tokenizer_for_generated_text(tokenizer, reference, prompt):
    assert [BOS, *tokenizer.encode(prompt), EOS] == reference(prompt)["input_ids"]


@pytest.mark.parametrize("prompt", PLAIN_PROMPTS)
def test_decode_equals_transformers_decode(tokenizer, reference, prompt):
    ids = tokenizer.encode(prompt)
    assert tokenizer.decode(ids, skip_special=False) == reference.decode(ids)


def test_decode_drops_bos_and_eos_by_default(tokenizer):
    assert tokenizer.decode([BOS, 320, 1125, 539, 320, 2368, EOS, EOS]) == "a photo of a cat"


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="49408"):
        tokenizer.decode([320, 49408])


def test_long_prompt_is_split_every_75_tokens_with_the_reference_token_stream(tokenizer, reference):
    prompt = PLAIN_PROMPTS[-1]
    reference_ids = reference(prompt)["input_ids"][1:-1]
    chunks = tokenize_prompt(prompt, tokenizer, bos=BOS, eos=EOS, pad=EOS)
    assert len(reference_ids) == 180  # 15 tokens ("dramatic" is two) x 12
    assert [len(c) for c in chunks] == [77, 77, 77]
    inner = [[t for t, _ in c[1:]] for c in chunks]
    assert inner[0][:75] == reference_ids[:75] and inner[0][75] == EOS
    assert inner[1][:75] == reference_ids[75:150] and inner[1][75] == EOS
    assert inner[2][:31] == reference_ids[150:] + [EOS] and inner[2][31:] == [EOS] * 45


def test_weighted_prompt_token_stream_equals_the_reference_for_its_plain_text(tokenizer, reference):
    # Segment boundaries fall where pre-tokenisation splits anyway, so BPE gives the same ids.
    weighted = "(masterpiece:1.2), best quality, ((a cat)) sitting on a [red] chair, (detailed fur:0.8)"
    plain = "masterpiece, best quality, a cat sitting on a [red] chair, detailed fur"
    chunks = tokenize_prompt(weighted, tokenizer, bos=BOS, eos=EOS, pad=0)
    (chunk,) = chunks
    stream = [t for t, _ in chunk[1:] if t not in (EOS, 0)]
    assert stream == reference(plain)["input_ids"][1:-1]


def test_long_weighted_prompt_token_stream_equals_the_reference_across_chunks(tokenizer, reference):
    part = "(a castle:1.3) on a hill, ((sunset)), dramatic clouds, "
    weighted, plain = part * 12, "a castle on a hill, sunset, dramatic clouds, " * 12
    chunks = tokenize_prompt(weighted, tokenizer, bos=BOS, eos=EOS, pad=0)
    stream = [t for c in chunks for t, _ in c if t not in (BOS, EOS, 0)]
    assert len(chunks) == 2
    assert stream == reference(plain)["input_ids"][1:-1]


def test_word_cache_stays_bounded_and_keeps_ids_right(monkeypatch):
    import diffusion.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "WORD_CACHE_LIMIT", 3)
    fresh = tokenizer_module.ClipTokenizer(ClipTokenizer.default().merges)
    words = "a photo of a cat sitting on a red chair near the window".split()
    ids = fresh.encode(" ".join(words))
    assert len(fresh._word_cache) <= 3
    assert ids == ClipTokenizer.default().encode(" ".join(words))
