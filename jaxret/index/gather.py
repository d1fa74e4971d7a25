"""Gather rows of a row-sharded table (token rows of the corpus) inside a jitted step.

The table is laid out exactly like the index (`RowLayout`), so the row ids that a search
returns address it directly. Each device contributes the rows it owns and a psum assembles
them: traffic is the gathered rows only, never the table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxret.index.mips import RowLayout, row_sharding, row_spec


def gather_rows(table: jax.Array, ids: jax.Array, layout: RowLayout, mesh: Mesh) -> jax.Array:
    """table [N_pad, L] sharded by rows, ids [M] (replicated) → rows [M, L] (replicated)."""
    axes = tuple(mesh.axis_names)

    def per_device(block: jax.Array, ids: jax.Array) -> jax.Array:
        start = jax.lax.axis_index(axes).astype(jnp.int32) * layout.rows_per_shard
        local = ids - start
        mine = (local >= 0) & (local < layout.rows_per_shard)
        rows = jnp.take(block, jnp.clip(local, 0, layout.rows_per_shard - 1), axis=0)
        rows = jnp.where(mine[:, None], rows.astype(jnp.int32), 0)
        return jax.lax.psum(rows, axes)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(row_spec(mesh), PartitionSpec()),
        out_specs=PartitionSpec(),
        check_vma=False,
    )(table, ids)


def device_table(
    rows_fn: object, layout: RowLayout, mesh: Mesh, dtype: np.dtype = np.int32
) -> jax.Array:
    """Places a token table on the devices in the index layout [N_pad, L].

    `rows_fn(start, stop) -> [stop − start, L]` returns rows of the table (rows ≥ N are
    padding: zeros). Each device's block is read on its own process as it is placed, in the
    table's own compact dtype (uint16 for 30k/32k vocabularies): a process reads only the rows
    its devices own, wherever the mesh puts them.
    """
    width = np.asarray(rows_fn(0, 1)).shape[1]

    def block(index: tuple[slice, ...]) -> np.ndarray:
        rows = index[0]
        start = rows.start or 0
        stop = layout.padded_rows if rows.stop is None else rows.stop
        return np.asarray(rows_fn(start, stop), dtype)[:, index[1]]

    return jax.make_array_from_callback((layout.padded_rows, width), row_sharding(mesh), block)


def memmap_rows(array: np.ndarray, num_rows: int) -> object:
    """rows_fn over a memory-mapped [N, L] array: reads only the asked rows, zero past N."""

    def rows(start: int, stop: int) -> np.ndarray:
        out = np.zeros((stop - start, array.shape[1]), array.dtype)
        real = max(0, min(stop, num_rows) - start)
        if real:
            out[:real] = array[start : start + real]
        return out

    return rows
