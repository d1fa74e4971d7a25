"""Teacher labels from BM25, as SPAR trains its lexical model Λ: for every query, BM25's top
K passages; the first n_p are positives, the last n_n of the K hard negatives.

Labelling is batched, split over `workers` forked processes (each a contiguous share of the
queries, the same result for any count), and cached next to the corpus store under a key made
of the corpus hash, the queries and the settings, so a rerun (or another method) reuses it.
At the paper's size (millions of sentences against 21M passages) labelling takes hours: it is
done before the job by `jaxret prepare`. A multi-process training run never labels (a
process would wait for another in a device collective meanwhile): it refuses missing labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxret.data.corpus_store import StoreMissingError
from jaxret.errors import RunError
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
    workers: int = 1,
    prepare_hint: str = "",
) -> TeacherLabels:
    """`folder/labels-<key>.npz`, computed when absent by `workers` processes. A
    multi-process run refuses to compute it (StoreMissingError naming `prepare_hint`)."""
    folder = Path(folder)
    key = labels_key(corpus_hash, queries, spec, bm25)
    path = folder / f"labels-{key}.npz"
    if path.is_file():
        return _load(path)
    # (distributed first: asking jax.process_count() would start a backend)
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        raise StoreMissingError(
            f"BM25 labels of these {len(queries)} queries are not in {folder}: a multi-process "
            "run does not label, since the other processes would wait for it in a device "
            "collective. Build them before the job"
            + (f": {prepare_hint}" if prepare_hint else " with `jaxret prepare`")
        )
    folder.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers, len(queries) // max(1, spec.batch_size) or 1))
    if workers == 1:
        labels = bm25_labels(bm25, queries, spec, progress)
    else:
        labels = _label_in_workers(folder, key, bm25, queries, spec, workers)
    _save(path, labels)
    return _load(path)


def _label_in_workers(
    folder: Path, key: str, bm25: BM25, queries: Sequence[str], spec: LabelSpec, workers: int
) -> TeacherLabels:
    """`workers` forked processes (they inherit the BM25 index), worker w labelling queries
    [w·n/W, (w+1)·n/W) into a part file; the parts concatenated in order."""
    n = len(queries)
    bounds = [w * n // workers for w in range(workers + 1)]
    parts = [folder / f".labels-{key}.part{w}of{workers}.npz" for w in range(workers)]
    ctx = multiprocessing.get_context("fork")
    bm25.build()  # once, here: every forked worker shares it

    def work(w: int) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _save(parts[w], bm25_labels(bm25, queries[bounds[w] : bounds[w + 1]], spec, False))

    procs = [ctx.Process(target=work, args=(w,), daemon=True) for w in range(workers)]
    for p in procs:
        p.start()
    with tqdm(total=workers, desc=f"BM25 labels ({workers} workers)", unit="part") as bar:
        for p in procs:
            p.join()
            bar.update(1)
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RunError(f"BM25 labels: {len(failed)} worker(s) failed (exit codes {failed})")
    loaded = [_load(part) for part in parts]
    for part in parts:
        part.unlink(missing_ok=True)
    return TeacherLabels(
        np.concatenate([p.positives for p in loaded]),
        np.concatenate([p.negatives for p in loaded]),
    )


def _save(path: Path, labels: TeacherLabels) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, positives=labels.positives, negatives=labels.negatives)
    os.replace(tmp, path)


def _load(path: Path) -> TeacherLabels:
    with np.load(path) as z:
        return TeacherLabels(z["positives"], z["negatives"])
