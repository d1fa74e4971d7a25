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


# How each kind of job is found: jax.distributed.initialize's arguments with a mocked
# environment (the real multi-process start is tested above and in the ART loop tests).


@pytest.fixture()
def discovery(monkeypatch):
    import jaxret.parallel.mesh as mesh_mod

    for key in list(os.environ):
        if key.startswith(("SLURM_", "TPU_", "JAXRET_", "JAX_LOCAL_DEVICE_IDS")):
            monkeypatch.delenv(key)
    calls = []
    monkeypatch.setattr(mesh_mod.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(mesh_mod, "tpu_host", lambda: False)
    return mesh_mod, calls


def test_tpu_pod_initializes_with_no_arguments(discovery, monkeypatch):
    """A Cloud TPU VM has no TPU_WORKER_ID: jaxret must still call initialize(), with no
    arguments so that JAX reads the pod from the metadata. Before issue 19 it did not call it
    at all; fails if tpu_host() stops counting as a job."""
    mesh_mod, calls = discovery
    monkeypatch.setattr(mesh_mod, "tpu_host", lambda: True)
    assert mesh_mod.initialize_distributed({"enabled": "auto"})
    assert calls == [{}]


def test_tpu_vm_outside_a_pod_stays_one_process(discovery, monkeypatch):
    mesh_mod, _ = discovery
    monkeypatch.setattr(mesh_mod, "tpu_host", lambda: True)

    def no_pod(**kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(mesh_mod.jax.distributed, "initialize", no_pod)
    assert not mesh_mod.initialize_distributed({"enabled": "auto"})


def test_slurm_passes_every_gpu_of_the_node(discovery, monkeypatch):
    """One task per node driving 8 GPUs: the local device ids reach initialize(). Fails if
    `local_device_ids` is dropped (on CPU JAX would ignore it, so only the arguments tell)."""
    mesh_mod, calls = discovery
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1,2,3,4,5,6,7")
    assert mesh_mod.initialize_distributed({"enabled": "auto"})
    assert calls == [{"local_device_ids": [0, 1, 2, 3, 4, 5, 6, 7]}]
    calls.clear()  # the config's ids win over the environment's
    mesh_mod.initialize_distributed({"enabled": "auto", "local_device_ids": "0,1"})
    assert calls == [{"local_device_ids": [0, 1]}]


def test_explicit_coordinator(discovery, monkeypatch):
    mesh_mod, calls = discovery
    monkeypatch.setenv("JAXRET_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("JAXRET_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXRET_PROCESS_ID", "2")
    assert mesh_mod.initialize_distributed({"enabled": "auto"})
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}]


def test_no_job_no_initialize(discovery):
    mesh_mod, calls = discovery
    assert not mesh_mod.initialize_distributed({"enabled": "auto"})
    assert calls == []


# A global batch the data axis cannot divide (issue 24).


def test_fit_devices_shrinks_on_cpu_to_the_largest_dividing_count():
    """8 CPU devices, batch 4 → 4 devices; batch 6 → 6; with a model axis of 2 the data axis
    (devices / 2) must divide the batch. Fails if the shrink ignores the data axis."""
    from jaxret.parallel.mesh import fit_devices

    devices = list(range(8))
    axes = ("data", "model")
    assert fit_devices(axes, (-1, 1), {"b": 4}, devices, shrink=True) == [0, 1, 2, 3]
    assert fit_devices(axes, (-1, 1), {"b": 6}, devices, shrink=True) == list(range(6))
    assert fit_devices(axes, (-1, 1), {"b": 16}, devices, shrink=True) == devices
    assert fit_devices(axes, (-1, 2), {"b": 2}, devices, shrink=True) == [0, 1, 2, 3]
    assert fit_devices(axes, (-1, 1), {"a": 4, "b": 6}, devices, shrink=True) == [0, 1]


def test_fit_devices_refuses_on_accelerators_naming_the_batch_and_the_fix():
    from jaxret.configlib import ConfigError
    from jaxret.parallel.mesh import fit_devices

    with pytest.raises(ConfigError) as e:
        fit_devices(("data", "model"), (-1, 1), {"train.batch_size": 4}, range(8), shrink=False)
    msg = str(e.value)
    assert "train.batch_size=4" in msg and "8 devices" in msg
    assert "--config.train.batch_size=8" in msg
    with pytest.raises(ConfigError, match="must be ≥ 1"):
        fit_devices(("data", "model"), (-1, 1), {"train.batch_size": 0}, range(8), shrink=True)
