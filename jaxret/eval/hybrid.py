"""Retrievers made of two: SPAR (a dense retriever + Λ in one dense index), a dense + BM25
hybrid (score-normalized sum), and LaPraDoR's LEDR (cosine × BM25).

SPAR (Chen et al., §4.2): the passage vector is [P(p), P_Λ(p)] and the query vector
[Q(q), μ·Q_Λ(q)], so one inner product is sim(q, p) + μ·sim_Λ(q, p) exactly and one index
search serves it; μ lives on the query side only, so the index does not change when μ does.
The weighted sum [Q(q) + μ·Q_Λ(q)]·[P(p) + P_Λ(p)] keeps the dimension (and mixes the two
spaces). μ is tuned on a dev split over the paper's grid: 0.1 … 1.0 and their reciprocals.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxret.eval import evaluate as ev
from jaxret.index.encode import encode_rows, passage_table
from jaxret.index.mips import RowLayout
from jaxret.index.sharded import ShardedIndex, process_row_range
from jaxret.lexical.bm25 import BM25, BM25Config

Combine = Literal["concat", "sum"]
# LaPraDoR's evaluation encodes queries and documents up to 350 tokens each
# (JetRunner/LaPraDoR code/laprador.py:17-18: q_model / doc_model.max_seq_length = 350).
LEDR_MAX_LENGTH = 350
# LEDR's BM25 is BEIR's: Elasticsearch's defaults (k1 1.2, b 0.75) and its "english" analyzer
# (beir-cellar/beir beir/retrieval/search/lexical/elastic_search.py:109-110 analyzes title and
# text with the language analyzer; :169-173 queries them as best_fields, tie_breaker 0.5).
# Here title and text are one field: the one difference, stated in `describe()`.
LEDR_BM25 = BM25Config(k1=1.2, b=0.75, analyzer="english")
# dpr-scale's grid of μ (spar/spar_weight_tuning.py:132): 0.1 … 1.0 and their reciprocals as
# the authors rounded them. Models whose scores live on another scale take the grid × a
# factor (`--mu-grid-scale`; the dpr-scale README tunes 0.001–0.033 for Contriever / GTR).
MU_GRID: tuple[float, ...] = (
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
    1.1, 1.25, 1.43, 1.67, 2.0, 2.5, 3.33, 5.0, 10.0,
)  # fmt: skip
TUNING_METRICS = ("auto", "top100", "top20", "mrr@10", "ndcg@10", "recall@100")


def scaled_grid(factor: float = 1.0) -> tuple[float, ...]:
    return tuple(round(mu * factor, 10) for mu in MU_GRID)


def combine_queries(q_base: np.ndarray, q_lex: np.ndarray, mu: float, kind: Combine) -> np.ndarray:
    if kind == "concat":
        return np.concatenate([q_base, mu * q_lex], axis=1).astype(np.float32)
    if kind == "sum":
        _same_dim(q_base, q_lex)
        return (q_base + mu * q_lex).astype(np.float32)
    raise ValueError(f"combine={kind!r}; expected 'concat' or 'sum'")


def combine_passages(p_base: np.ndarray, p_lex: np.ndarray, kind: Combine) -> np.ndarray:
    if kind == "concat":
        return np.concatenate([p_base, p_lex], axis=1).astype(np.float32)
    if kind == "sum":
        _same_dim(p_base, p_lex)
        return (p_base + p_lex).astype(np.float32)
    raise ValueError(f"combine={kind!r}; expected 'concat' or 'sum'")


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"combine=sum needs equal dimensions, got {a.shape[1]} and {b.shape[1]}; use concat"
        )


Model = tuple[Any, Any, Any]  # (DualEncoder, params, tokenizer)


def _process_rows(
    model: Model, corpus: Any, mesh: Any, layout: RowLayout, batch_size: int, store: Path
) -> np.ndarray:
    encoder, params, tokenizer = model
    table = passage_table(store, corpus, encoder, tokenizer)
    rows = process_row_range(layout, mesh)
    return encode_rows(encoder, params, table, "passage", mesh, rows, batch_size, desc=None)


def two_model_index(
    base: Model,
    lex: Model,
    corpus: Any,
    mesh: Any,
    kind: Combine = "concat",
    batch_size: int = 128,
    store: str | os.PathLike | None = None,
    dtype: str = "float32",
) -> ShardedIndex:
    """One index of the combined passage vectors; each process encodes its own rows with
    both models (each with its own tokenization and spec)."""
    store = Path(store) if store else ev.default_cache_dir() / "stores" / corpus.content_hash()
    layout = RowLayout.for_mesh(len(corpus), mesh)
    p_base = _process_rows(base, corpus, mesh, layout, batch_size, store)
    p_lex = _process_rows(lex, corpus, mesh, layout, batch_size, store)
    local = combine_passages(p_base, p_lex, kind)
    return ShardedIndex.from_process_rows(local, layout, mesh, dtype)


def tuning_metric(data: ev.EvalData, choice: str = "auto") -> str:
    """The dev metric μ is tuned on. "auto" as the papers: top-100 answer accuracy on QA data
    (dpr-scale spar/spar_weight_tuning.py:135, valid_on_k=100), MRR@10 on MS MARCO, nDCG@10
    on any other BEIR set."""
    if choice != "auto":
        if choice not in TUNING_METRICS:
            raise ValueError(f"tuning metric {choice!r}; expected one of {TUNING_METRICS}")
        return choice
    if data.answers is not None:
        return "top100"
    return "mrr@10" if "msmarco" in data.name.lower() else "ndcg@10"


def tune_weight(
    evaluate_at: Callable[[float], dict[str, float]],
    metric: str,
    grid: Sequence[float] = MU_GRID,
) -> tuple[float, dict[float, float]]:
    """The grid value with the best dev `metric` (the smallest on ties) and every score."""
    scores = {mu: float(evaluate_at(mu)[metric]) for mu in grid}
    best = max(sorted(scores), key=lambda mu: scores[mu])
    return best, scores


def search_combined(
    index: ShardedIndex,
    q_base: np.ndarray,
    q_lex: np.ndarray,
    mu: float,
    kind: Combine,
    data: ev.EvalData,
    k: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    q = combine_queries(q_base, q_lex, mu, kind)
    return ev.search_index(index, q, data.query_ids, data.corpus.ids, k)


# -- dense + BM25 -------------------------------------------------------------------------


def _minmax(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-row min-max normalization of the valid entries to [0, 1]."""
    s = np.where(valid, scores, np.nan)
    lo, hi = np.nanmin(s, 1, keepdims=True), np.nanmax(s, 1, keepdims=True)
    out = (s - lo) / np.where(hi > lo, hi - lo, 1.0)
    return np.where(valid, out, 0.0)


