"""Meshes whose row blocks are contiguous per process (TPU pods), and a distributed start that
cannot silently drive fewer devices than the job has (SLURM)."""

import collections
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
from jax.experimental import mesh_utils

from jaxret.index.mips import RowLayout
from jaxret.index.sharded import process_row_range
from jaxret.parallel.mesh import device_grid, process_contiguous

ROOT = Path(__file__).resolve().parents[2]

# The attributes jax.experimental.mesh_utils reads from a TPU device (as JAX's own
# mesh_utils tests mock them).
MockTpuDevice = collections.namedtuple(
    "MockTpuDevice",
    ["id", "platform", "device_kind", "process_index", "coords", "core_on_chip", "slice_index"],
)


def v4_32():
    """TPU v4-32: 16 chips in a 2×2×4 torus, 4 hosts of 2×2×1 chips, in jax.devices() order."""
    devices = []
    for z in range(4):
        for y in range(2):
            for x in range(2):
                devices.append(MockTpuDevice(len(devices), "tpu", "TPU v4", z, (x, y, z), 0, 0))
    return devices


@pytest.mark.parametrize("shape", [(16, 1), (8, 2), (4, 4), (2, 8)])
def test_row_blocks_are_contiguous_per_process_on_a_v4_32(shape):
    devices = v4_32()
    physical = mesh_utils.create_device_mesh(shape, devices)
    if shape == (16, 1):  # the torus order interleaves the hosts: 0, 1, 2, 3, 0, 1, ...
        assert not process_contiguous(physical)
    grid = device_grid(shape, devices)
    assert process_contiguous(grid)
    layout = RowLayout.for_mesh(21_015_324, types.SimpleNamespace(size=16), 32768)
    mesh = types.SimpleNamespace(devices=grid)
    ranges = [process_row_range(layout, mesh, p) for p in range(4)]
    assert [r.start for r in ranges] == [i * 4 * layout.rows_per_shard for i in range(4)]
    assert sum(len(r) for r in ranges) == layout.padded_rows
    # Inside a host the devices keep the physical (ICI) order of that host's chips.
    for p in range(4):
        mine = [d.id for d in grid.flat if d.process_index == p]
        assert sorted(mine) == [d.id for d in devices if d.process_index == p]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


START = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
import jax
from jaxret.parallel.mesh import initialize_distributed
cfg = dict(enabled="auto", coordinator_address=sys.argv[1], expected_devices=int(sys.argv[2]))
try:
    initialize_distributed(cfg)
except RuntimeError as e:
    print("REFUSED", e, flush=True)
    sys.exit(3)
print("DRIVES", jax.local_device_count(), jax.device_count(), flush=True)
"""


def _launch(expected, port):
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "PYTHONPATH": str(ROOT),
            # A SLURM step of 2 tasks on one node, as srun sets it.
            "SLURM_JOB_ID": "4242",
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_STEP_NUM_NODES": "1",
        }
        cmd = [sys.executable, "-c", START, f"127.0.0.1:{port}", str(expected)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    return [(p.communicate(timeout=300)[0].decode(), p.returncode) for p in procs]


def test_slurm_start_drives_every_device_or_refuses():
    for out, code in _launch(8, _free_port()):
        assert code == 0, out
        assert "DRIVES 4 8" in out
        assert "process" in out and "4 local / 8 global cpu devices" in out  # the banner
    for out, code in _launch(16, _free_port()):  # a job that expected more: never silent
        assert code == 3 and "REFUSED distributed.expected_devices=16 but JAX sees 8" in out, out
