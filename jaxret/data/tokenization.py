"""Text → fixed-shape int32 token arrays with transformers' fast tokenizers.

Every output has shape [N, max_length] so that jitted encoders compile once. Passages have
three formats:

  pair     ART / DPR: `[CLS] title [SEP] text [SEP]`, every token-type id 0, cut from the end
           of the text (ART's `build_tokens_types_paddings_from_ids`; the title is not cut first)
  hf_pair  transformers' sentence-pair encoding: token types 0 / 1, longest-first truncation
           (for models trained that way)
  join     `title + " " + text` as one sequence (BEIR / sentence-transformers)

What truncation cuts is counted (`Truncation`), never silent: callers report it once.
Note: in transformers 5, `BertTokenizer(vocab_file=...)` ignores the file and maps every
word to [UNK]; tokenizers are therefore always loaded with `from_pretrained(folder)`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

Tokens = dict[str, np.ndarray]  # input_ids, attention_mask, token_type_ids: [N, L] int32
PassageFormat = Literal["pair", "hf_pair", "join"]
PASSAGE_FORMATS = ("pair", "hf_pair", "join")
_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class Truncation:
    """How many rows a tokenization cut to fit `max_length`, and the longest row before."""

    what: str
    max_length: int
    rows: int = 0
    cut: int = 0
    longest: int = 0

    def add(self, full_lengths: Sequence[int] | np.ndarray) -> None:
        lengths = np.asarray(full_lengths, np.int64)
        self.rows += len(lengths)
        self.cut += int((lengths > self.max_length).sum())
        if len(lengths):
            self.longest = max(self.longest, int(lengths.max()))

    def merge(self, other: Truncation) -> None:
        self.rows += other.rows
        self.cut += other.cut
        self.longest = max(self.longest, other.longest)

    def message(self) -> str:
        return (
            f"{self.what}: {self.cut} of {self.rows} rows are longer than {self.max_length} "
            f"tokens and were cut (longest: {self.longest} tokens)"
        )

    def report(self, logger: logging.Logger | None = None) -> None:
        """One WARNING when anything was cut (nothing otherwise)."""
        if self.cut:
            (logger or logging.getLogger(__name__)).warning(self.message())

    def as_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "cut": self.cut, "longest": self.longest}


def load_tokenizer(folder: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{folder}: a fast tokenizer (tokenizer.json) is required")
    return tok


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no [CLS]/[SEP] tokens; "
            "jaxret's retriever encoders are BERT-family"
        )
    return int(cls), int(sep)


def _pack(rows: list[list[int]], max_length: int, types: list[list[int]] | None = None) -> Tokens:
    n = len(rows)
    out = {k: np.zeros((n, max_length), np.int32) for k in _KEYS}
    for i, row in enumerate(rows):
        out["input_ids"][i, : len(row)] = row
        out["attention_mask"][i, : len(row)] = 1
        if types is not None:
            out["token_type_ids"][i, : len(row)] = types[i]
    return out


def _pieces(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _single(tokenizer: Any, texts: list[str], max_length: int, trunc: Truncation) -> Tokens:
    """[CLS] text [SEP], cut from the end of the text."""
    cls, sep = _special_ids(tokenizer)
    pieces = _pieces(tokenizer, texts)
    trunc.add([len(p) + 2 for p in pieces])
    return _pack([[cls] + p[: max_length - 2] + [sep] for p in pieces], max_length)


def _art_pair(
    tokenizer: Any, titles: list[str], texts: list[str], max_length: int, trunc: Truncation
) -> Tokens:
    """ART/DPR: [CLS] title [SEP] text, cut to max_length − 1, then [SEP]; all types 0."""
    cls, sep = _special_ids(tokenizer)
    title_ids, text_ids = _pieces(tokenizer, titles), _pieces(tokenizer, texts)
    rows = [[cls] + a + [sep] + b for a, b in zip(title_ids, text_ids)]
    trunc.add([len(r) + 1 for r in rows])
    return _pack([r[: max_length - 1] + [sep] for r in rows], max_length)


def _hf_pair(
    tokenizer: Any, titles: list[str], texts: list[str], max_length: int, trunc: Truncation
) -> Tokens:
    full = tokenizer(titles, texts)["input_ids"]
    trunc.add([len(r) for r in full])
    enc = tokenizer(
        titles,
        texts,
        max_length=max_length,
        truncation="longest_first",
        padding="max_length",
        return_token_type_ids=True,
        return_attention_mask=True,
    )
    return {k: np.asarray(enc[k], dtype=np.int32) for k in _KEYS}


def _batched(fn: Any, n: int, batch_size: int, desc: str | None, *columns: Sequence[str]) -> Tokens:
    parts = []
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc=desc, disable=desc is None or n <= batch_size, unit="batch"):
        parts.append(fn(*(list(c[s : s + batch_size]) for c in columns)))
    if not parts:
        return {k: np.zeros((0, 0), np.int32) for k in _KEYS}
    return {k: np.concatenate([p[k] for p in parts]) for k in _KEYS}


def tokenize_queries(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    batch_size: int = 4096,
    desc: str | None = None,
    truncation: Truncation | None = None,
) -> Tokens:
    """[CLS] query [SEP] rows [N, max_length]; `truncation` (if given) counts what was cut."""
    trunc = truncation if truncation is not None else Truncation("queries", max_length)
    fn = lambda t: _single(tokenizer, t, max_length, trunc)
    return _batched(fn, len(texts), batch_size, desc, texts)


def tokenize_passages(
    tokenizer: Any,
    titles: Sequence[str],
    texts: Sequence[str],
    max_length: int,
    passage_format: PassageFormat = "pair",
    batch_size: int = 4096,
    desc: str | None = None,
    truncation: Truncation | None = None,
) -> Tokens:
    """Passages in `passage_format` (module docstring) as [N, max_length] rows."""
    if len(titles) != len(texts):
        raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
    trunc = truncation if truncation is not None else Truncation("passages", max_length)
    n = len(texts)
    if passage_format == "pair":
        fn = lambda a, b: _art_pair(tokenizer, a, b, max_length, trunc)
        return _batched(fn, n, batch_size, desc, titles, texts)
    if passage_format == "hf_pair":
        fn = lambda a, b: _hf_pair(tokenizer, a, b, max_length, trunc)
        return _batched(fn, n, batch_size, desc, titles, texts)
    if passage_format == "join":
        joined = [f"{t} {x}".strip() for t, x in zip(titles, texts)]
        fn = lambda t: _single(tokenizer, t, max_length, trunc)
        return _batched(fn, n, batch_size, desc, joined)
    raise ValueError(f"passage_format={passage_format!r}; expected one of {PASSAGE_FORMATS}")
