"""Rank-biased overlap (Webber, Moffat & Zobel 2010), extrapolated form for equal depths."""

from __future__ import annotations

from collections.abc import Sequence


def rbo(a: Sequence[str], b: Sequence[str], p: float = 0.9) -> float:
    """RBO_ext of two rankings evaluated to depth k = min(len(a), len(b)).

    RBO_ext = (X_k / k)·p^k + (1 − p)/p · Σ_{d=1..k} (X_d / d)·p^d, with X_d the size of the
    overlap of the two top-d prefixes. Identical rankings give 1, disjoint ones 0.
    """
    if not 0 < p < 1:
        raise ValueError("p must be in (0, 1)")
    k = min(len(a), len(b))
    if k == 0:
        return 0.0
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    overlap, total = 0, 0.0
    for d in range(1, k + 1):
        x, y = a[d - 1], b[d - 1]
        if x == y:
            overlap += 1
        else:
            overlap += (x in seen_b) + (y in seen_a)
        seen_a.add(x)
        seen_b.add(y)
        total += overlap / d * p**d
    return overlap / k * p**k + (1 - p) / p * total
