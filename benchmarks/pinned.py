"""Runs the jaxret CLI with XLA's device threads on some cores and every other thread on the
rest: `python benchmarks/pinned.py CORES ARGS…` (CORES e.g. "0"; ARGS as for `jaxret`).

On an accelerator host the devices compute while the host's cores do everything else: the
loop's host work, the checkpoint's background write and checksums. On a CPU host the
"devices" are cores, and background work lands on them (the rehearsal's steps after a
checkpoint were 2-3× slower for it). Pinning XLA's threads to CORES and the training thread,
with every thread it starts later, to the other cores is the nearest a CPU machine gets to an
accelerator host (`benchmarks/rehearsal.py --device-cores`). Linux only.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    device_cores = {int(c) for c in sys.argv[1].split(",")}
    host_cores = os.sched_getaffinity(0) - device_cores
    if not device_cores <= os.sched_getaffinity(0) or not host_cores:
        raise SystemExit(
            f"cores {sorted(device_cores)}: need some of, not all of, "
            f"{sorted(os.sched_getaffinity(0))}"
        )
    # A thread inherits its creator's affinity: XLA's threads, started when the backend is
    # created (inside initialize_distributed), get the device cores.
    os.sched_setaffinity(0, device_cores)

    import jax

    from jaxret import cli
    from jaxret.parallel import mesh

    start = mesh.initialize_distributed

    def initialize_then_move_to_host_cores(cfg=None):  # noqa: ANN001, ANN202
        out = start(cfg)
        jax.devices()  # the backend exists, its threads on the device cores
        os.sched_setaffinity(0, host_cores)  # this thread only (Linux affinity is per thread)
        return out

    mesh.initialize_distributed = initialize_then_move_to_host_cores
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
