"""ART's data: a corpus, training questions (nothing else), dev/test evaluation sets, and the
per-question sparse lists of the bm25 / oracle teachers. Deterministic batches from the seed."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from jaxret.data.corpus_text import stored_corpus
from jaxret.data.readers import Corpus, DataError, find_corpus, read_qrels, read_questions
from jaxret.eval.evaluate import EvalData, load_eval_data, split_of
from jaxret.eval.evaluate import restrict as _restrict
from jaxret.lexical.bm25 import BM25, BM25Config

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ArtData:
    corpus: Corpus
    train_ids: list[str]
    train_questions: list[str]
    dev: EvalData
    test: EvalData | None
    qrels: dict[str, dict[str, int]] | None  # for the oracle teacher (tests)


def _smaller_corpus(data: EvalData, max_docs: int, seed: int) -> EvalData:
    """A seeded random subset of documents, and the questions judged relevant to one of them
    (all questions when there are no qrels)."""
    rows = sorted(np.random.default_rng(seed).permutation(len(data.corpus))[:max_docs].tolist())
    corpus = data.corpus.subset(rows)
    out = EvalData(data.name, corpus, data.query_ids, data.query_texts, data.qrels, data.answers)
    if data.qrels is None:
        return out
    return _on_corpus(out, corpus)


def _eval_set(cfg: Any, split: str, corpus: Corpus | None) -> EvalData:
    """A split name of `cfg.dir` (qa/<split>.jsonl|csv, qrels/<split>.tsv) or a QA file path."""
    path = Path(split)
    if path.suffix in (".jsonl", ".csv", ".tsv", ".gz") and path.is_file():
        return load_eval_data(cfg.dir, path.stem, qa_path=path, corpus=corpus)
    return load_eval_data(cfg.dir, split, corpus=corpus)


def _cap(data: EvalData, n: int) -> EvalData:
    return _restrict(data, list(range(min(n, len(data.query_ids))))) if n else data


def load_art_data(cfg: Any, store: str | Path | None = None) -> ArtData:
    """Training questions, a dev set (model selection) and a test set (reported once). The
    corpus is read from `store`'s text table when `jaxret prepare` wrote one for this
    version of the corpus file (memory-mapped, hashed once), else from the file.

    cfg.protocol:
      "files"       train on `train_questions` (a questions file: BEIR queries, QA jsonl, DPR
                    csv); select on `dev_split`, report `test_split` (split names of `dir` or
                    QA file paths). Paper runs use this: evaluation questions are never trained
                    on, and the test split never picks a checkpoint.
      "hash_split"  demos and tests only: the questions of `split` are divided into train /
                    dev / test by a hash of their id (`split_fractions`).
    """
    protocol = cfg.get("protocol", "files")
    corpus = stored_corpus(store, find_corpus(Path(cfg.dir))) if cfg.dir else None
    if corpus is not None:
        log.info("corpus: %s (prepared text table)", corpus)
    if protocol == "hash_split":
        return _hash_split(cfg, corpus)
    if protocol != "files":
        raise DataError(f"data.protocol={protocol!r}; expected 'files' or 'hash_split'")
    if not cfg.train_questions:
        raise DataError(
            "data.train_questions is empty: ART trains on real training questions (NQ: "
            "nq-train.csv), never on its dev or test questions. Set "
            "--config.data.train_questions=FILE, or --config.data.protocol=hash_split for a "
            "demo that splits one question set by id hash"
        )
    if not cfg.dev_split:
        raise DataError("data.dev_split is empty: model selection needs a dev set")
    dev = _eval_set(cfg, cfg.dev_split, corpus)
    corpus = dev.corpus
    test = None
    if cfg.test_split:
        if cfg.test_split == cfg.dev_split:
            raise DataError(
                f"data.dev_split and data.test_split are both {cfg.dev_split!r}: the split that "
                "picks the checkpoint cannot also be the one reported"
            )
        test = _eval_set(cfg, cfg.test_split, corpus)
    if cfg.max_docs and cfg.max_docs < len(corpus):
        dev = _smaller_corpus(dev, cfg.max_docs, seed=0)
        corpus = dev.corpus
        if test is not None:
            test = _on_corpus(test, corpus)
    questions = read_questions(Path(cfg.train_questions))
    train_ids = [f"train-{i}" for i in range(len(questions))]
    seen = set(questions)
    for name, data in (("dev", dev), ("test", test)):
        if data is not None:
            overlap = sum(q in seen for q in data.query_texts)
            if overlap:
                log.warning(
                    "%d of the %d %s questions also appear verbatim among the training questions",
                    overlap,
                    len(data.query_texts),
                    name,
                )
    qrels = None
    if cfg.get("train_qrels"):
        qrels = read_qrels(Path(cfg.train_qrels), set(train_ids), corpus.row_of)
    dev = _cap(dev, cfg.max_eval_queries)
    test = _cap(test, cfg.max_eval_queries) if test is not None else None
    return ArtData(corpus, train_ids, questions, dev, test, qrels)


def _on_corpus(data: EvalData, corpus: Corpus) -> EvalData:
    """`data` evaluated on a smaller `corpus`: judgements outside it dropped, queries left
    without a relevant document dropped."""
    out = EvalData(data.name, corpus, data.query_ids, data.query_texts, data.qrels, data.answers)
    if data.qrels is None:
        return out
    out.qrels = {
        q: {d: r for d, r in j.items() if d in corpus.row_of} for q, j in data.qrels.items()
    }
    keep = [i for i, q in enumerate(data.query_ids) if any(v > 0 for v in out.qrels[q].values())]
    return _restrict(out, keep)


def _hash_split(cfg: Any, corpus: Corpus | None) -> ArtData:
    full = load_eval_data(cfg.dir, cfg.split, corpus=corpus)
    if cfg.max_docs and cfg.max_docs < len(full.corpus):
        full = _smaller_corpus(full, cfg.max_docs, seed=0)
    fractions = tuple(cfg.split_fractions)
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"data.split_fractions {fractions} must be three numbers summing to 1")
    groups: dict[str, list[int]] = {"train": [], "dev": [], "test": []}
    for i, qid in enumerate(full.query_ids):
        groups[split_of(qid, fractions)].append(i)
    train_ids = [full.query_ids[i] for i in groups["train"]]
    questions = [full.query_texts[i] for i in groups["train"]]
    if not questions:
        raise DataError("the hash split left no training questions")
    log.warning(
        "data.protocol=hash_split: the %d %r questions of %s are split %s into train/dev/test "
        "by a hash of their id (%d / %d / %d). This is for demos and tests; a paper run "
        "trains on its own training questions (data.protocol=files).",
        len(full.query_ids),
        cfg.split,
        cfg.dir,
        "/".join(f"{f:g}" for f in fractions),
        len(groups["train"]),
        len(groups["dev"]),
        len(groups["test"]),
    )
    dev = _cap(_restrict(full, groups["dev"]), cfg.max_eval_queries)
    test = _cap(_restrict(full, groups["test"]), cfg.max_eval_queries)
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
