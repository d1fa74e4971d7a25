"""SPAR's analyses of a dense retriever against BM25 (Chen et al., §6): rank-biased overlap of
the two rankings (Table 6, p = 0.9) and retrieval with token-shuffled queries (Table 7)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxret.eval import evaluate as ev
from jaxret.eval.rbo import rbo
from jaxret.lexical.bm25 import BM25


def mean_rbo(rows_a: np.ndarray, rows_b: np.ndarray, p: float = 0.9) -> float:
    """Mean RBO of two [Q, k] rankings of row ids (−1 = no hit, dropped)."""
    values = [
        rbo([int(x) for x in a if x >= 0], [int(x) for x in b if x >= 0], p)
        for a, b in zip(rows_a, rows_b)
    ]
    return float(np.mean(values)) if values else 0.0


def bm25_rows(bm25: BM25, data: ev.EvalData, k: int) -> np.ndarray:
    k = min(k, len(data.corpus))
    scores, rows = bm25.retrieve(data.query_texts, k + 1)
    return ev.drop_self_hits(data.query_ids, data.corpus.ids, scores, rows, k)[1]


def shuffle_tokens(texts: list[str], seed: int = 0) -> list[str]:
    """Each query with its whitespace tokens in a random (seeded) order."""
    out = []
    for i, text in enumerate(texts):
        words = text.split()
        order = np.random.default_rng([seed, i]).permutation(len(words))
        out.append(" ".join(words[j] for j in order))
    return out


def retrieval_and_rbo(
    encoder: Any,
    params: Any,
    tokenizer: Any,
    data: ev.EvalData,
    bm25: BM25,
    mesh: Any,
    batch_size: int = 128,
    k: int = 100,
    store: str | os.PathLike | None = None,
    p: float = 0.9,
) -> dict[str, float]:
    """Retrieval metrics of the dense model on `data`, plus `rbo_bm25`: the mean RBO of its
    top-k ranking with BM25's."""
    scores, rows = ev.dense_search(
        encoder, params, tokenizer, data, mesh, k, batch_size, "float32", store, progress=False
    )
    out = ev.compute_metrics(data, scores, rows)
    out["rbo_bm25"] = mean_rbo(rows, bm25_rows(bm25, data, k), p)
    return out
