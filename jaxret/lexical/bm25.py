"""BM25 through `bm25s`: corpus retrieval and pair scoring (LEDR, the SPAR teacher, ART's
bm25 teacher). Tokenization is explicit and recorded: lowercase, a regex for tokens, no
stemming or stopwords unless configured.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxret.data.readers import Corpus


@dataclasses.dataclass(frozen=True)
class BM25Config:
    k1: float = 1.2
    b: float = 0.75
    method: str = "lucene"  # bm25s variants: robertson, atire, bm25l, bm25+, lucene
    token_pattern: str = r"(?u)\b\w+\b"  # every alphanumeric run, single characters included
    lowercase: bool = True
    use_title: bool = True  # index title + " " + text


class BM25:
    def __init__(
        self, corpus: Corpus, config: BM25Config | None = None, show_progress: bool = True
    ):
        import bm25s

        config = config or BM25Config()
        self.config = config
        self.corpus = corpus
        self._pattern = re.compile(config.token_pattern)
        docs = [f"{t} {x}" if config.use_title else x for t, x in zip(corpus.titles, corpus.texts)]
        tokens = [
            self.tokenize(d) for d in tqdm(docs, desc="bm25 tokenize", disable=not show_progress)
        ]
        self._bm25 = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
        self._bm25.index(tokens, show_progress=False)

    def tokenize(self, text: str) -> list[str]:
        return self._pattern.findall(text.lower() if self.config.lowercase else text)

    def describe(self) -> dict[str, Any]:
        """What produced the scores, for run files and result JSON."""
        return {"retriever": "bm25 (bm25s)", **dataclasses.asdict(self.config)}

    def retrieve(
        self, queries: Sequence[str], k: int, show_progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B, k], row ids [B, k]); hits with score 0 (no shared term) get id -1."""
        k = min(k, len(self.corpus))
        ids, scores = self._bm25.retrieve(
            [self.tokenize(q) for q in queries], k=k, show_progress=show_progress, n_threads=0
        )
        ids = np.where(scores > 0, ids, -1).astype(np.int64)
        return scores.astype(np.float32), ids

    def score_pairs(self, queries: Sequence[str], row_ids: np.ndarray) -> np.ndarray:
        """BM25 score of each (query b, row row_ids[b, j]) → [B, K]."""
        row_ids = np.asarray(row_ids)
        out = np.zeros(row_ids.shape, np.float32)
        for b, q in enumerate(queries):
            all_scores = self._bm25.get_scores(self.tokenize(q))
            out[b] = all_scores[row_ids[b]]
        return out
