"""What a checkpoint of the rolling index costs the steps after it on a CPU "device".

    python benchmarks/checkpoint_snapshot.py [--rows 2000000] [--dim 64]

The rolling refresh overwrites a slice of the index in place (a donated buffer) every step.
On GPU/TPU a checkpoint's hold copies the index to host memory and the steps after it go on
as before. On CPU the "device" buffer already is host memory: the hold takes a reference, and
the next donated update, finding the buffer still referenced by the write in progress, copies
the whole index first (JAX never overwrites what a checkpoint is writing). This prints the
hold, the first and second in-place updates after a save, and one after the write finished,
with jaxret's checkpoint `Manager` and the refresh's update shape (4,096 rows).
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

    index = jnp.zeros((args.rows, args.dim), jnp.float32)  # [N, d]
    for i in range(3):
        index, plain = timed(index, i)
    print(
        f"index {args.rows:,} × {args.dim} fp32 ({index.nbytes / 1e6:.0f} MB) on {jax.devices()[0]}"
    )
    print(f"in-place update of {args.slice} rows, no checkpoint: {plain * 1e3:.2f} ms")
    with tempfile.TemporaryDirectory() as folder:
        manager = Manager(folder, keep=2, aux_latest_only=True)
        for step in (1, 2):
            t0 = time.perf_counter()
            manager.save(step, {"w": jnp.ones(4)}, {"embeddings": index}, {})
            hold = time.perf_counter() - t0
            index, first = timed(index, 10)
            index, second = timed(index, 11)
            manager.wait()
            index, after = timed(index, 12)
            print(
                f"checkpoint {step}: hold {hold * 1e3:.0f} ms; update after it {first * 1e3:.0f} "
                f"ms, the next {second * 1e3:.2f} ms; after the write finished {after * 1e3:.2f} ms"
            )


if __name__ == "__main__":
    main()
