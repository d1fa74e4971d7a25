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
from jaxret.index.sharded import process_row_range


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
    """Places a token table on the devices in the index layout; each process reads only its
    own rows through `rows_fn(start, stop) -> [stop − start, L]` (padding rows are zeros)."""
    rows = process_row_range(layout, mesh)
    local = np.asarray(rows_fn(rows.start, rows.stop), dtype)
    shape = (layout.padded_rows, local.shape[1])
    return jax.make_array_from_process_local_data(row_sharding(mesh), local, shape)
