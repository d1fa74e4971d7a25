"""Exact maximum inner product search over an embedding matrix sharded by rows.

Layout: [N_pad, d] rows split into equal contiguous blocks over *every* device of the mesh
(PartitionSpec over all mesh axes), each block a whole number of `chunk` rows. Rows ≥ N are
padding and never returned.

Per device: scores = q · blockᵀ chunk by chunk (fp32 accumulation) and a local top-k, by
one of two selections chosen by shape (`mips_top_k`): a running top-k over each chunk's
scores, or the two-pass selection (block maxima, then the best blocks' rows scored again);
then all_gather of the local candidates and one global top-k. lax.top_k keeps the lower
index among equal scores and candidates are concatenated in row order, so ties always go to
the lower row id, on any device count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_NO_ID = jnp.iinfo(jnp.int32).max
ROW_ALIGN = 32


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How N rows spread over `num_shards` devices in blocks of `rows_per_shard`."""

    num_rows: int
    num_shards: int
    rows_per_shard: int
    chunk: int

    @property
    def padded_rows(self) -> int:
        return self.rows_per_shard * self.num_shards

    @classmethod
    def for_mesh(cls, num_rows: int, mesh: Mesh, chunk_rows: int = 32768) -> RowLayout:
        return cls.for_shards(num_rows, mesh.size, chunk_rows)

    @classmethod
    def for_shards(cls, num_rows: int, shards: int, chunk_rows: int = 32768) -> RowLayout:
        """Each device's rows in chunks of at most `chunk_rows`, of equal size and as little
        padding as the alignment allows: a multiple of 1,024 rows above 8,192 (the two-pass
        selection's score blocks divide them), else of ROW_ALIGN (its row blocks do). 1M rows
        over 2 devices: 16 chunks of 31,744 (1.6 % padding; whole 32,768-row chunks were
        4.9 %, and 31 % for 100,000 rows)."""
        if num_rows <= 0:
            raise ValueError("an index needs at least one row")
        need = math.ceil(num_rows / shards)
        chunks = math.ceil(need / chunk_rows)
        even = math.ceil(need / chunks)  # ≤ chunk_rows
        round_up = lambda x, a: -(-x // a) * a
        chunk = round_up(even, 1024 if even > 8192 else ROW_ALIGN)
        if chunk > chunk_rows:
            chunk = round_up(even, ROW_ALIGN)
        if chunk > chunk_rows:
            chunk = chunk_rows
        return cls(num_rows, shards, chunks * chunk, max(1, chunk))


def row_spec(mesh: Mesh) -> PartitionSpec:
    return PartitionSpec(tuple(mesh.axis_names))


def row_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, row_spec(mesh))


# A bf16 index on CPU is stored as the uint16 bits of its values. XLA:CPU does not slice
# bf16 arrays: it widens a sliced bf16 operand to fp32, and for a slice inside the row loop
# it hoists the widening out of the loop, converting a device's whole block before every
# search (a 4 GB temporary per device at ART's NQ shapes; B = 1 took 4x fp32's time). Slices
# of the bits, each viewed as bf16, keep the native bf16 dot (AVX512-BF16) and copy nothing
# but the slice; bf16 rows converted to bits at every search cost a copy of the block (bf16
# at B = 64 was 0.85x fp32; stored as bits 2x, benchmarks/mips.py). GPUs and TPUs slice
# bf16 natively and store it as such.
BF16_BITS = jnp.uint16


