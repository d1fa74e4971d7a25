"""Passage and query formats against independent references: ART's own tokenization code
(re-stated here) and transformers' tokenizer called directly."""

import numpy as np
import pytest

from jaxret.data.tokenization import Truncation, load_tokenizer, tokenize_passages, tokenize_queries

TITLES = ["Aaron Burr", "", "A very long title " * 10, "Short"]
TEXTS = [
    "aaron burr was the third vice president of the united states " * 3,
    "a passage without a title",
    "text after a long title",
    "x",
]


def art_reference(tok, title, text, max_len):
    """ART's `build_tokens_types_paddings_from_ids` (megatron/data/orqa_wiki_dataset.py):
    [CLS] title [SEP] text, cut to max_len − 1, [SEP], types 0, pad id 0."""
    ids = [tok.cls_token_id] + tok.encode(title, add_special_tokens=False)
    ids += [tok.sep_token_id] + tok.encode(text, add_special_tokens=False)
    ids = ids[: max_len - 1] + [tok.sep_token_id]
    return ids + [0] * (max_len - len(ids))


@pytest.fixture(scope="module")
def tok(minilm):
    return load_tokenizer(minilm)


def test_art_pair_format(tok):
    for max_len in (12, 24, 64):
        out = tokenize_passages(tok, TITLES, TEXTS, max_len, "pair")
        ref = np.array([art_reference(tok, a, b, max_len) for a, b in zip(TITLES, TEXTS)])
        np.testing.assert_array_equal(out["input_ids"], ref)
        assert out["token_type_ids"].max() == 0  # ART: every token type 0
        np.testing.assert_array_equal(out["attention_mask"], (ref != 0).astype(np.int32))
    # The text is cut from its end; the title stays whole when it fits.
    out = tokenize_passages(tok, ["Aaron Burr"], [TEXTS[0]], 16, "pair")
    row = out["input_ids"][0].tolist()
    title = tok.encode("Aaron Burr", add_special_tokens=False)
    assert row[1 : 1 + len(title)] == title and row[1 + len(title)] == tok.sep_token_id
    assert row[-1] == tok.sep_token_id


def test_hf_pair_and_join_equal_the_tokenizer(tok):
    out = tokenize_passages(tok, TITLES, TEXTS, 20, "hf_pair")
    ref = tok(TITLES, TEXTS, max_length=20, truncation="longest_first", padding="max_length")
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        np.testing.assert_array_equal(out[k], np.asarray(ref[k]))
    assert out["token_type_ids"].max() == 1
    joined = [f"{a} {b}".strip() for a, b in zip(TITLES, TEXTS)]
    out = tokenize_passages(tok, TITLES, TEXTS, 20, "join")
    ref = tok(joined, max_length=20, truncation=True, padding="max_length")
    np.testing.assert_array_equal(out["input_ids"], np.asarray(ref["input_ids"]))
    q = tokenize_queries(tok, TEXTS, 10)
    ref = tok(TEXTS, max_length=10, truncation=True, padding="max_length")
    np.testing.assert_array_equal(q["input_ids"], np.asarray(ref["input_ids"]))


def test_truncation_is_counted(tok):
    pair = [len(tok(a, b)["input_ids"]) for a, b in zip(TITLES, TEXTS)]
    joined = [len(tok(f"{a} {b}".strip())["input_ids"]) for a, b in zip(TITLES, TEXTS)]
    for fmt, full in (("pair", pair), ("hf_pair", pair), ("join", joined)):
        trunc = Truncation("p", 16)
        tokenize_passages(tok, TITLES, TEXTS, 16, fmt, truncation=trunc, batch_size=3)
        expected = (4, sum(n > 16 for n in full), max(full))
        assert (trunc.rows, trunc.cut, trunc.longest) == expected, fmt
        assert trunc.cut == 2
    trunc = Truncation("queries", 8)
    tokenize_queries(
        tok, ["one two", "one two three four five six seven eight nine"], 8, truncation=trunc
    )
    assert (trunc.rows, trunc.cut, trunc.longest) == (2, 1, 11)
    assert trunc.message() == (
        "queries: 1 of 2 rows are longer than 8 tokens and were cut (longest: 11 tokens)"
    )
    with pytest.raises(ValueError, match="passage_format"):
        tokenize_passages(tok, ["t"], ["x"], 8, "concat")
