"""Global batches drawn by position in a keyed permutation, never a materialized one."""

import collections

import numpy as np
import pytest

from jaxret.train.batching import epoch_batch, permuted


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 100_003])
def test_permuted_is_a_bijection_of_range_n(n):
    """Every position of [0, n) maps to a distinct value of [0, n), for n at, below and
    above a power of four (the Feistel domain). Fails without the cycle walk (values ≥ n
    folded back by a modulo collide)."""
    values = permuted(np.arange(n), n, [7, 1])
    assert sorted(values.tolist()) == list(range(n))


def test_permutations_differ_by_key_and_are_uniform():
    """Two keys give different orders; over 5,000 epochs each of 5 items comes first about
    1,000 times (a fixed sequence of keys: deterministic). Fails if the key stops reaching the
    rounds (every epoch the same order: one item first 5,000 times)."""
    assert (
        permuted(np.arange(50), 50, [0, 1]).tolist() != permuted(np.arange(50), 50, [0, 2]).tolist()
    )
    first = collections.Counter(int(permuted(np.zeros(1), 5, [3, e])[0]) for e in range(5000))
    assert sorted(first) == [0, 1, 2, 3, 4]
    assert all(850 < c < 1150 for c in first.values()), first


class _Huge:
    """10¹² items, as a memory-mapped list would be: indexable, never to be read whole."""

    def __len__(self):
        return 10**12

    def __getitem__(self, i):
        assert len(np.atleast_1d(i)) <= 64, "read more than one batch"
        return np.asarray(i) * 3

    def __array__(self, *a, **k):
        raise AssertionError("the items were materialized")


def test_a_batch_reads_only_its_items():
    """A batch of 10¹² items is drawn from its positions alone, distinct items, the same for
    the same step. Fails if the epoch's permutation is materialized (the previous
    `rng.permutation(items)` over all items)."""
    huge = _Huge()
    batch = epoch_batch(huge, 12_345, 64, [1, 2])
    assert len(set(batch.tolist())) == 64 and (batch % 3 == 0).all()
    np.testing.assert_array_equal(batch, epoch_batch(huge, 12_345, 64, [1, 2]))


def test_an_epoch_covers_every_item_once():
    """With n a multiple of the batch, the batches of one epoch are a permutation of the items
    and the next epoch is another one; a short last epoch position wraps to its first items.
    Fails if positions are not advanced by the step within an epoch."""
    items = np.arange(100, 196)  # 96 items, batches of 8: 12 per epoch
    epoch0 = np.concatenate([epoch_batch(items, s, 8, [5]) for s in range(12)])
    epoch1 = np.concatenate([epoch_batch(items, s, 8, [5]) for s in range(12, 24)])
    assert sorted(epoch0.tolist()) == items.tolist() == sorted(epoch1.tolist())
    assert epoch0.tolist() != epoch1.tolist()
    # below SMALL_EPOCH items, numpy's permutation of the epoch: the orders of earlier runs
    assert epoch0.tolist() == np.random.default_rng([5, 0]).permutation(items)[:96].tolist()
    small = epoch_batch(np.arange(3), 0, 8, [5])  # fewer items than a batch: wraps
    assert len(small) == 8 and set(small.tolist()) == {0, 1, 2}