def storage_dtype(dtype: Any, mesh: Mesh) -> jnp.dtype:
    """The dtype an index of `dtype` values is stored in on `mesh`'s devices."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and mesh.devices.flat[0].platform == "cpu":
        return jnp.dtype(BF16_BITS)
    return dtype


def value_dtype(stored: Any) -> jnp.dtype:
    """The dtype of the values of rows stored as `stored`."""
    return jnp.dtype(jnp.bfloat16 if jnp.dtype(stored) == BF16_BITS else stored)


def to_storage(values: Any, stored: Any) -> Any:
    """Rows of values (jax or numpy) as rows of the `stored` dtype; rows already stored as
    bits are returned as they are (read as numbers they would be converted as numbers)."""
    stored = jnp.dtype(stored)
    if values.dtype == BF16_BITS:
        if stored != BF16_BITS:
            raise ValueError(f"rows stored as bits cannot be stored as {stored.name}")
        return values
    if stored != BF16_BITS:
        return values.astype(stored)
    if isinstance(values, np.ndarray):
        return values.astype(ml_dtypes.bfloat16).view(np.uint16)
    return jax.lax.bitcast_convert_type(values.astype(jnp.bfloat16), BF16_BITS)


def stored_values(rows: Any) -> Any:
    """Rows stored as `to_storage` wrote them, as values (jax or numpy)."""
    if rows.dtype != BF16_BITS:
        return rows
    if isinstance(rows, np.ndarray):
        return rows.view(ml_dtypes.bfloat16)
    return jax.lax.bitcast_convert_type(rows, jnp.bfloat16)


def _merge(a_s: jax.Array, a_i: jax.Array, b_s: jax.Array, b_i: jax.Array, k: int):
    """Top-k of two candidate lists; `a` holds lower row ids, so it wins ties."""
    s = jnp.concatenate([a_s, b_s], axis=1)
    i = jnp.concatenate([a_i, b_i], axis=1)
    s, pos = jax.lax.top_k(s, k)
    return s, jnp.take_along_axis(i, pos, axis=1)


@dataclasses.dataclass(frozen=True)
class TwoPassPlan:
    """Shapes of the two-pass selection on one device (see `two_pass_top_k`)."""

    scan_rows: int  # rows per pass-1 matmul: its [B, scan_rows] fp32 scores stay in cache
    block: int  # m: rows per block, whose maximum pass 1 keeps
    query_tile: int  # queries per pass-2 gather of [tile, k·m, d] candidate rows
    group: int = 0  # g: blocks per group of the grouped block selection (0: one top-k)


# Pass 1 keeps its [B, scan_rows] fp32 score block within this many bytes: XLA:CPU's dot
# writing a 16 MB block ran at ~150 GFLOP/s on this project's machine (32 MB L3), a 128 MB
# one at ~70 (the scores went to memory and back); 4 MB blocks took 3-6 % less than 16 MB
# ones at B = 1024 (the block maxima read them back from cache); see the two-pass column
# of benchmarks/mips.py.
SCORE_BLOCK_BYTES = 4 << 20
MAXIMA_BYTES = 256 << 20  # the [B, rows / m] block maxima pass 1 keeps
GROUP = 16  # blocks per group when the best blocks are chosen group-first (`_best_blocks`)
GATHER_BYTES = 4 << 20  # one pass-2 tile of gathered candidate rows (4 MB: 10 % faster than 16)
# Two-pass only where the k·m candidates are at most this fraction of a device's rows: at
# 1/20 (100,000 rows, k = 100, m = 32) the gathers made it 0.6-0.8x the running top-k, at
# 1/64 (m = 8) 0.9-1.1x, at 1/160 (1M rows) 1.2-2.0x faster at every batch size (the
# running and two-pass columns of benchmarks/mips.py, 2026-12-02).
CANDIDATE_SHARE = 64


def block_rows(rows: int, k: int, dim: int, chunk: int) -> int:
    """m for the two-pass selection over a device's `rows`: the power of two in [8, 64]
    dividing `chunk` nearest to √(6 · rows / (k · dim)), which balances the two costs m
    sets — each of the rows / m block maxima (~2.4 ns to reduce in pass 1 and ~1.1 ns to
    choose among, grouped, on this project's CPU) against pass 2's gather and dot of
    k · m rows of dim values (~0.6 ns per value); 0 if none divides."""
    target = math.sqrt(6 * rows / max(1, k * dim))
    options = [m for m in (8, 16, 32, 64) if chunk % m == 0]
    return min(options, key=lambda m: abs(math.log(m / target)), default=0)


def two_pass_plan(
    batch: int,
    layout: RowLayout,
    k: int,
    dim: int,
    itemsize: int,
    block: int | None = None,
    worthwhile: bool = True,
) -> TwoPassPlan | None:
    """The two-pass shapes for a [batch, dim] query block over `layout`, or None: when the
    rows' chunk is not a multiple of the block (default: `block_rows`), and, if
    `worthwhile`, when the k·m candidates are more than 1 / CANDIDATE_SHARE of a device's
    rows (pass 2 would cost more than it saves) or the maxima need more than MAXIMA_BYTES.
    The best blocks are chosen group-first (GROUP blocks a group) where the maxima divide
    into at least 4 · k groups."""
    n = layout.rows_per_shard
    if block is None:
        block = block_rows(n, k, dim, layout.chunk)
    if not block or layout.chunk % block:
        return None
    kb = min(k, n // block)
    if worthwhile and (CANDIDATE_SHARE * kb * block > n or batch * (n // block) * 4 > MAXIMA_BYTES):
        return None
    limit = max(block, SCORE_BLOCK_BYTES // (4 * batch))
    scan = next(
        layout.chunk // j
        for j in range(1, layout.chunk + 1)
        if layout.chunk % j == 0
        and (layout.chunk // j) % block == 0
        and (layout.chunk // j <= limit or layout.chunk // j == block)
    )
    if worthwhile and 4 * scan < min(limit, layout.chunk):  # the chunk factors badly
        return None
    tile = max(1, GATHER_BYTES // (kb * block * dim * itemsize))
    blocks = n // block
    group = GROUP if blocks % GROUP == 0 and blocks >= 4 * kb * GROUP else 0
    return TwoPassPlan(scan, block, min(tile, batch), group)


def _best_blocks(maxima: jax.Array, kb: int, group: int) -> jax.Array:
    """[B, kb] positions of the kb largest of maxima [B, blocks], ascending, ties to the
    lower position. With `group` g: the kb best groups of g consecutive blocks (by their
    maximum), then the kb best of those groups' kb·g blocks — the same blocks (a block
    outside the kb best groups has kb groups ahead of it, each holding a block ahead of it,
    ties included since groups, like blocks, tie-break by position), from top-ks over
    blocks / g + kb·g values instead of one over all the blocks."""
    b = maxima.shape[0]
    if group:
        group_max = maxima.reshape(b, -1, group).max(axis=2)  # [B, blocks / g]
        _, best = jax.lax.top_k(group_max, kb)
        best = jnp.sort(best, axis=1)  # position order: ties keep going to the lower block
        g = jnp.arange(group, dtype=jnp.int32)
        blocks = (best[:, :, None] * group + g).reshape(b, kb * group)  # [B, kb·g]
        _, pos = jax.lax.top_k(jnp.take_along_axis(maxima, blocks, axis=1), kb)
        chosen = jnp.take_along_axis(blocks, pos, axis=1)
    else:
        _, chosen = jax.lax.top_k(maxima, kb)
    return jnp.sort(chosen, axis=1)


def two_pass_top_k(
    rows: jax.Array,  # [n, d] this device's rows
    queries: jax.Array,  # [B, d], rows.dtype
    k: int,
    row_offset: jax.Array,  # first global row id of `rows`
    num_rows: int,
    plan: TwoPassPlan,
    view: Callable[[jax.Array], jax.Array] = lambda x: x,  # stored rows -> rows to multiply
) -> tuple[jax.Array, jax.Array]:
    """Exact top-k (k ≤ n) of queries · rowsᵀ, ties to the lower row id, sorting almost
    nothing: pass 1 scores the rows scan_rows at a time and keeps only each block of m rows'
    maximum ([B, n / m]); the top-k blocks by maximum hold the top-k rows (a block outside
    them has k blocks ahead of it, each with a row ahead of all of its own, ties included:
    blocks tie-break by position as rows do); pass 2 gathers those k·m rows, in row order so
    that ties still go to the lower id, scores them again and takes their top-k. Pass 1 is
    the matmul with its scores still in cache and one max per m; the only sorts are over
    the maxima (`_best_blocks`) and k·m candidates."""
    n, d = rows.shape
    b = queries.shape[0]
    m = plan.block
    kb = min(k, n // m)

    def scan_maxima(maxima: jax.Array, c: jax.Array):
        part = view(jax.lax.dynamic_slice_in_dim(rows, c * plan.scan_rows, plan.scan_rows))
        s = jnp.einsum("bd,nd->bn", queries, part, preferred_element_type=jnp.float32)
        ids = row_offset + c * plan.scan_rows + jnp.arange(plan.scan_rows, dtype=jnp.int32)
        s = jnp.where(ids[None, :] < num_rows, s, -jnp.inf)  # [B, scan_rows]
        block_max = s.reshape(b, plan.scan_rows // m, m).max(axis=2)
        at = c * (plan.scan_rows // m)
        return jax.lax.dynamic_update_slice_in_dim(maxima, block_max, at, axis=1), None

    maxima = jnp.full((b, n // m), -jnp.inf, jnp.float32)
    steps = jnp.arange(n // plan.scan_rows, dtype=jnp.int32)
    maxima, _ = jax.lax.scan(scan_maxima, maxima, steps)  # [B, n / m]
    chosen = _best_blocks(maxima, kb, plan.group)  # [B, kb], row order: ties to the lower id
    local = (chosen[:, :, None] * m + jnp.arange(m, dtype=jnp.int32)).reshape(b, kb * m)

    def rescore(tile: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        q, cand = tile  # [d], [kb·m]
        s = jnp.einsum("d,cd->c", q, view(rows[cand]), preferred_element_type=jnp.float32)
        return _top_k_rows(s, row_offset + cand, num_rows, k)

    return jax.lax.map(rescore, (queries, local), batch_size=plan.query_tile)


def _top_k_rows(s: jax.Array, ids: jax.Array, num_rows: int, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k of scores s [..., n] of the global rows `ids` [n] (or [..., n]); padding rows
    (id ≥ num_rows) are never chosen. lax.top_k keeps the lower position among ties."""
    s, pos = jax.lax.top_k(jnp.where(ids < num_rows, s, -jnp.inf), k)
    return s, ids[pos]


