"""Exact maximum inner product search over an embedding matrix sharded by rows.

Layout: [N_pad, d] rows split into equal contiguous blocks over *every* device of the mesh
(PartitionSpec over all mesh axes), each block a whole number of `chunk` rows. Rows ≥ N are
padding and never returned.

Per device: scores = q · blockᵀ chunk by chunk (fp32 accumulation), a running local top-k;
then all_gather of the local candidates and one global top-k. lax.top_k keeps the lower
index among equal scores and candidates are concatenated in row order, so ties always go to
the lower row id, on any device count.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_NO_ID = jnp.iinfo(jnp.int32).max


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
        if num_rows <= 0:
            raise ValueError("an index needs at least one row")
        shards = mesh.size
        per_shard = math.ceil(num_rows / shards)
        chunk = max(1, min(chunk_rows, per_shard))
        per_shard = math.ceil(per_shard / chunk) * chunk
        return cls(num_rows, shards, per_shard, chunk)


def row_spec(mesh: Mesh) -> PartitionSpec:
    return PartitionSpec(tuple(mesh.axis_names))


def row_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, row_spec(mesh))


def _merge(a_s: jax.Array, a_i: jax.Array, b_s: jax.Array, b_i: jax.Array, k: int):
    """Top-k of two candidate lists; `a` holds lower row ids, so it wins ties."""
    s = jnp.concatenate([a_s, b_s], axis=1)
    i = jnp.concatenate([a_i, b_i], axis=1)
    s, pos = jax.lax.top_k(s, k)
    return s, jnp.take_along_axis(i, pos, axis=1)


def block_size(chunk: int, k: int) -> int:
    """Rows per block of the block-max selection over a [B, chunk] score block: ≈ √(chunk /
    k), so that its two selections (over ⌈chunk / m⌉ block maxima, then over k·m
    candidates) are about the same size; 0 (plain `top_k`) when that saves nothing."""
    if chunk < 4096 or 4 * k > chunk:
        return 0
    m = int(math.sqrt(chunk / k))
    return m if m >= 2 and k * m < chunk // 2 else 0


def block_top_k(scores: jax.Array, ids: jax.Array, k: int, m: int) -> tuple[jax.Array, jax.Array]:
    """Exact top-k (k ≤ C) of scores [B, C] (ids [C] ascending), ties to the lower id, without
    sorting all C scores: the blocks of m consecutive columns are ranked by their maximum;
    the top-k blocks hold the top-k scores (a block outside them has k blocks ahead of it,
    each with a score ahead of all of its own, ties included: blocks tie-break by position
    as their rows do), so top_k runs over C / m maxima and over k·m candidates, the selected
    blocks taken in column order so that ties still go to the lower id. m = 0: plain top_k."""
    if m == 0:
        s, pos = jax.lax.top_k(scores, k)
        return s, ids[pos]
    b, c = scores.shape
    pad = -c % m  # -inf columns past the end: behind every real column, ties included
    if pad:
        scores = jnp.pad(scores, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        ids = jnp.pad(ids, (0, pad), constant_values=_NO_ID)
        c += pad
    blocks = scores.reshape(b, c // m, m)
    kb = min(k, c // m)
    _, chosen = jax.lax.top_k(blocks.max(axis=2), kb)  # [B, kb]
    chosen = jnp.sort(chosen, axis=1)  # column order: ties keep going to the lower id
    cand = jnp.take_along_axis(blocks, chosen[:, :, None], axis=1).reshape(b, kb * m)
    cols = (chosen[:, :, None] * m + jnp.arange(m)[None, None, :]).reshape(b, kb * m)
    s, pos = jax.lax.top_k(cand, k)
    return s, ids[jnp.take_along_axis(cols, pos, axis=1)]


def _local_top_k(
    block: jax.Array,  # [n, d] this device's rows
    queries: jax.Array,  # [B, d]
    k: int,
    row_offset: jax.Array,  # first global row id of the block
    num_rows: int,
    chunk: int,
    blocks: int = 0,  # block_top_k's m (0: plain top_k)
) -> tuple[jax.Array, jax.Array]:
    n, d = block.shape
    k_local = min(k, n)
    kc = min(k_local, chunk)
    q = queries.astype(block.dtype)

    def score_chunk(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        # A window of the block, not a copy of it: the index is read once, in place.
        rows = jax.lax.dynamic_slice_in_dim(block, c * chunk, chunk)
        s = jnp.einsum("bd,nd->bn", q, rows, preferred_element_type=jnp.float32)  # [B, chunk]
        ids = row_offset + c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        s = jnp.where(ids[None, :] < num_rows, s, -jnp.inf)
        return block_top_k(s, ids, kc, blocks)

    n_chunks = n // chunk
    if n_chunks == 1:
        return score_chunk(jnp.int32(0))
    b = queries.shape[0]
    init = (
        jnp.full((b, k_local), -jnp.inf, jnp.float32),
        jnp.full((b, k_local), _NO_ID, jnp.int32),
    )

    def step(carry: tuple[jax.Array, jax.Array], c: jax.Array):
        s, i = score_chunk(c)
        return _merge(*carry, s, i, k_local), None

    (best_s, best_i), _ = jax.lax.scan(step, init, jnp.arange(n_chunks, dtype=jnp.int32))
    return best_s, best_i


def mips_top_k(
    embeddings: jax.Array,  # [N_pad, d] sharded by row_spec(mesh)
    queries: jax.Array,  # [B, d]
    k: int,
    layout: RowLayout,
    mesh: Mesh,
    blocks: int | str = 0,
) -> tuple[jax.Array, jax.Array]:
    """Exact top-k by inner product: (scores [B, k] fp32, row ids [B, k] int32), replicated.

    blocks: the per-chunk selection. 0 (default): `lax.top_k` over each [B, chunk] score
    block — on this project's 2-core CPU it measured faster than the block-max selection at
    every size tried (benchmarks/mips.py, docs/measurements.md); "auto" (`block_size`) or an
    m ≥ 2: `block_top_k`, exact as well (tests/index/test_mips.py), for backends whose top_k
    is a full sort."""
    if not 0 < k <= layout.num_rows:
        raise ValueError(f"k={k} must be in [1, {layout.num_rows}] (the number of indexed rows)")
    axes = tuple(mesh.axis_names)
    m = block_size(layout.chunk, min(k, layout.chunk)) if blocks == "auto" else int(blocks)

    def per_device(block: jax.Array, q: jax.Array):
        offset = jax.lax.axis_index(axes).astype(jnp.int32) * layout.rows_per_shard
        s, i = _local_top_k(block, q, k, offset, layout.num_rows, layout.chunk, m)
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
