"""ComfyUI's prompt weighting syntax, embedding references and 77-token chunking (model-formats 6.3, 6.5, 6.6)."""
import logging

import pytest
import torch

from diffusion.prompt_weights import (
    chunk_token_groups,
    parse_weighted_prompt,
    tokenize_prompt,
    tokenize_weighted_prompt,
)
from diffusion.tokenizer import ClipTokenizer

BOS, EOS = 49406, 49407
A, CAT, PHOTO = 320, 2368, 1125  # "a", "cat", "photo"

# Every row of the model-formats 6.3 table, with ComfyUI's exact floating-point products.
WEIGHT_TABLE = [
    ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
    ("((b))", [("b", 1.1 * 1.1)]),
    ("(b:1.5)", [("b", 1.5)]),
    ("(b: 1.5)", [("b", 1.5)]),
    ("(b:-1)", [("b", -1.0)]),
    ("((b:1.5))", [("b", 1.5)]),
    ("((b):1.5)", [("b", 1.5 * 1.1)]),
    ("(a, (b:1.3), c:0.8)", [("a, ", 0.8), ("b", 1.3), (", c", 0.8)]),
    ("(b:1.5x)", [("b:1.5x", 1.1)]),
    ("(:1.5)", [(":1.5", 1.1)]),
    ("\\(not\\) (x:2)", [("(not) ", 1.0), ("x", 2.0)]),
    ("[b]", [("[b]", 1.0)]),
    ("(a", [("(a", 1.0)]),
    ("a) b", [("a) b", 1.0)]),
    ("(embedding:foo:1.2)", [("embedding:foo", 1.2)]),
]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer.default()


@pytest.mark.parametrize(("prompt", "segments"), WEIGHT_TABLE, ids=[row[0] for row in WEIGHT_TABLE])
def test_weight_syntax_table_row(prompt, segments):
    assert parse_weighted_prompt(prompt) == segments


def test_weight_separator_is_the_last_colon():
    assert parse_weighted_prompt("(time: 12:30:0.5)") == [("time: 12:30", 0.5)]


def test_text_after_a_stray_closing_parenthesis_stays_plain_until_depth_recovers():
    # ComfyUI's depth counter goes to -1 at the stray ")"; only the second "(" opens a group again.
    assert parse_weighted_prompt("a) (b) (c)") == [("a) (b) (c)", 1.0)]
    assert parse_weighted_prompt("a) ((b)) (c)") == [("a) (", 1.0), ("b", 1.1), (") (c)", 1.0)]


def test_empty_parentheses_contribute_nothing():
    assert parse_weighted_prompt("a () b") == [("a ", 1.0), (" b", 1.0)]


def test_each_segment_is_tokenized_on_its_own(tokenizer):
    groups = tokenize_weighted_prompt("a (photo:1.5) of a cat", tokenizer)
    assert groups == [[(A, 1.0)], [(PHOTO, 1.5)], [(539, 1.0), (A, 1.0), (CAT, 1.0)]]


def test_empty_prompt_is_one_chunk_of_bos_eos_and_padding(tokenizer):
    (chunk,) = tokenize_prompt("", tokenizer, bos=BOS, eos=EOS, pad=EOS)
    assert chunk == [(BOS, 1.0)] + [(EOS, 1.0)] * 76


@pytest.mark.parametrize(("family", "pad"), [("sd1", 49407), ("sd2", 0)])
def test_padding_follows_the_family(tokenizer, family, pad):
    (chunk,) = tokenize_prompt("a photo of a cat", tokenizer, bos=BOS, eos=EOS, pad=pad)
    assert [t for t, _ in chunk] == [BOS, A, PHOTO, 539, A, CAT, EOS] + [pad] * 70


@pytest.mark.parametrize(("words", "chunks"), [(75, 1), (76, 2), (150, 2), (151, 3), (225, 3)])
def test_unweighted_prompt_splits_exactly_every_75_tokens(tokenizer, words, chunks):
    out = tokenize_prompt("a " * words, tokenizer, bos=BOS, eos=EOS, pad=0)
    assert len(out) == chunks
    assert sum(len(c) for c in out) == 77 * chunks
    assert [t for t, _ in out[0]] == [BOS] + [A] * min(words, 75) + [EOS] + [0] * (75 - min(words, 75))
    assert sum(1 for c in out for t, _ in c if t == A) == words


def test_short_weighted_segment_moves_whole_to_the_next_chunk(tokenizer):
    out = tokenize_prompt("a " * 73 + "(a photo of:1.2)", tokenizer, bos=BOS, eos=EOS, pad=0)
    first, second = ([t for t, _ in c] for c in out)
    assert first == [BOS] + [A] * 73 + [EOS, 0, 0]
    assert second[:5] == [BOS, A, PHOTO, 539, EOS]
    assert [w for _, w in out[1][1:4]] == [1.2, 1.2, 1.2]


