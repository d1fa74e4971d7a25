"""What a checkpoint of the rolling index costs the steps after it on a CPU "device": the
whole index as an Orbax item (jaxret before 2026-12-03) against the row snapshot
(train/row_snapshot.py) that jaxret uses now.

    python benchmarks/checkpoint_snapshot.py [--rows 2000000] [--dim 64] [--slice 4096]

The rolling refresh overwrites a slice of the index in place (a donated buffer) every step.
As an Orbax item, on CPU (the "device" buffer already is host memory) the save's hold takes
a reference, and the next donated update, finding the buffer still referenced by the write
in progress, copies the whole index first; on GPU/TPU the hold itself copies the device's
whole share to the host. The row snapshot reads each slice into its own small buffer before
the step that overwrites it (`Manager.before_step`), over `rows_save_steps` steps. Printed:
the hold, the first and second updates after the save, and the ratio of the first to a
plain update, with the refresh's update shape.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxret.train.checkpoint import Manager  # noqa: E402
from jaxret.train.row_snapshot import Rows  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--slice", type=int, default=4096)
    args = p.parse_args()
    new_rows = jnp.ones((args.slice, args.dim), jnp.float32)
    update = jax.jit(
        lambda index, start: jax.lax.dynamic_update_slice(index, new_rows, (start, 0)),
        donate_argnums=0,
    )

    def timed(index: jax.Array, start: int) -> tuple[jax.Array, float]:
        t0 = time.perf_counter()
        index = update(index, np.int32(start))
        index.block_until_ready()
        return index, time.perf_counter() - t0

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("rows",))
    rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
    index = jax.device_put(jnp.zeros((args.rows, args.dim), jnp.float32), rows_sharding)
    for i in range(3):
        index, plain = timed(index, i)
    print(
        f"index {args.rows:,} × {args.dim} fp32 ({index.nbytes / 1e6:.0f} MB) on {jax.devices()[0]}"
    )
    print(f"in-place update of {args.slice} rows, no checkpoint: {plain * 1e3:.2f} ms")
    pieces = -(-args.rows // args.slice)
    ring = iter(range(10**9))
    for mode in ("whole index as an Orbax item", "row snapshot"):
        with tempfile.TemporaryDirectory() as folder:
            manager = Manager(folder, keep=2, rows_save_steps=50)
            for step in (1, 2):
                t0 = time.perf_counter()
                if mode == "row snapshot":
                    rows = lambda p: Rows({"embeddings": index}, args.slice, pieces, p % pieces)
                    piece = next(ring)
                    manager.save(step, {"w": jnp.ones(4)}, None, {}, rows(piece))
                else:
                    piece = next(ring)
                    manager.save(step, {"w": jnp.ones(4)}, {"embeddings": index}, {})
                hold = time.perf_counter() - t0
                times = []
                for _ in range(2):
                    t0 = time.perf_counter()
                    if mode == "row snapshot":
                        manager.before_step(rows(piece))
                    index, _ = timed(index, (piece % pieces) * args.slice)
                    times.append(time.perf_counter() - t0)
                    piece = next(ring)
                if mode == "row snapshot":  # the rest of the ring read at once
                    manager._rows.finish({"embeddings": index})
                manager.wait()
                print(
                    f"{mode}, checkpoint {step}: hold {hold * 1e3:.1f} ms; update after it "
                    f"{times[0] * 1e3:.2f} ms ({times[0] / plain:.1f} × plain), the next "
                    f"{times[1] * 1e3:.2f} ms"
                )


if __name__ == "__main__":
    main()
