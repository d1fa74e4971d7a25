"""Retrieval evaluation of a dense model or BM25 on BEIR and/or QA data."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jaxret.data.readers import (
    Corpus,
    DataError,
    QAExample,
    Qrels,
    find_corpus,
    read_beir_queries,
    read_corpus,
    read_dpr_qa,
    read_qa_jsonl,
    read_qrels,
)
from jaxret.data.tokenization import tokenize_queries
from jaxret.eval import metrics, qa
from jaxret.index.encode import encode_corpus, encode_rows, passage_table
from jaxret.index.sharded import ShardedIndex
from jaxret.lexical.bm25 import BM25, BM25Config
from jaxret.models.dual_encoder import DualEncoder

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalData:
    name: str
    corpus: Corpus
    query_ids: list[str]
    query_texts: list[str]
    qrels: Qrels | None = None  # BEIR judgements
    answers: list[QAExample] | None = None  # QA answers, aligned with query_ids


def default_cache_dir() -> Path:
    root = os.environ.get("JAXRET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jaxret"
    )
    return Path(root)


def load_eval_data(
    data: str | os.PathLike | None = None,
    split: str = "test",
    corpus_path: str | os.PathLike | None = None,
    qa_path: str | os.PathLike | None = None,
    corpus: Corpus | None = None,
    on_missing: str = "error",
) -> EvalData:
    """A BEIR folder (corpus.jsonl[.gz], queries.jsonl, qrels/<split>.tsv, optional
    qa/<split>.jsonl), or a corpus file (BEIR jsonl or DPR tsv) plus a QA file. `corpus`, when
    given, is the already-read corpus (not read again). `on_missing="warn"` drops judgements of
    documents or queries that do not exist (with a warning) instead of refusing them."""
    folder = Path(data) if data else None
    if corpus_path is None:
        if folder is None:
            raise DataError("give a data folder or a corpus file")
        corpus_path = find_corpus(folder)
    corpus_path = Path(corpus_path)
    if corpus is None:
        corpus = read_corpus(corpus_path)

    if qa_path is None and folder is not None:
        for candidate in (folder / "qa" / f"{split}.jsonl", folder / "qa" / f"{split}.csv"):
            if candidate.exists() or Path(f"{candidate}.gz").exists():
                qa_path = candidate
    examples = None
    if qa_path is not None:
        qa_path = Path(qa_path)
        examples = (
            read_dpr_qa(qa_path)
            if qa_path.name.endswith((".csv", ".tsv"))
            else read_qa_jsonl(qa_path)
        )

    qrels = None
    qrels_path = folder / "qrels" / f"{split}.tsv" if folder else None
    if qrels_path is not None and (qrels_path.exists() or Path(f"{qrels_path}.gz").exists()):
        queries = read_beir_queries(folder / "queries.jsonl")
        qrels = read_qrels(qrels_path, set(queries.ids), corpus.row_of, on_missing)
        text_of = dict(zip(queries.ids, queries.texts))
        # Unjudged queries are skipped (BEIR): only those in the qrels are searched.
        qids = [q for q in queries.ids if q in qrels]
        texts = [text_of[q] for q in qids]
    elif examples is not None:
        qids, texts = [e.id for e in examples], [e.question for e in examples]
    else:
        raise DataError(f"{folder}: no qrels/{split}.tsv and no QA file: nothing to evaluate")

    if examples is not None:
        by_id = {e.id: e for e in examples}
        if qrels is not None:
            missing = [q for q in qids if q not in by_id]
            if missing:
                raise DataError(f"{qa_path}: no answers for judged query ids {missing[:5]}")
        examples = [by_id[q] for q in qids]
    name = folder.name if folder else corpus_path.stem
    return EvalData(name, corpus, qids, texts, qrels, examples)


def split_of(question_id: str, fractions: tuple[float, float, float]) -> str:
    """Stable train/dev/test assignment from a hash of the id (order-independent)."""
    u = int(hashlib.sha1(question_id.encode()).hexdigest()[:8], 16) / 16**8
    if u < fractions[0]:
        return "train"
    return "dev" if u < fractions[0] + fractions[1] else "test"


def restrict(data: EvalData, keep: list[int]) -> EvalData:
    """The queries at positions `keep` (same corpus)."""
    ids = [data.query_ids[i] for i in keep]
    return EvalData(
        data.name,
        data.corpus,
        ids,
        [data.query_texts[i] for i in keep],
        {q: data.qrels[q] for q in ids} if data.qrels is not None else None,
        [data.answers[i] for i in keep] if data.answers is not None else None,
    )


def hash_split(data: EvalData, dev_fraction: float) -> tuple[EvalData, EvalData]:
    """(dev, test): the queries divided by a hash of their id, for a set that has one split
    only; the same id always lands on the same side."""
    if not 0 < dev_fraction < 1:
        raise ValueError(f"hash split fraction {dev_fraction} must be in (0, 1)")
    fractions = (0.0, dev_fraction, 1.0 - dev_fraction)
    side = [split_of(q, fractions) for q in data.query_ids]
    dev = restrict(data, [i for i, s in enumerate(side) if s == "dev"])
    test = restrict(data, [i for i, s in enumerate(side) if s == "test"])
    return dev, test


def subsample(
    data: EvalData, max_queries: int | None, max_docs: int | None, seed: int = 0
) -> EvalData:
    """A smaller, self-consistent problem: the first `max_queries` queries, every document
    they judge relevant, then other documents (seeded) up to `max_docs`."""
    n_q = len(data.query_ids) if not max_queries else min(max_queries, len(data.query_ids))
    qids, texts = data.query_ids[:n_q], data.query_texts[:n_q]
    answers = data.answers[:n_q] if data.answers is not None else None
    corpus = data.corpus
    qrels = {q: data.qrels[q] for q in qids} if data.qrels is not None else None
    if max_docs and max_docs < len(corpus):
        keep = {corpus.row_of[d] for q in qids for d in (qrels or {}).get(q, {})}
        rest = np.random.RandomState(seed).permutation(len(corpus))
        for r in rest:
            if len(keep) >= max_docs:
                break
            keep.add(int(r))
        corpus = corpus.subset(sorted(keep))
        if qrels is not None:
            qrels = {
                q: {d: s for d, s in r.items() if d in corpus.row_of} for q, r in qrels.items()
            }
    return EvalData(data.name, corpus, qids, texts, qrels, answers)


def dense_index(
    encoder: DualEncoder,
    params: Any,
    tokenizer: Any,
    corpus: Corpus,
    mesh: Mesh,
    batch_size: int = 128,
    index_dtype: str = "float32",
    store: str | os.PathLike | None = None,
    step: int = 0,
    progress: bool = True,
) -> ShardedIndex:
    corpus_hash = corpus.content_hash()
    store = Path(store) if store else default_cache_dir() / "stores" / corpus_hash
    table = passage_table(store, corpus, encoder, tokenizer)
    return encode_corpus(
        encoder,
        params,
        table,
        mesh,
        batch_size,
        index_dtype,
        corpus_hash=corpus_hash,
        step=step,
        desc="encoding corpus" if progress else None,
    )


def drop_self_hits(
    query_ids: list[str], doc_ids: list[str], scores: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """BEIR's rule for corpora that contain the queries (Quora, ArguAna, CQADupStack): a hit
    whose document id equals the query id is not a result. Given k + 1 hits per query, drops
    such hits and keeps the first k of the rest ([Q, k]; row −1 / score −inf = no hit)."""
    rows = np.asarray(rows)
    # Only the ids of rows that were hit are read (a stored corpus decodes them on access).
    id_of = {int(r): doc_ids[int(r)] for r in np.unique(rows[rows >= 0])}
    own = np.array(
        [[r >= 0 and id_of[int(r)] == q for r in row] for q, row in zip(query_ids, rows)], bool
    ).reshape(rows.shape)
    order = np.argsort(own, axis=1, kind="stable")[:, :k]  # self hits move to the end
    out_rows = np.take_along_axis(np.where(own, -1, rows), order, 1)
    out_scores = np.take_along_axis(np.where(own, -np.inf, scores), order, 1)
    out_scores = np.where(out_rows < 0, -np.inf, out_scores)
    return out_scores.astype(np.float32), out_rows


def search_index(
    index: ShardedIndex,
    queries: np.ndarray,
    query_ids: list[str],
    doc_ids: list[str],
    k: int = 100,
    batch_size: int = 256,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k [Q, k] of every query, searched k + 1 deep so that dropping a query's own
    document (drop_self_hits) still leaves k hits."""
    k = min(k, index.num_rows)
    deep = min(k + 1, index.num_rows)
    scores, rows = index.search_batched(queries, deep, batch_size, desc=desc)
    return drop_self_hits(query_ids, doc_ids, scores, rows, k)


