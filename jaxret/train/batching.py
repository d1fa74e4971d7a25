"""Deterministic global batches: the data position is the step alone, so a resumed run draws
exactly the batches an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np


def epoch_batch(
    items: Sequence[int] | np.ndarray, step: int, batch_size: int, key: Sequence[int]
) -> np.ndarray:
    """The `batch_size` items of global batch `step`: positions [pos·B, (pos+1)·B) of a fresh
    permutation of `items` per epoch, keyed by (key, epoch); positions past the end wrap
    around to the epoch's first. Above SMALL_EPOCH items the permutation is `permuted`,
    which reads only the batch's items: LaPraDoR's ~365M C4 passages would otherwise be a
    2.9 GB permutation drawn at every step."""
    n = len(items)
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    positions = (pos * batch_size + np.arange(batch_size, dtype=np.int64)) % n
    if n <= SMALL_EPOCH:  # a few ms per step: numpy's permutation, the orders of earlier runs
        return np.asarray(items)[np.random.default_rng([*key, epoch]).permutation(n)[positions]]
    return np.asarray(items[permuted(positions, n, [*key, epoch])])


# Up to this many items an epoch's permutation is drawn whole (≤ ~10 ms per step); beyond,
# `permuted` maps the batch's positions alone.
SMALL_EPOCH = 1 << 20


_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finalizer of x ^ key: a well-mixed 64-bit hash."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def permuted(positions: np.ndarray, n: int, key: Sequence[int]) -> np.ndarray:
    """π(positions) for a pseudo-random permutation π of [0, n) keyed by `key`, in O(len
    (positions)) time and memory whatever n: a 4-round balanced Feistel network over the
    smallest [0, 4^h) ⊇ [0, n), walked along its cycle until it lands in [0, n) (a bijection
    of [0, 4^h) restricted this way is a bijection of [0, n); 4^h < 4n, so a few walks)."""
    if n <= 1:
        return np.zeros(len(positions), np.int64)
    half = (int(n - 1).bit_length() + 1) // 2
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    round_keys = np.random.SeedSequence(list(key)).generate_state(_ROUNDS, np.uint64)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for k in round_keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):  # the hash multiplies modulo 2^64
        out = feistel(np.asarray(positions, np.uint64))
        outside = out >= n
        while outside.any():
            out[outside] = feistel(out[outside])
            outside = out >= n
    return out.astype(np.int64)


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    return max(1, num_items // batch_size)


def process_rows(batch_size: int) -> slice:
    """This process's rows of a global batch (each process feeds its own devices)."""
    per = batch_size // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)