def fuse_normalized(
    dense: tuple[np.ndarray, np.ndarray],
    sparse: tuple[np.ndarray, np.ndarray],
    weight: float,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """norm(dense) + weight · norm(BM25) over the union of both candidate lists; a document
    missing from one list gets that list's minimum (0 after normalization)."""
    (ds, dr), (ss, sr) = dense, sparse
    dn, sn = _minmax(ds, dr >= 0), _minmax(ss, sr >= 0)
    out_s = np.full((len(dr), k), -np.inf, np.float32)
    out_r = np.full((len(dr), k), -1, np.int64)
    for i in range(len(dr)):
        total: dict[int, float] = {}
        for r, v in zip(dr[i], dn[i]):
            if r >= 0:
                total[int(r)] = total.get(int(r), 0.0) + float(v)
        for r, v in zip(sr[i], sn[i]):
            if r >= 0:
                total[int(r)] = total.get(int(r), 0.0) + weight * float(v)
        best = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        out_r[i, : len(best)] = [r for r, _ in best]
        out_s[i, : len(best)] = [v for _, v in best]
    return out_s, out_r


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ledr(
    q: np.ndarray,  # [Q, d] query vectors
    passages: Callable[[np.ndarray], np.ndarray],  # rows → passage vectors
    bm25: BM25,
    data: ev.EvalData,
    depth: int = 1000,
    k: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """LaPraDoR's Lexicon-Enhanced Dense Retrieval: score(q, d) = cos(q, d) × BM25(q, d), with
    BM25 beyond a query's top `depth` documents counted as 0 (the authors' evaluation code).

    The ranking is the full corpus's: positive products first, then every document scoring
    0 (outside the BM25 top `depth`, in row order), then negative products. A document whose
    id is the query's is not a result (BEIR)."""
    n = len(data.corpus)
    depth = min(depth, n)
    bm_scores, bm_rows = bm25.retrieve(data.query_texts, depth)
    qs = unit(q)
    out_s = np.full((len(q), k), -np.inf, np.float32)
    out_r = np.full((len(q), k), -1, np.int64)
    own = {i: data.corpus.row_of.get(qid, -1) for i, qid in enumerate(data.query_ids)}
    for i in range(len(q)):
        valid = bm_rows[i] >= 0
        rows = bm_rows[i][valid]
        keep = rows != own[i]
        rows, bm = rows[keep], bm_scores[i][valid][keep]
        score = (unit(passages(rows)) @ qs[i]) * bm if len(rows) else np.zeros(0)
        pos, neg = score > 0, score < 0
        ranked = list(zip(-score[pos], rows[pos]))
        ranked = [(s, r) for s, r in sorted(ranked)][:k]
        if len(ranked) < k:  # the zero-score documents, in row order
            nonzero = set(rows[pos | neg].tolist()) | {own[i]}
            zeros = (r for r in range(n) if r not in nonzero)
            for r in zeros:
                if len(ranked) >= k:
                    break
                ranked.append((0.0, r))
        if len(ranked) < k:
            ranked += sorted(zip(-score[neg], rows[neg]))[: k - len(ranked)]
        out_r[i, : len(ranked)] = [r for _, r in ranked]
        out_s[i, : len(ranked)] = [-s for s, _ in ranked]
    return out_s, out_r


# -- end-to-end evaluations (the CLI's `eval --lexical-model / --retriever hybrid|ledr`) ------


def _queries(model: Model, texts: list[str], mesh: Any, batch_size: int) -> np.ndarray:
    encoder, params, tokenizer = model
    return ev.encode_queries(encoder, params, tokenizer, texts, mesh, batch_size, progress=False)


def _tuned(
    evaluate_at: Callable[[float], dict[str, float]],
    dev: ev.EvalData | None,
    weight: float | None,
    grid: Sequence[float],
    metric: str = "auto",
) -> tuple[float, dict[str, Any]]:
    if weight is not None:
        return weight, {}
    if dev is None:
        raise ValueError("a weight of 'auto' needs a dev split to tune on (--tune-split)")
    metric = tuning_metric(dev, metric)
    best, scores = tune_weight(evaluate_at, metric, grid)
    return best, {"tuned_on": metric, "dev": {str(k): v for k, v in scores.items()}}


def _spar_index_and_mu(
    base: Model,
    lex: Model,
    test: ev.EvalData,
    dev: ev.EvalData | None,
    mesh: Any,
    mu: float | None,
    kind: Combine,
    k: int,
    batch_size: int,
    store: str | os.PathLike | None,
    grid: Sequence[float],
    metric: str,
) -> tuple[Callable[[ev.EvalData, int], tuple[np.ndarray, np.ndarray]], float, dict[str, Any]]:
    """SPAR's one index of [p, p_Λ] and μ (fixed, or tuned on `dev`'s `metric` at depth k):
    → (search(data, depth), μ, tuning info)."""
    index = two_model_index(base, lex, test.corpus, mesh, kind, batch_size, store)
    embed = lambda data: (
        _queries(base, data.query_texts, mesh, batch_size),
        _queries(lex, data.query_texts, mesh, batch_size),
    )
    dev_queries = embed(dev) if (mu is None and dev is not None) else None

    metrics = ev.metrics_of_rankings(dev) if dev_queries is not None else None

    def evaluate_at(m: float) -> dict[str, float]:
        return metrics(*search_combined(index, *dev_queries, m, kind, dev, k))

    mu, info = _tuned(evaluate_at, dev, mu, grid, metric)
    search = lambda data, depth: search_combined(index, *embed(data), mu, kind, data, depth)
    return search, mu, info


def spar_retrieval(
    base: Model,
    lex: Model,
    test: ev.EvalData,
    dev: ev.EvalData | None,
    mesh: Any,
    mu: float | None = None,
    kind: Combine = "concat",
    k: int = 100,
    batch_size: int = 128,
    store: str | os.PathLike | None = None,
    grid: Sequence[float] = MU_GRID,
    metric: str = "auto",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """SPAR on `test`, μ fixed or (None) tuned on `dev`'s `metric`: one index of [p, p_Λ]."""
    search, mu, info = _spar_index_and_mu(
        base, lex, test, dev, mesh, mu, kind, k, batch_size, store, grid, metric
    )
    scores, rows = search(test, k)
    return scores, rows, {"mu": mu, "combine": kind, **info}


def _fused_with_bm25(
    dense_search: Callable[[ev.EvalData, int], tuple[np.ndarray, np.ndarray]],
    test: ev.EvalData,
    dev: ev.EvalData | None,
    weight: float | None,
    k: int,
    depth: int,
    grid: Sequence[float],
    bm25_config: BM25Config | None,
    metric: str,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """norm(dense) + w · norm(BM25) over each list's top `depth` (`fuse_normalized`), w fixed
    or tuned on `dev`."""
    bm25 = BM25(test.corpus, bm25_config, show_progress=False)
    depth = min(depth, len(test.corpus))

    def lists(data: ev.EvalData) -> tuple[tuple, tuple]:
        s, r = bm25.retrieve(data.query_texts, depth + 1)
        sparse = ev.drop_self_hits(data.query_ids, data.corpus.ids, s, r, depth)
        return dense_search(data, depth), sparse

    dev_lists = lists(dev) if (weight is None and dev is not None) else None
    metrics = ev.metrics_of_rankings(dev) if dev_lists is not None else None
    evaluate_at = lambda w: metrics(*fuse_normalized(*dev_lists, w, k))
    weight, info = _tuned(evaluate_at, dev, weight, grid, metric)
    scores, rows = fuse_normalized(*lists(test), weight, k)
    return scores, rows, {"weight": weight, "depth": depth, "bm25": bm25.describe(), **info}


def hybrid_retrieval(
    model: Model,
    test: ev.EvalData,
    dev: ev.EvalData | None,
    mesh: Any,
    weight: float | None = None,
    k: int = 100,
    depth: int = 1000,
    batch_size: int = 128,
    store: str | os.PathLike | None = None,
    grid: Sequence[float] = MU_GRID,
    bm25_config: BM25Config | None = None,
    metric: str = "auto",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """norm(dense) + w · norm(BM25) over each list's top `depth`, w fixed or tuned on dev."""
    encoder, params, tokenizer = model
    index = ev.dense_index(
        encoder, params, tokenizer, test.corpus, mesh, batch_size, store=store, progress=False
    )

    def dense_search(data: ev.EvalData, depth: int) -> tuple[np.ndarray, np.ndarray]:
        q = _queries(model, data.query_texts, mesh, batch_size)
        return ev.search_index(index, q, data.query_ids, data.corpus.ids, depth)

    return _fused_with_bm25(dense_search, test, dev, weight, k, depth, grid, bm25_config, metric)


def spar_bm25_retrieval(
    base: Model,
    lex: Model,
    test: ev.EvalData,
    dev: ev.EvalData | None,
    mesh: Any,
    mu: float | None = None,
    weight: float | None = None,
    kind: Combine = "concat",
    k: int = 100,
    depth: int = 1000,
    batch_size: int = 128,
    store: str | os.PathLike | None = None,
    mu_grid: Sequence[float] = MU_GRID,
    grid: Sequence[float] = MU_GRID,
    bm25_config: BM25Config | None = None,
    metric: str = "auto",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """SPAR + BM25, the paper's §6.3 (Table 8): SPAR's ranking (μ fixed or tuned on dev, as
    `spar_retrieval`) fused with BM25 the way DPR + BM25 is (`hybrid_retrieval`: normalized
    sum over each list's top `depth`, the BM25 weight fixed or tuned on dev after μ)."""
    search, mu, mu_info = _spar_index_and_mu(
        base, lex, test, dev, mesh, mu, kind, k, batch_size, store, mu_grid, metric
    )
    scores, rows, info = _fused_with_bm25(
        search, test, dev, weight, k, depth, grid, bm25_config, metric
    )
    spar = {"mu": mu, "combine": kind, **{f"mu_{a}": b for a, b in mu_info.items()}}
    return scores, rows, {**spar, **info}


def ledr_retrieval(
    model: Model,
    test: ev.EvalData,
    mesh: Any,
    depth: int = 1000,
    k: int = 100,
    batch_size: int = 128,
    store: str | os.PathLike | None = None,
    bm25_config: BM25Config | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """LEDR with any dense model: its vectors (cosine), BM25 to `depth` (default: BEIR's
    Elasticsearch BM25, `LEDR_BM25`)."""
    encoder, params, tokenizer = model
    bm25 = BM25(test.corpus, bm25_config or LEDR_BM25, show_progress=False)
    index = ev.dense_index(
        encoder, params, tokenizer, test.corpus, mesh, batch_size, store=store, progress=False
    )
    rows_all = index.rows()
    q = _queries(model, test.query_texts, mesh, batch_size)
    scores, rows = ledr(q, lambda r: rows_all[r], bm25, test, depth, k)
    return scores, rows, {"bm25_depth": depth, "bm25": bm25.describe()}
