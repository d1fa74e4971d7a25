"""Teacher labels from BM25, as SPAR trains its lexical model Λ: for every query, BM25's top
K passages; the first n_p are positives, the last n_n of the K hard negatives.

Labelling is batched, each process of a multi-process run labels its contiguous share of the
queries, and the result is cached next to the corpus store under a key made of the corpus
hash, the queries and the settings, so a rerun (or another recipe) reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxret.lexical.bm25 import BM25


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    top_k: int = 50
    positives: int = 10
    negatives: int = 5
    batch_size: int = 4096


@dataclasses.dataclass
class TeacherLabels:
    positives: np.ndarray  # [Q, n_p] int32 passage rows, -1 = none
    negatives: np.ndarray  # [Q, n_n] int32 passage rows, -1 = none

    def __len__(self) -> int:
        return len(self.positives)

    def valid(self) -> np.ndarray:
        """[Q] bool: queries with at least one positive."""
        return (self.positives >= 0).any(1)


def split_hits(rows: np.ndarray, spec: LabelSpec) -> TeacherLabels:
    """rows [Q, K] (−1 = no hit, always after the hits) → positives and hard negatives.

    Negatives are the last n_n hits among the K; when a query has fewer than n_p + n_n hits,
    negatives are the hits after the positives (possibly none)."""
    q = len(rows)
    pos = np.full((q, spec.positives), -1, np.int32)
    neg = np.full((q, spec.negatives), -1, np.int32)
    for i, row in enumerate(rows):
        hits = row[row >= 0]
        p = hits[: spec.positives]
        pos[i, : len(p)] = p
        rest = hits[spec.positives :]
        n = rest[-spec.negatives :] if len(rest) else rest
        neg[i, : len(n)] = n
    return TeacherLabels(pos, neg)


def bm25_labels(
    bm25: BM25, queries: Sequence[str], spec: LabelSpec, progress: bool = True
) -> TeacherLabels:
    parts = []
    starts = range(0, len(queries), spec.batch_size)
    for s in tqdm(starts, desc="BM25 labels", unit="batch", disable=not progress):
        _, rows = bm25.retrieve(list(queries[s : s + spec.batch_size]), spec.top_k)
        parts.append(split_hits(rows, spec))
    return TeacherLabels(
        np.concatenate([p.positives for p in parts]), np.concatenate([p.negatives for p in parts])
    )


def labels_key(corpus_hash: str, queries: Sequence[str], spec: LabelSpec, bm25: BM25) -> str:
    h = hashlib.sha256()
    h.update(corpus_hash.encode())
    h.update(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    h.update(json.dumps(bm25.describe(), sort_keys=True).encode())
    for q in queries:
        h.update(q.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def cached_labels(
    folder: str | os.PathLike,
    bm25: BM25,
    corpus_hash: str,
    queries: Sequence[str],
    spec: LabelSpec,
    progress: bool = True,
) -> TeacherLabels:
    """`folder/labels-<key>.npz`, computed when absent (each process its share)."""
    folder = Path(folder)
    key = labels_key(corpus_hash, queries, spec, bm25)
    path = folder / f"labels-{key}.npz"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        n, procs, me = len(queries), jax.process_count(), jax.process_index()
        lo, hi = me * n // procs, (me + 1) * n // procs
        part = bm25_labels(bm25, queries[lo:hi], spec, progress)
        part_path = folder / f"labels-{key}.part{me}of{procs}.npz"
        _save(part_path, part)
        if procs > 1:
            multihost_utils.sync_global_devices(f"jaxret-labels-{key}")
        if me == 0:
            parts = [_load(folder / f"labels-{key}.part{p}of{procs}.npz") for p in range(procs)]
            merged = TeacherLabels(
                np.concatenate([p.positives for p in parts]),
                np.concatenate([p.negatives for p in parts]),
            )
            _save(path, merged)
            for p in range(procs):
                (folder / f"labels-{key}.part{p}of{procs}.npz").unlink(missing_ok=True)
        if procs > 1:
            multihost_utils.sync_global_devices(f"jaxret-labels-{key}-merged")
    return _load(path)


def _save(path: Path, labels: TeacherLabels) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, positives=labels.positives, negatives=labels.negatives)
    os.replace(tmp, path)


def _load(path: Path) -> TeacherLabels:
    with np.load(path) as z:
        return TeacherLabels(z["positives"], z["negatives"])