def encode_queries(
    encoder: DualEncoder,
    params: Any,
    tokenizer: Any,
    texts: list[str],
    mesh: Mesh,
    batch_size: int = 128,
    progress: bool = True,
) -> np.ndarray:
    tokens = tokenize_queries(tokenizer, texts, encoder.spec.max_query_length)
    return encode_rows(
        encoder,
        params,
        tokens,
        "query",
        mesh,
        range(len(texts)),
        batch_size,
        desc="encoding queries" if progress else None,
    )


def dense_search(
    encoder: DualEncoder,
    params: Any,
    tokenizer: Any,
    data: EvalData,
    mesh: Mesh,
    k: int = 100,
    batch_size: int = 128,
    index_dtype: str = "float32",
    store: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    index = dense_index(
        encoder,
        params,
        tokenizer,
        data.corpus,
        mesh,
        batch_size,
        index_dtype,
        store,
        progress=progress,
    )
    q = encode_queries(encoder, params, tokenizer, data.query_texts, mesh, batch_size, progress)
    return search_index(
        index, q, data.query_ids, data.corpus.ids, k, desc="searching" if progress else None
    )


def bm25_search(
    data: EvalData, k: int = 100, config: BM25Config | None = None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    bm25 = BM25(data.corpus, config or BM25Config(), show_progress=progress)
    k = min(k, len(data.corpus))
    scores, rows = bm25.retrieve(data.query_texts, k + 1, show_progress=progress)
    scores, rows = drop_self_hits(data.query_ids, data.corpus.ids, scores, rows, k)
    return scores, rows, bm25.describe()


def match_answers(
    data: EvalData,
    rows: np.ndarray,
    part: slice = slice(None),
    matcher: qa.AnswerMatcher | None = None,
) -> qa.Matching | None:
    """The answer hits [Q', K] of the questions `part` of `data` retrieving `rows` [Q', K]
    (`matcher`'s workers, or at once); None when `data` has no answers."""
    if data.answers is None:
        return None
    answers = data.answers[part]
    args = ([e.answers for e in answers], [e.match_type for e in answers], rows, data.corpus.texts)
    return matcher.submit(*args) if matcher else qa.match_now(*args)


def metrics_of_rankings(data: EvalData) -> Callable[[np.ndarray, np.ndarray], dict[str, float]]:
    """`compute_metrics` of `data` for many rankings (a weight grid), each question's answer
    matched in each retrieved passage once (`qa.RememberedHits`)."""
    if data.answers is None:
        return lambda scores, rows: compute_metrics(data, scores, rows)
    hits = qa.RememberedHits(
        [e.answers for e in data.answers], [e.match_type for e in data.answers], data.corpus.texts
    )
    return lambda scores, rows: compute_metrics(data, scores, rows, hits.matrix(rows))


def compute_metrics(
    data: EvalData, scores: np.ndarray, rows: np.ndarray, hits: np.ndarray | None = None
) -> dict[str, float]:
    """BEIR metrics when judged, top-k answer accuracy when answers are known (`hits`:
    `match_answers`' result, matched now if not given)."""
    out: dict[str, float] = {}
    if data.qrels is not None:
        run = metrics.run_from_arrays(data.query_ids, data.corpus.ids, scores, rows)
        out.update(metrics.evaluate(data.qrels, run))
    if data.answers is not None:
        if hits is None:
            hits = match_answers(data, rows).result()
        ks = [k for k in (1, 5, 20, 100) if k <= rows.shape[1]]
        out.update(qa.top_k_accuracy(hits, ks))
        out.setdefault("num_queries", float(len(data.answers)))
    return out
