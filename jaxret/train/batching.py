"""Deterministic global batches: the data position is the step alone, so a resumed run draws
exactly the batches an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np


def epoch_batch(items: np.ndarray, step: int, batch_size: int, key: Sequence[int]) -> np.ndarray:
    """The `batch_size` items of global batch `step`: a fresh permutation of `items` per epoch
    seeded by (key, epoch); a short final batch wraps around to the epoch's first items."""
    per_epoch = max(1, len(items) // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([*key, epoch]).permutation(items)
    idx = perm[pos * batch_size : (pos + 1) * batch_size]
    if len(idx) < batch_size:
        idx = np.concatenate([idx, perm[: batch_size - len(idx)]])
    return idx


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    return max(1, num_items // batch_size)


def process_rows(batch_size: int) -> slice:
    """This process's rows of a global batch (each process feeds its own devices)."""
    per = batch_size // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)
