"""DPR top-k answer accuracy: does a retrieved passage contain an answer?

`has_answer` reproduces DPR's semantics: Unicode NFD, DrQA's simple tokenizer
(runs of letters/numbers/marks, or any single non-space character), lowercased, and the
answer's token sequence found contiguously in the passage's. In regex mode (CuratedTREC) the
answer is a pattern searched case-insensitively in the NFD passage text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex

_TOKEN = regex.compile(
    r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
    flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE,
)


def simple_tokens(text: str) -> list[str]:
    return [m.group().lower() for m in _TOKEN.finditer(text)]


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def _regex_match(text: str, pattern: str) -> bool:
    try:
        compiled = re.compile(pattern, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
    except re.error:
        return False  # DPR treats an invalid pattern as no match
    return compiled.search(text) is not None


class _Passage:
    """Tokens of one passage plus where each token starts, for fast sequence matching."""

    def __init__(self, text: str):
        self.tokens = simple_tokens(text)
        self.starts: dict[str, list[int]] = {}
        for i, t in enumerate(self.tokens):
            self.starts.setdefault(t, []).append(i)

    def contains(self, answer: Sequence[str]) -> bool:
        n = len(answer)
        if n == 0:  # as in DPR: an answer without tokens matches everything
            return True
        return any(self.tokens[i : i + n] == answer for i in self.starts.get(answer[0], ()))


def has_answer(answers: Sequence[str], text: str, match_type: str = "string") -> bool:
    text = _nfd(text)
    if match_type == "regex":
        return any(_regex_match(text, _nfd(a)) for a in answers)
    if match_type != "string":
        raise ValueError(f"match_type {match_type!r}; expected 'string' or 'regex'")
    passage = _Passage(text)
    return any(passage.contains(simple_tokens(_nfd(a))) for a in answers)


def hits_matrix(
    answers: Sequence[Sequence[str]],
    match_types: Sequence[str],
    rows: np.ndarray,  # [Q, K] retrieved row ids, -1 = none
    texts: Sequence[str],
) -> np.ndarray:
    """[Q, K] bool: passage j of question i contains one of its answers (= has_answer).

    Each passage is normalized and tokenized once, however often it is retrieved."""
    out = np.zeros(rows.shape, bool)
    nfd: dict[int, str] = {}
    passages: dict[int, _Passage] = {}
    for i, (ans, mt) in enumerate(zip(answers, match_types)):
        if mt not in ("string", "regex"):
            raise ValueError(f"match_type {mt!r}; expected 'string' or 'regex'")
        ans_tokens = [simple_tokens(_nfd(a)) for a in ans] if mt == "string" else None
        for j, r in enumerate(rows[i]):
            if r < 0:
                continue
            r = int(r)
            if r not in nfd:
                nfd[r] = _nfd(texts[r])
            if mt == "regex":
                out[i, j] = any(_regex_match(nfd[r], _nfd(a)) for a in ans)
            else:
                if r not in passages:
                    passages[r] = _Passage(nfd[r])
                out[i, j] = any(passages[r].contains(a) for a in ans_tokens)
    return out


def top_k_accuracy(hits: np.ndarray, ks: Sequence[int] = (1, 5, 20, 100)) -> dict[str, float]:
    """Fraction of questions with an answer-bearing passage within the first k."""
    first = np.where(hits.any(1), hits.argmax(1), np.iinfo(np.int64).max)
    return {f"top{k}": float(np.mean(first < k)) for k in ks}
