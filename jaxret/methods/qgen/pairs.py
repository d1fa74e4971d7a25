"""QGen's training pairs: (query, passage row) from a BEIR folder's qrels, or mined hard
negatives; seeded held-out splits; their fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from jaxret.data.readers import (
    Corpus,
    DataError,
    read_hard_negatives,
)
from jaxret.eval import evaluate as ev

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Pairs:
    """(query, passage row) training pairs over `corpus`."""

    corpus: Corpus
    queries: list[str]
    rows: np.ndarray  # [P] int: the passage row of each query


def read_pairs(folder: str | Path, split: str, corpus: Corpus | None = None) -> Pairs:
    """Every (query, relevant passage) of a BEIR folder's `qrels/<split>.tsv` (relevance > 0),
    in query order; a query with several relevant passages gives several pairs. `corpus`:
    the folder's corpus already open (the store's memory-mapped table)."""
    data = ev.load_eval_data(folder, split, corpus=corpus)
    if data.qrels is None:
        raise DataError(f"{folder}: no qrels/{split}.tsv to take (query, passage) pairs from")
    queries, rows = [], []
    for qid, text in zip(data.query_ids, data.query_texts):
        for doc, rel in sorted(data.qrels.get(qid, {}).items()):
            if rel > 0 and doc in data.corpus.row_of:
                queries.append(text)
                rows.append(data.corpus.row_of[doc])
    if not queries:
        raise DataError(f"{folder}: qrels/{split}.tsv has no positive pair inside the corpus")
    return Pairs(data.corpus, queries, np.asarray(rows, np.int64))


def mined_pairs(
    cfg: Any, corpus: Corpus | None = None
) -> tuple[Pairs, list[tuple[list[int], list[int]]]]:
    """The queries of `data.train_dir`'s `train_split` that the mined hard-negatives file
    (`data.hard_negatives`) gives a positive and a hard negative: (Pairs with each query's
    first positive, [(positive rows, negative rows shuffled by the seed)] per query)."""
    data = ev.load_eval_data(cfg.data.train_dir, cfg.data.train_split, corpus=corpus)
    mined = read_hard_negatives(
        cfg.data.hard_negatives,
        set(data.query_ids),
        data.corpus.row_of,
        cfg.data.get("ce_score_margin", 3.0),
        cfg.data.get("negatives_per_system", 5),
    )
    text_of = dict(zip(data.query_ids, data.query_texts))
    rng = np.random.default_rng([cfg.seed, 11])
    lists = [
        (pos, list(rng.permutation(neg))) for pos, neg in zip(mined.positives, mined.negatives)
    ]
    queries = [text_of[q] for q in mined.query_ids]
    rows = np.asarray([pos[0] for pos in mined.positives], np.int64)
    log.info("%d training queries with mined hard negatives", len(queries))
    return Pairs(data.corpus, queries, rows), lists


def held_out(n: int, n_dev: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, dev) positions: a seeded random `n_dev` of `n` held out, both sorted."""
    order = np.random.default_rng([seed, 7]).permutation(n)
    return np.sort(order[n_dev:]), np.sort(order[:n_dev])


def pairs_fingerprint(pairs: Pairs) -> str:

    h = hashlib.sha256()
    for q, r in zip(pairs.queries, pairs.rows.tolist()):
        h.update(f"{r}\t{q}\x00".encode())
    return h.hexdigest()[:16]