def test_weighted_segment_of_eight_tokens_is_split_at_the_boundary(tokenizer):
    out = tokenize_prompt("a " * 73 + "(" + "cat " * 8 + ":1.2)", tokenizer, bos=BOS, eos=EOS, pad=0)
    first, second = ([t for t, _ in c] for c in out)
    assert first == [BOS] + [A] * 73 + [CAT, CAT, EOS]
    assert second[:8] == [BOS] + [CAT] * 6 + [EOS]


def test_chunking_keeps_weights_and_frames_with_weight_one():
    groups = [[(5, 1.5)] * 3, [(6, 0.5)]]
    (chunk,) = chunk_token_groups(groups, bos=BOS, eos=EOS, pad=0, length=8)
    assert chunk == [(BOS, 1.0), (5, 1.5), (5, 1.5), (5, 1.5), (6, 0.5), (EOS, 1.0), (0, 1.0), (0, 1.0)]


def _lookup(table):
    return lambda name: table.get(name)


def test_embedding_reference_takes_one_slot_per_vector_with_the_segment_weight(tokenizer):
    vectors = torch.arange(6.0).reshape(3, 2)
    groups = tokenize_weighted_prompt("a (embedding:style:1.3) cat", tokenizer, embeddings=_lookup({"style": vectors}))
    assert groups[0] == [(A, 1.0)]
    assert [w for _, w in groups[1]] == [1.3, 1.3, 1.3]
    assert all(torch.equal(v, vectors[i]) for i, (v, _) in enumerate(groups[1]))
    assert groups[2] == [(CAT, 1.0)]


def test_embedding_reference_after_a_space_ends_at_whitespace_and_the_rest_is_text(tokenizer):
    vec = torch.ones(1, 4)
    groups = tokenize_weighted_prompt("a photo embedding:style of a cat", tokenizer, embeddings=_lookup({"style": vec}))
    assert groups[0] == [(A, 1.0), (PHOTO, 1.0)]
    assert len(groups[1]) == 1 and torch.equal(groups[1][0][0], vec[0])
    assert groups[2] == [(539, 1.0), (A, 1.0), (CAT, 1.0)]


def test_embedding_name_with_trailing_comma_is_retried_without_it(tokenizer):
    groups = tokenize_weighted_prompt("embedding:style, cat", tokenizer, embeddings=_lookup({"style": torch.ones(4)}))
    assert len(groups[0]) == 1
    assert groups[1] == [(267, 1.0), (CAT, 1.0)]  # "," then "cat"


def test_unknown_embedding_is_dropped_with_a_warning(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        groups = tokenize_weighted_prompt("embedding:missing cat", tokenizer, embeddings=_lookup({}))
    assert groups == [[(CAT, 1.0)]]
    assert "embedding:missing does not exist" in caplog.text


def test_embedding_of_the_wrong_width_is_ignored_with_a_warning(tokenizer, caplog):
    lookup = _lookup({"sd2style": torch.ones(2, 1024)})
    with caplog.at_level(logging.WARNING):
        groups = tokenize_weighted_prompt("a embedding:sd2style cat", tokenizer, embeddings=lookup, embedding_width=768)
    assert groups == [[(A, 1.0)], [(CAT, 1.0)]]
    assert "width 1024" in caplog.text and "768" in caplog.text


def test_without_a_lookup_embedding_references_are_plain_text(tokenizer):
    groups = tokenize_weighted_prompt("embedding:style", tokenizer)
    assert groups == [[(t, 1.0) for t in tokenizer.encode("embedding:style")]]


def test_embedding_reference_inside_a_word_is_text(tokenizer):
    groups = tokenize_weighted_prompt("xembedding:style", tokenizer, embeddings=_lookup({"style": torch.ones(4)}))
    assert groups == [[(t, 1.0) for t in tokenizer.encode("xembedding:style")]]


def test_embedding_that_does_not_fit_the_chunk_moves_whole_to_the_next(tokenizer):
    vectors = torch.randn(3, 4)
    out = tokenize_prompt("a " * 74 + "embedding:style", tokenizer, bos=BOS, eos=EOS, pad=0,
                          embeddings=_lookup({"style": vectors}))
    first, second = out
    assert [t for t, _ in first] == [BOS] + [A] * 74 + [EOS, 0]
    assert all(torch.equal(second[1 + i][0], vectors[i]) for i in range(3))
    assert [t for t, _ in second[4:6]] == [EOS, 0]


def test_embedding_of_eight_vectors_is_split_at_the_chunk_boundary(tokenizer):
    vectors = torch.randn(8, 4)
    out = tokenize_prompt("a " * 73 + "embedding:style", tokenizer, bos=BOS, eos=EOS, pad=0,
                          embeddings=_lookup({"style": vectors}))
    first, second = out
    assert all(torch.equal(first[74 + i][0], vectors[i]) for i in range(2)) and first[76] == (EOS, 1.0)
    assert all(torch.equal(second[1 + i][0], vectors[2 + i]) for i in range(6)) and second[7] == (EOS, 1.0)
