"""DPR top-k answer accuracy: does a retrieved passage contain an answer?

`has_answer` reproduces DPR's semantics: Unicode NFD, DrQA's simple tokenizer
(runs of letters/numbers/marks, or any single non-space character), lowercased, and the
answer's token sequence found contiguously in the passage's. In regex mode (CuratedTREC) the
answer is a pattern searched case-insensitively in the NFD passage text.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import re
import signal
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex

log = logging.getLogger(__name__)

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
    cache: int = 4096,
) -> np.ndarray:
    """[Q, K] bool: passage j of question i contains one of its answers (= has_answer).

    A passage retrieved again by a nearby question is tokenized once: the last `cache`
    passages are kept (a tokenized 100-word passage is ~19 KB of Python objects: keeping
    every one of NQ dev's up to 0.9M retrieved passages would hold up to ~16 GB)."""
    out = np.zeros(rows.shape, bool)
    nfd: dict[int, str] = {}
    passages: dict[int, _Passage] = {}
    for i, (ans, mt) in enumerate(zip(answers, match_types)):
        if mt not in ("string", "regex"):
            raise ValueError(f"match_type {mt!r}; expected 'string' or 'regex'")
        ans_tokens = [simple_tokens(_nfd(a)) for a in ans] if mt == "string" else None
        if len(nfd) > cache:
            nfd.clear()
            passages.clear()
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


class RememberedHits:
    """`hits_matrix` for many rankings of the same questions (SPAR's μ grid, a fusion weight
    grid: 19 rankings of NQ dev's 8,757 questions × 100 passages, mostly the same pairs),
    each (question, passage row) matched once and remembered."""

    def __init__(
        self, answers: Sequence[Sequence[str]], match_types: Sequence[str], texts: Sequence[str]
    ):
        self.answers, self.match_types, self.texts = answers, match_types, texts
        self._known: list[dict[int, bool]] = [{} for _ in answers]
        self.matched = 0  # pairs matched so far

    def matrix(self, rows: np.ndarray) -> np.ndarray:  # rows [Q, K] → hits [Q, K]
        todo = np.full(rows.shape, -1, rows.dtype)  # the pairs not matched yet, once each
        for i, q in enumerate(rows):
            new = {int(r) for r in q if r >= 0} - self._known[i].keys()
            for j, r in enumerate(q):
                if int(r) in new:
                    todo[i, j] = r
                    new.discard(int(r))
        found = hits_matrix(self.answers, self.match_types, todo, self.texts)
        self.matched += int((todo >= 0).sum())
        out = np.zeros(rows.shape, bool)
        for i, q in enumerate(rows):
            seen = self._known[i]
            for j in np.flatnonzero(todo[i] >= 0):
                seen[int(todo[i, j])] = bool(found[i, j])
            out[i] = [r >= 0 and seen[int(r)] for r in q]
        return out


def _ignore_stop_signals() -> None:
    # SLURM signals every process of the job step, these workers too: they finish the
    # matching a SIGTERM'd run still needs (its last evaluation) and end with their parent.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _portable(rows: np.ndarray, texts: Sequence[str]) -> tuple[np.ndarray, Sequence[str]]:
    """(rows, texts) to send to a worker: a stored corpus's texts as the files it maps
    (`data.strings.Strings` pickles so), any other sequence as the retrieved texts only."""
    from jaxret.data.strings import Strings

    if isinstance(texts, Strings):
        return rows, texts
    unique, inverse = np.unique(rows, return_inverse=True)
    local = np.where(rows < 0, -1, inverse.reshape(rows.shape))
    return local, [texts[int(r)] if r >= 0 else "" for r in unique]


def workers_for(setting: int, platform: str) -> int:
    """`eval.answer_workers`: ≥ 0 as given; −1 (auto) none where the devices are the host's
    CPU cores (the workers would take the training's), else half the cores this process may
    run on, at most 8 (NQ dev's 0.9M passages in ~10–20 s, beside a few steps)."""
    if setting >= 0:
        return setting
    if setting != -1:
        raise ValueError(f"eval.answer_workers={setting}; expected ≥ 0, or -1 (auto)")
    if platform == "cpu":
        return 0
    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


class Matching:
    """Answer hits being found: `done()` without waiting, `result()` the [Q, K] matrix."""

    def __init__(self, parts: list[cf.Future | np.ndarray], redo: list[tuple]):
        self._parts, self._redo = parts, redo

    def done(self, timeout: float = 0.0) -> bool:
        """Whether every part is matched, after waiting up to `timeout` seconds."""
        futures = [p for p in self._parts if isinstance(p, cf.Future)]
        return not cf.wait(futures, timeout=timeout).not_done if futures else True

    def result(self) -> np.ndarray:
        out = []
        for part, args in zip(self._parts, self._redo):
            if isinstance(part, cf.Future):
                try:
                    part = part.result()
                except cf.process.BrokenProcessPool as e:  # a worker killed (OOM, signal)
                    log.warning("answer matching worker lost (%s): matched here instead", e)
                    part = hits_matrix(*args)
            out.append(part)
        return np.concatenate(out)


def match_now(
    answers: Sequence[Sequence[str]],
    match_types: Sequence[str],
    rows: np.ndarray,  # [Q, K]
    texts: Sequence[str],
) -> Matching:
    """`hits_matrix` in the calling thread, as a done `Matching`."""
    args = (answers, match_types, rows, texts)
    return Matching([hits_matrix(*args)], [args])


class AnswerMatcher:
    """`hits_matrix` in `workers` worker processes, beside the caller's work.

    DPR's answer matching is Python over every retrieved passage: NQ dev's 8,757 questions ×
    100 passages is ~0.9M passages tokenized, ~1–2 minutes on one core (`python
    benchmarks/answer_matching.py`), a stall of every process at every dev evaluation if the
    training thread did it. ART's released code splits it over its ranks and 2 pool workers
    per rank (qa_validation.py:54, `--num-workers 2` in
    examples/zero-shot-retriever-training/art-nq-T0-3B.sh:89) and training waits; here the
    questions are split over `workers` spawned processes (no JAX in them: this module, numpy
    and the store's `Strings`), which run while training goes on. workers = 0: matched in
    the calling thread, at once."""

    def __init__(self, workers: int):
        if workers < 0:
            raise ValueError(f"workers={workers}; expected ≥ 0")
        self.workers = workers
        self._pool: cf.ProcessPoolExecutor | None = None

    def submit(
        self,
        answers: Sequence[Sequence[str]],
        match_types: Sequence[str],
        rows: np.ndarray,  # [Q, K] retrieved row ids, -1 = none
        texts: Sequence[str],
    ) -> Matching:
        if self.workers == 0 or len(rows) == 0:
            return match_now(answers, match_types, rows, texts)
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),  # JAX's threads: no fork
                initializer=_ignore_stop_signals,
            )
        parts, redo = [], []
        for chunk in np.array_split(np.arange(len(rows)), min(self.workers, len(rows))):
            a, b = int(chunk[0]), int(chunk[-1]) + 1
            local_rows, local_texts = _portable(rows[a:b], texts)
            args = (list(answers[a:b]), list(match_types[a:b]), local_rows, local_texts)
            try:
                parts.append(self._pool.submit(hits_matrix, *args))
            except cf.process.BrokenProcessPool as e:
                log.warning("answer matching workers lost (%s): matched here instead", e)
                parts.append(hits_matrix(*args))
            redo.append(args)
        return Matching(parts, redo)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def top_k_accuracy(hits: np.ndarray, ks: Sequence[int] = (1, 5, 20, 100)) -> dict[str, float]:
    """Fraction of questions with an answer-bearing passage within the first k."""
    first = np.where(hits.any(1), hits.argmax(1), np.iinfo(np.int64).max)
    return {f"top{k}": float(np.mean(first < k)) for k in ks}
