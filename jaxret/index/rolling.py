"""Rolling index refresh: a fixed slice of every device's own rows re-encoded after every step.

A synchronous refresh stops training every `R` steps while the whole corpus is re-embedded.
The rolling refresh spreads the same work over the `R` steps: after step `done` (1-based),
every device re-encodes rows

    [o, o + s) of its own block,   o = ((done − 1) mod R) · s,

with s ≥ ceil(rows_per_shard / R) a whole number of equal encoder chunks (`slice_plan`:
the fewest chunks of at most `device_batch` rows, as even as possible), so every encoder
call is a full batch whatever the sizes — 21M rows on 16 devices with R = 500 is a slice
of 2627 rows (a prime): 11 chunks of 239, not 2627 calls of one row. Rows past the block's
end are read clamped and their writes dropped: rows are never encoded twice in a cycle. The
slice is encoded with the current passage tower and written into the index block in place. After
`R` steps every row has been refreshed once. The token rows, the index rows and the staleness
record all live on the device that owns them (the index layout), so the refresh moves no data
between devices; the passage tower's parameters are gathered as in any forward pass.

The same update runs either as its own program dispatched after the step
(`rolling_refresher`) or inside the ART train step (`rolling_update` handed to
methods.art.step.make_train_step), chosen by `art.rolling_program`.

`stale[row]` [N_pad] int32 is the step whose parameters produced the row (0 = the initial
encoding); staleness at step t is t − stale[row]. Its sums are taken in fp32: an int32 sum of
21M ages of ~500 steps overflows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxret.index.encode import tokens_from_table
from jaxret.index.mips import RowLayout, row_sharding, row_spec, to_storage
from jaxret.index.sharded import ShardedIndex
from jaxret.models.dual_encoder import DualEncoder
from jaxret.parallel.activations import map_rows


def slice_plan(layout: RowLayout, refresh_every: int, device_batch: int) -> tuple[int, int]:
    """(s, chunk): each device re-encodes s rows per step in s / chunk encoder calls of
    `chunk` rows. The fewest calls of at most `device_batch` rows that cover
    ceil(rows_per_shard / refresh_every), split as evenly as possible (chunk > device_batch / 2
    whenever the slice is at least a batch)."""
    if refresh_every < 1:
        raise ValueError(f"refresh_every must be ≥ 1, got {refresh_every}")
    if device_batch < 1:
        raise ValueError(f"encode.device_batch must be ≥ 1, got {device_batch}")
    need = math.ceil(layout.rows_per_shard / refresh_every)
    calls = math.ceil(need / device_batch)
    chunk = math.ceil(need / calls)
    return calls * chunk, chunk


def slice_rows(layout: RowLayout, refresh_every: int, device_batch: int) -> int:
    """Rows each device re-encodes per step (see `slice_plan`)."""
    return slice_plan(layout, refresh_every, device_batch)[0]


def slice_indices(done: jax.Array, rows_per_shard: int, s: int, refresh_every: int) -> tuple:
    """(rows to read [s] (clamped into the block), rows to write [s] (past-the-end = dropped))
    of the slice refreshed after step `done`, in block-local row numbers."""
    local = ((done - 1) % refresh_every) * s + jnp.arange(s, dtype=jnp.int32)
    read = jnp.minimum(local, rows_per_shard - 1)
    write = jnp.where(local < rows_per_shard, local, rows_per_shard)
    return read, write


def empty_staleness(layout: RowLayout, mesh: Mesh, step: int = 0) -> jax.Array:
    """stale [N_pad] int32, all `step`: an index encoded whole at `step` (0: the initial
    parameters)."""
    return jax.jit(
        lambda: jnp.full((layout.padded_rows,), step, jnp.int32),
        out_shardings=row_sharding(mesh),
    )()


def rolling_update(
    encoder: DualEncoder, mesh: Mesh, layout: RowLayout, refresh_every: int, per_device: int
) -> Any:
    """update(params, tables, embeddings, stale, done) → (embeddings, stale, stats), not jitted:
    the body of the separate refresh program (`rolling_refresher`) and of the ART step that
    carries the refresh inside it (methods.art.step.make_train_step(roll=…)).

    params: the dual encoder's parameters (the passage tower is used); tables: token rows
    [N_pad, L] in the index layout; embeddings [N_pad, d] and stale [N_pad] are updated in place
    when donated; done: the number of completed train steps (int32 scalar). stats: the real rows
    encoded now ("encoded") and the staleness of the real rows after this refresh
    ("staleness_max", "staleness_mean").
    """
    axes = tuple(mesh.axis_names)
    rows = row_spec(mesh)
    rps, n_real = layout.rows_per_shard, layout.num_rows
    s, chunk = slice_plan(layout, refresh_every, per_device)

    def block_rows() -> jax.Array:  # [rps]: the global row ids of this device's block
        return jax.lax.axis_index(axes).astype(jnp.int32) * rps + jnp.arange(rps, dtype=jnp.int32)

    def take(tables: dict, done: jax.Array) -> dict:
        read, _ = slice_indices(done, rps, s, refresh_every)
        return {k: jnp.take(v, read, axis=0) for k, v in tables.items()}

    def put(emb: jax.Array, stale: jax.Array, new: jax.Array, done: jax.Array) -> tuple:
        _, write = slice_indices(done, rps, s, refresh_every)
        emb = emb.at[write].set(to_storage(new, emb.dtype), mode="drop")
        stale = stale.at[write].set(done, mode="drop")
        global_rows = block_rows()
        written = (write < rps) & (jnp.take(global_rows, jnp.minimum(write, rps - 1)) < n_real)
        age = jnp.where(global_rows < n_real, done - stale, 0)
        stats = {
            "encoded": jax.lax.psum(written.sum(), axes).astype(jnp.float32),
            "staleness_max": jax.lax.pmax(age.max(), axes).astype(jnp.float32),
            "staleness_mean": jax.lax.psum(age.astype(jnp.float32).sum(), axes) / n_real,
        }
        return emb, stale, stats

    local_take = jax.shard_map(
        take, mesh=mesh, in_specs=(rows, PartitionSpec()), out_specs=rows, check_vma=False
    )
    local_put = jax.shard_map(
        put,
        mesh=mesh,
        in_specs=(rows, rows, rows, PartitionSpec()),
        out_specs=(rows, rows, PartitionSpec()),
        check_vma=False,
    )

    def update(params: Any, tables: dict, emb: jax.Array, stale: jax.Array, done: jax.Array):
        done = jnp.asarray(done, jnp.int32)
        picked = local_take(tables, done)  # [D·s, L], each device's own rows
        embed = lambda t: encoder.embed(params, "passage", tokens_from_table(t))
        new = map_rows(embed, picked, mesh, axes, chunk)  # [D·s, d], row-sharded
        return local_put(emb, stale, new, done)

    return update


@functools.lru_cache(maxsize=16)
def rolling_refresher(
    encoder: DualEncoder, mesh: Mesh, layout: RowLayout, refresh_every: int, per_device: int
) -> Any:
    """jit(params, tables, embeddings, stale, done) → (embeddings, stale, stats): the rolling
    refresh as its own program, dispatched after the train step; embeddings and stale are
    donated (see `rolling_update`)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        rolling_update(encoder, mesh, layout, refresh_every, per_device),
        out_shardings=(row_sharding(mesh), row_sharding(mesh), replicated),
        donate_argnums=(2, 3),
    )


