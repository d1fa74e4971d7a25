"""Text → fixed-shape int32 token arrays with transformers' fast tokenizers.

Every output has shape [N, max_length] so that jitted encoders compile once.
Note: in transformers 5, `BertTokenizer(vocab_file=...)` ignores the file and maps every
word to [UNK]; tokenizers are therefore always loaded with `from_pretrained(folder)`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

Tokens = dict[str, np.ndarray]  # input_ids, attention_mask, token_type_ids: [N, L] int32
_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def load_tokenizer(folder: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{folder}: a fast tokenizer (tokenizer.json) is required")
    return tok


def _encode(tokenizer: Any, first: list[str], second: list[str] | None, max_length: int) -> Tokens:
    enc = tokenizer(
        first,
        second,
        max_length=max_length,
        truncation="longest_first" if second is not None else True,
        padding="max_length",
        return_token_type_ids=True,
        return_attention_mask=True,
    )
    return {k: np.asarray(enc[k], dtype=np.int32) for k in _KEYS}


def _batched(
    tokenizer: Any,
    first: Sequence[str],
    second: Sequence[str] | None,
    max_length: int,
    batch_size: int,
    desc: str | None,
) -> Tokens:
    n = len(first)
    out = {k: np.zeros((n, max_length), np.int32) for k in _KEYS}
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=desc, disable=desc is None or n <= batch_size, unit="batch"):
        e = min(s + batch_size, n)
        part = _encode(
            tokenizer, list(first[s:e]), None if second is None else list(second[s:e]), max_length
        )
        for k in _KEYS:
            out[k][s:e] = part[k]
    return out


def tokenize_queries(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 4096,
    desc: str | None = None,
) -> Tokens:
    return _batched(tokenizer, texts, None, max_length, batch_size, desc)


def tokenize_passages(
    tokenizer: Any,
    titles: Sequence[str],
    texts: Sequence[str],
    max_length: int,
    passage_format: Literal["pair", "join"] = "pair",
    batch_size: int = 4096,
    desc: str | None = None,
) -> Tokens:
    """`pair`: [CLS] title [SEP] text [SEP] (ART/DPR); `join`: title + " " + text (BEIR/ST)."""
    if len(titles) != len(texts):
        raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
    if passage_format == "pair":
        return _batched(tokenizer, titles, texts, max_length, batch_size, desc)
    if passage_format == "join":
        joined = [f"{t} {x}".strip() for t, x in zip(titles, texts)]
        return _batched(tokenizer, joined, None, max_length, batch_size, desc)
    raise ValueError(f"passage_format={passage_format!r}; expected 'pair' or 'join'")
