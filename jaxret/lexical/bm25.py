"""BM25 through `bm25s`: corpus retrieval and pair scoring (LEDR, the SPAR teacher, ART's
bm25 teacher). Tokenization is explicit and recorded in `describe()`:

  analyzer "none"     lowercase, every alphanumeric run a token (no stemming, no stop words)
  analyzer "english"  Lucene's EnglishAnalyzer, which Pyserini (SPAR's BM25 teacher) and
                      Elasticsearch's "english" analyzer (BEIR's BM25, LaPraDoR's LEDR) use:
                      tokens with inner apostrophes kept, possessive 's removed, lowercase,
                      Lucene's 33 English stop words removed, Porter stemming (PyStemmer's
                      "porter", the original algorithm Lucene's PorterStemFilter implements).
                      The difference that remains: Lucene's StandardTokenizer follows
                      Unicode word breaks (UAX #29), here a regex.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxret.data.readers import Corpus

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET (= the classic StopAnalyzer set).
LUCENE_ENGLISH_STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their "
    "then there these they this to was will with".split()
)
ANALYZERS = ("none", "english")
_ENGLISH_TOKEN = r"(?u)\b\w+(?:['’]\w+)*\b"  # "don't" and "o'neill" stay whole


@dataclasses.dataclass(frozen=True)
class BM25Config:
    k1: float = 1.2
    b: float = 0.75
    method: str = "lucene"  # bm25s variants: robertson, atire, bm25l, bm25+, lucene
    token_pattern: str = r"(?u)\b\w+\b"  # every alphanumeric run, single characters included
    lowercase: bool = True
    use_title: bool = True  # index title + " " + text
    analyzer: str = "none"  # none | english (see the module docstring)

    def __post_init__(self) -> None:
        if self.analyzer not in ANALYZERS:
            raise ValueError(f"bm25 analyzer {self.analyzer!r}; expected one of {ANALYZERS}")


def english_analyzer() -> Any:
    """text → tokens as Lucene's EnglishAnalyzer (up to the tokenizer, see above)."""
    import Stemmer

    stem = Stemmer.Stemmer("porter").stemWords
    pattern = re.compile(_ENGLISH_TOKEN)

    def analyze(text: str) -> list[str]:
        tokens = pattern.findall(text)
        # EnglishPossessiveFilter runs before lowercasing: trailing 's / ’s / 'S.
        tokens = [t[:-2] if t[-2:] in ("'s", "’s", "'S", "’S") else t for t in tokens]
        tokens = [t.lower() for t in tokens]
        return stem([t for t in tokens if t not in LUCENE_ENGLISH_STOP_WORDS])

    return analyze


class BM25:
    """BM25 over `corpus`. The index is built on first use (`retrieve`, `score_pairs`,
    `build`): a run whose labels are already in the store never tokenizes the corpus."""

    def __init__(
        self, corpus: Corpus, config: BM25Config | None = None, show_progress: bool = True
    ):
        config = config or BM25Config()
        self.config = config
        self.corpus = corpus
        self.show_progress = show_progress
        self._pattern = re.compile(config.token_pattern)
        self._english = english_analyzer() if config.analyzer == "english" else None
        self._index: Any = None

    def build(self) -> BM25:
        """Builds the index now (before forking workers that should share it)."""
        if self._index is None:
            import bm25s

            config, corpus = self.config, self.corpus
            docs = (
                f"{t} {x}" if config.use_title else x for t, x in zip(corpus.titles, corpus.texts)
            )
            bar = tqdm(
                docs, desc="bm25 tokenize", total=len(corpus), disable=not self.show_progress
            )
            tokens = [self.tokenize(d) for d in bar]
            index = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
            index.index(tokens, show_progress=False)
            self._index = index
        return self

    def tokenize(self, text: str) -> list[str]:
        if self._english is not None:
            return self._english(text)
        return self._pattern.findall(text.lower() if self.config.lowercase else text)

    def describe(self) -> dict[str, Any]:
        """What produced the scores, for run files and result JSON."""
        fields = "title + text, one field" if self.config.use_title else "text"
        return {"retriever": "bm25 (bm25s)", **dataclasses.asdict(self.config), "fields": fields}

    def retrieve(
        self, queries: Sequence[str], k: int, show_progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B, k], row ids [B, k]); hits with score 0 (no shared term) get id -1."""
        k = min(k, len(self.corpus))
        ids, scores = self.build()._index.retrieve(
            [self.tokenize(q) for q in queries], k=k, show_progress=show_progress, n_threads=0
        )
        ids = np.where(scores > 0, ids, -1).astype(np.int64)
        return scores.astype(np.float32), ids

    def score_pairs(self, queries: Sequence[str], row_ids: np.ndarray) -> np.ndarray:
        """BM25 score of each (query b, row row_ids[b, j]) → [B, K]."""
        row_ids = np.asarray(row_ids)
        out = np.zeros(row_ids.shape, np.float32)
        index = self.build()._index
        for b, q in enumerate(queries):
            all_scores = index.get_scores(self.tokenize(q))
            out[b] = all_scores[row_ids[b]]
        return out
