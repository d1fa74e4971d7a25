"""Approximate search with ScaNN (no TensorFlow needed), built from saved embeddings.

Defaults follow ScaNN's guidance: √N partitions, search ~10 % of them, anisotropic
hashing with 2-dim blocks, exact re-ranking of the best candidates.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

META = "jaxret_scann.json"


def _ops() -> Any:
    from scann.scann_ops.py import scann_ops_pybind

    return scann_ops_pybind


class ScannIndex:
    def __init__(self, searcher: Any, num_rows: int, config: dict[str, Any]):
        self._searcher = searcher
        self.num_rows = num_rows
        self.config = config

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,  # [N, d]
        k: int = 100,
        num_leaves: int | None = None,
        leaves_to_search: int | None = None,
        reorder: int | None = None,
    ) -> ScannIndex:
        db = np.ascontiguousarray(embeddings, dtype=np.float32)
        n = len(db)
        k = min(k, n)
        leaves = num_leaves or max(1, min(n // 4, int(math.sqrt(n))))
        search = leaves_to_search or max(1, math.ceil(leaves / 10))
        reorder = reorder or max(k, min(n, 10 * k))
        builder = _ops().builder(db, k, "dot_product")
        if leaves > 1:
            builder = builder.tree(
                num_leaves=leaves, num_leaves_to_search=search, training_sample_size=n
            )
        if db.shape[1] >= 2 and n >= 16:
            builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2).reorder(reorder)
        else:
            builder = builder.score_brute_force()
        config = {"k": k, "num_leaves": leaves, "leaves_to_search": search, "reorder": reorder}
        return cls(builder.build(), n, config)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [B, k], row ids [B, k])."""
        if not 0 < k <= self.num_rows:
            raise ValueError(f"k={k} must be in [1, {self.num_rows}]")
        ids, scores = self._searcher.search_batched(
            np.ascontiguousarray(queries, np.float32), final_num_neighbors=k
        )
        return np.asarray(scores, np.float32), np.asarray(ids, np.int64)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)  # ScaNN needs the folder to exist
        self._searcher.serialize(str(directory))
        (directory / META).write_text(json.dumps({"num_rows": self.num_rows, **self.config}))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ScannIndex:
        directory = Path(directory)
        meta = json.loads((directory / META).read_text())
        return cls(_ops().load_searcher(str(directory)), meta.pop("num_rows"), meta)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k found by the approximate search."""
    k = exact_ids.shape[1]
    return float(np.mean([len(set(a[:k]) & set(e)) / k for a, e in zip(approx_ids, exact_ids)]))
