"""ART's data: a corpus, training questions (nothing else), dev/test evaluation sets, and the
per-question sparse lists of the bm25 / oracle teachers. Deterministic batches from the seed."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from jaxret.data.readers import Corpus, DataError, read_questions
from jaxret.eval.evaluate import EvalData, load_eval_data
from jaxret.lexical.bm25 import BM25, BM25Config


@dataclasses.dataclass
class ArtData:
    corpus: Corpus
    train_ids: list[str]
    train_questions: list[str]
    dev: EvalData
    test: EvalData | None
    qrels: dict[str, dict[str, int]] | None  # for the oracle teacher (tests)


def split_of(question_id: str, fractions: tuple[float, float, float]) -> str:
    """Stable train/dev/test assignment from a hash of the id (order-independent)."""
    u = int(hashlib.sha1(question_id.encode()).hexdigest()[:8], 16) / 16**8
    if u < fractions[0]:
        return "train"
    return "dev" if u < fractions[0] + fractions[1] else "test"


def _restrict(data: EvalData, keep: list[int]) -> EvalData:
    ids = [data.query_ids[i] for i in keep]
    return EvalData(
        data.name,
        data.corpus,
        ids,
        [data.query_texts[i] for i in keep],
        {q: data.qrels[q] for q in ids} if data.qrels is not None else None,
        [data.answers[i] for i in keep] if data.answers is not None else None,
    )


def _smaller_corpus(data: EvalData, max_docs: int, seed: int) -> EvalData:
    """A seeded random subset of documents, and the questions judged relevant to one of them
    (all questions when there are no qrels)."""
    rows = sorted(np.random.default_rng(seed).permutation(len(data.corpus))[:max_docs].tolist())
    corpus = data.corpus.subset(rows)
    out = EvalData(data.name, corpus, data.query_ids, data.query_texts, data.qrels, data.answers)
    if data.qrels is None:
        return out
    out.qrels = {
        q: {d: r for d, r in j.items() if d in corpus.row_of} for q, j in data.qrels.items()
    }
    keep = [i for i, q in enumerate(data.query_ids) if any(v > 0 for v in out.qrels[q].values())]
    return _restrict(out, keep)


def load_art_data(cfg: Any) -> ArtData:
    """cfg: dir, split, split_fractions, train_questions, max_docs, max_eval_questions, ..."""
    full = load_eval_data(cfg.dir, cfg.split)
    if cfg.max_docs and cfg.max_docs < len(full.corpus):
        full = _smaller_corpus(full, cfg.max_docs, seed=0)
    if cfg.train_questions:
        questions = read_questions(Path(cfg.train_questions))
        train_ids = [f"train-{i}" for i in range(len(questions))]
        dev, test = full, None
    else:
        fractions = tuple(cfg.split_fractions)
        if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
            raise DataError(f"data.split_fractions {fractions} must be three numbers summing to 1")
        groups: dict[str, list[int]] = {"train": [], "dev": [], "test": []}
        for i, qid in enumerate(full.query_ids):
            groups[split_of(qid, fractions)].append(i)
        train_ids = [full.query_ids[i] for i in groups["train"]]
        questions = [full.query_texts[i] for i in groups["train"]]
        dev, test = _restrict(full, groups["dev"]), _restrict(full, groups["test"])
    if cfg.max_eval_questions:
        dev = _restrict(dev, list(range(min(cfg.max_eval_questions, len(dev.query_ids)))))
        if test is not None:
            test = _restrict(test, list(range(min(cfg.max_eval_questions, len(test.query_ids)))))
    if not questions:
        raise DataError("no training questions")
    return ArtData(full.corpus, train_ids, questions, dev, test, full.qrels)


def sparse_teacher_table(data: ArtData, kind: str, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per training question: rows [Q, M] (−1 = none) and scores [Q, M].

    bm25: its top-M rows and scores (unlisted rows score 0, like a document without a shared
    term). oracle: the question's judged rows with their relevance × margin."""
    n = len(data.train_questions)
    if kind == "bm25":
        bm25 = BM25(data.corpus, BM25Config(k1=cfg.bm25_k1, b=cfg.bm25_b), show_progress=False)
        scores, rows = bm25.retrieve(data.train_questions, cfg.bm25_top, show_progress=False)
        return rows.astype(np.int32), np.where(rows >= 0, scores, 0.0).astype(np.float32)
    if kind == "oracle":
        if data.qrels is None:
            raise DataError("the oracle teacher needs qrels")
        lists = [
            [(data.corpus.row_of[d], rel) for d, rel in data.qrels.get(q, {}).items() if rel > 0]
            for q in data.train_ids
        ]
        m = max(1, max(len(x) for x in lists))
        rows = np.full((n, m), -1, np.int32)
        scores = np.zeros((n, m), np.float32)
        for i, pairs in enumerate(lists):
            for j, (r, rel) in enumerate(pairs):
                rows[i, j], scores[i, j] = r, rel * cfg.oracle_margin
        return rows, scores
    raise ValueError(f"no sparse table for teacher {kind!r}")


def batch_indices(step: int, num_questions: int, batch_size: int, seed: int) -> np.ndarray:
    """Question indices of global batch `step`: a fresh seeded permutation per epoch, so the
    data position is the step alone (exact resume). Short final batches wrap around."""
    per_epoch = max(1, num_questions // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_questions)
    idx = perm[pos * batch_size : (pos + 1) * batch_size]
    if len(idx) < batch_size:
        idx = np.concatenate([idx, perm[: batch_size - len(idx)]])
    return idx