def _running_top_k(
    block: jax.Array,  # [n, d] this device's rows
    queries: jax.Array,  # [B, d], block.dtype
    k: int,
    row_offset: jax.Array,  # first global row id of the block
    num_rows: int,
    chunk: int,
    view: Callable[[jax.Array], jax.Array] = lambda x: x,  # stored rows -> rows to multiply
) -> tuple[jax.Array, jax.Array]:
    """Scores chunk by chunk with a running top-k: `lax.top_k` over each [B, chunk] block,
    merged into the best k so far."""
    n, d = block.shape
    kc = min(k, chunk)

    def score_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        # A window of the block, not a copy of it: the index is read once, in place.
        rows = view(jax.lax.dynamic_slice_in_dim(block, c * chunk, chunk))
        s = jnp.einsum("bd,nd->bn", queries, rows, preferred_element_type=jnp.float32)
        ids = row_offset + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        return _top_k_rows(s, ids, num_rows, kc)  # of the [B, chunk] scores

    n_chunks = n // chunk
    if n_chunks == 1:
        return score_chunk(jnp.int32(0))
    b = queries.shape[0]
    init = (
        jnp.full((b, k), -jnp.inf, jnp.float32),
        jnp.full((b, k), _NO_ID, jnp.int32),
    )

    def step(carry: tuple[jax.Array, jax.Array], c: jax.Array):
        s, i = score_chunk(c)
        return _merge(*carry, s, i, k), None

    (best_s, best_i), _ = jax.lax.scan(step, init, jnp.arange(n_chunks, dtype=jnp.int32))
    return best_s, best_i