@functools.partial(jax.jit, static_argnames=("num_rows",))
def _ages(stale: jax.Array, step: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    age = jnp.where(jnp.arange(stale.shape[0]) < num_rows, step - stale, 0)
    return age.max(), age.astype(jnp.float32).sum()  # fp32: an int32 sum overflows at 21M


def staleness(stale: jax.Array, layout: RowLayout, step: int) -> dict[str, float]:
    """Max and mean age (steps) of the real rows of an index at `step` (reduced on the
    devices: on several hosts no process holds every row)."""
    high, total = jax.device_get(_ages(stale, jnp.int32(step), layout.num_rows))
    return {"staleness_max": float(high), "staleness_mean": float(total) / layout.num_rows}


def refresh_in_slices(
    encoder: DualEncoder,
    params: Any,
    tables: dict[str, jax.Array],
    index: ShardedIndex,
    per_device: int,
    fingerprint: dict[str, Any] | None = None,
    check: Callable[[], None] | None = None,
    calls_per_slice: int = 16,
) -> ShardedIndex:
    """A new index of `tables` encoded with `params`: one whole rolling cycle run back to
    back, slices of at most `calls_per_slice` encoder calls of `per_device` rows per device,
    with `check()` between them. A SIGTERM is seen after one slice — at the paper's size
    (1.34M rows per device, 256-row batches) 328 slices of ~1.5 s on an A100 instead of one
    8-minute program. `index`'s buffer is donated (unusable afterwards, also when `check`
    raises).

    At most two slices are in flight: slice k is dispatched before slice k − 1 is waited
    for, so the devices never idle, and `check()` runs while slices are still to come.
    Dispatched back to back without a wait, slices queue up to XLA's in-flight limit, and
    on a CPU with several devices in one process that queue deadlocks in the slices'
    all-reduce (XLA's 40 s rendezvous timeout then aborts the process: 2M rows on 2
    devices, docs/scaling.md).
    """
    layout, mesh = index.layout, index.mesh
    slices = max(1, math.ceil(layout.rows_per_shard / (calls_per_slice * per_device)))
    fn = rolling_refresher(encoder, mesh, layout, slices, per_device)
    emb, stale = index.embeddings, empty_staleness(layout, mesh)  # stale: unused here
    previous = None  # the stats of the slice before: not donated, so it can be waited on
    for done in range(1, slices + 1):
        emb, stale, stats = fn(params, tables, emb, stale, np.int32(done))
        if previous is not None:
            jax.block_until_ready(previous)
        previous = stats
        if check is not None and done < slices:
            check()
    meta = index.meta if fingerprint is None else fingerprint
    return ShardedIndex(emb, layout, mesh, tuple(sorted(meta.items())))