def mips_top_k(
    embeddings: jax.Array,  # [N_pad, d] sharded by row_spec(mesh)
    queries: jax.Array,  # [B, d]
    k: int,
    layout: RowLayout,
    mesh: Mesh,
    selection: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Exact top-k by inner product: (scores [B, k] fp32, row ids [B, k] int32), replicated.

    selection, per device: "running" (`lax.top_k` over each [B, chunk] score block, merged
    into a running top-k), "two_pass" (`two_pass_top_k`: block maxima, then the rows of the
    best blocks scored again; only where `two_pass_plan` has shapes for it, else running)
    or "auto" (two-pass wherever `two_pass_plan` finds it worthwhile). All are exact, ties
    to the lower row id (tests/index/test_mips.py). `embeddings` holds values (float32,
    bfloat16) or bf16 values stored as their bits (`to_storage`)."""
    if not 0 < k <= layout.num_rows:
        raise ValueError(f"k={k} must be in [1, {layout.num_rows}] (the number of indexed rows)")
    if selection not in ("auto", "running", "two_pass"):
        raise ValueError(f"selection={selection!r}: one of auto, running, two_pass")
    axes = tuple(mesh.axis_names)
    n = layout.rows_per_shard
    k_local = min(k, n)
    batch, dim = queries.shape
    plan = None
    if selection != "running":
        itemsize = embeddings.dtype.itemsize
        plan = two_pass_plan(batch, layout, k_local, dim, itemsize, worthwhile=selection == "auto")

    # bf16 rows on CPU are sliced as their uint16 bits (see BF16_BITS): stored so, or
    # converted here, for a copy of the block at every search.
    values = value_dtype(embeddings.dtype)
    bits = storage_dtype(values, mesh) == BF16_BITS or embeddings.dtype == BF16_BITS

    def per_device(block: jax.Array, q: jax.Array):
        offset = jax.lax.axis_index(axes).astype(jnp.int32) * n
        q = q.astype(values)
        view = stored_values if bits else lambda x: x
        rows = to_storage(block, BF16_BITS) if bits else block
        if plan is None:
            s, i = _running_top_k(rows, q, k_local, offset, layout.num_rows, layout.chunk, view)
        else:
            s, i = two_pass_top_k(rows, q, k_local, offset, layout.num_rows, plan, view)
        s = jax.lax.all_gather(s, axes, axis=1, tiled=True)  # [B, shards * k_local], row order
        i = jax.lax.all_gather(i, axes, axis=1, tiled=True)
        s, pos = jax.lax.top_k(s, k)
        return s, jnp.take_along_axis(i, pos, axis=1)

    fn = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(row_spec(mesh), PartitionSpec()),
        out_specs=(PartitionSpec(), PartitionSpec()),
        check_vma=False,
    )
    return fn(embeddings, queries)
