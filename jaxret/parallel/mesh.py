"""Device mesh from config, and `jax.distributed` set-up for multi-host runs.

Two properties the rest of jaxret relies on:

* The mesh's flattened device order gives every process one contiguous run of positions.
  The index and the token tables are split into row blocks in that order, so each process
  owns one contiguous range of rows (what it encodes, reads and saves). On a TPU pod the
  physical (torus) order interleaves hosts; `device_grid` keeps the physical order inside
  each process and puts processes one after another.
* A multi-host start can never silently drive fewer devices than the job has: the
  distributed config can name the local devices (`local_device_ids`, or
  `JAX_LOCAL_DEVICE_IDS`) and the count it expects (`expected_devices`), and every process
  logs a banner of what it got.
* A global batch the data axis cannot divide never reaches a device: `mesh_from_config`
  checks it before any work. On a single-process CPU host, where the device count is only a
  way to use the cores, it takes the largest number of devices that divides every batch (the
  results are the same, within fp32 reduction order); on accelerators and multi-process jobs
  it refuses, naming the batch, the device count and the fix.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxret.configlib import ConfigError
from jaxret.errors import RunError
from jaxret.parallel.axes import DATA_AXIS, MODEL_AXIS

log = logging.getLogger(__name__)


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills the single -1 with "the rest of the devices"; the product must equal the count."""
    shape = list(shape)
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive or -1")
    known = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh shape {tuple(shape)} does not divide {num_devices} devices")
        shape[free[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {num_devices}"
        )
    return tuple(shape)


def process_contiguous(grid: np.ndarray) -> bool:
    """Whether every process's devices occupy one contiguous run of the flattened grid."""
    owners = [d.process_index for d in grid.flat]
    runs = [p for i, p in enumerate(owners) if i == 0 or owners[i - 1] != p]
    return len(runs) == len(set(runs))


def _object_grid(devices: Sequence[Any], shape: Sequence[int]) -> np.ndarray:
    grid = np.empty(len(devices), dtype=object)
    for i, d in enumerate(devices):  # element by element: never unpack a device
        grid[i] = d
    return grid.reshape(tuple(shape))


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """Devices arranged as `shape`: physically ordered (ICI-local along the last axis) and
    contiguous per process in the flattened order."""
    devices = list(devices)
    shape = resolve_shape(shape, len(devices))
    processes = sorted({d.process_index for d in devices})
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # irregular topologies: plain order
        grid = _object_grid(devices, shape)
    if len(processes) == 1 or process_contiguous(grid):
        return grid
    # Processes as the outer (DCN-like) granule of the first axis; the physical order is kept
    # inside each process.
    if shape[0] % len(processes) == 0:
        ici = [shape[0] // len(processes), *shape[1:]]
        dcn = [len(processes)] + [1] * (len(shape) - 1)
        try:
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True)
            if process_contiguous(grid):
                return grid
        except Exception:
            pass
    return _object_grid(sorted(devices, key=lambda d: (d.process_index, d.id)), shape)


def make_mesh(
    axes: Sequence[str] = (DATA_AXIS, MODEL_AXIS),
    shape: Sequence[int] = (-1, 1),
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """A mesh over all (or the given) devices (see `device_grid` for the order)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(axes) != len(shape):
        raise ValueError(f"mesh axes {tuple(axes)} and shape {tuple(shape)} differ in length")
    return Mesh(device_grid(shape, devices), tuple(axes))


def data_axis_size(axes: Sequence[str], shape: Sequence[int], num_devices: int) -> int | None:
    """Devices along the "data" axis of `shape` over `num_devices` (None: shape does not fit)."""
    try:
        resolved = resolve_shape(shape, num_devices)
    except ValueError:
        return None
    return resolved[list(axes).index(DATA_AXIS)] if DATA_AXIS in axes else 1


def fit_devices(
    axes: Sequence[str],
    shape: Sequence[int],
    batches: Mapping[str, int],
    devices: Sequence[Any],
    shrink: bool,
) -> list[Any]:
    """The devices a mesh of `shape` uses so that its data axis divides every global batch.

    `batches` maps a config key to a global batch sharded over the data axis. All devices
    when they divide every batch; otherwise, with `shrink` (a single-process CPU host), the
    largest leading subset that does; otherwise a ConfigError naming the batch and the fix.
    """
    devices = list(devices)
    bad = {k: b for k, b in batches.items() if int(b) < 1}
    if bad:
        raise ConfigError(", ".join(f"{k}={b}" for k, b in bad.items()) + ": must be ≥ 1")

    def divides(n: int) -> bool:
        d = data_axis_size(axes, shape, n)
        return d is not None and all(int(b) % d == 0 for b in batches.values())

    n = len(devices)
    if divides(n):
        return devices
    if shrink:
        for m in range(n - 1, 0, -1):
            if divides(m):
                log.warning(
                    "jaxret: %s not divisible by %d CPU devices: using %d of them (the same "
                    "results; set XLA_FLAGS=--xla_force_host_platform_device_count=%d to match)",
                    ", ".join(f"{k}={b}" for k, b in batches.items()),
                    n,
                    m,
                    m,
                )
                return devices[:m]
    d = data_axis_size(axes, shape, n)
    if d is None:
        resolve_shape(shape, n)  # raises the shape's own error
    wrong = [f"{k}={b}" for k, b in batches.items() if int(b) % d]
    multiple = math.lcm(*(int(b) for b in batches.values()), d) if batches else d
    raise ConfigError(
        f"{', '.join(wrong)} cannot be split over the {d} devices of the mesh's data axis "
        f"(mesh.shape={tuple(shape)} over {n} devices): make each batch a multiple of {d} "
        f"(e.g. --config.{next(k for k, b in batches.items() if int(b) % d)}={multiple}), or "
        f"give mesh.shape a model axis so that the data axis divides it"
    )


def mesh_from_config(cfg: Any, batches: Mapping[str, int] | None = None) -> Mesh:
    """Distributed start (`initialize_distributed`) and the run's mesh, checked against its
    global batches before any work (see `fit_devices`). `cfg` has `mesh` (axes, shape) and
    optionally `distributed`."""
    initialize_distributed(cfg.get("distributed"))
    axes, shape = tuple(cfg.mesh.axes), tuple(cfg.mesh.shape)
    shrink = jax.default_backend() == "cpu" and jax.process_count() == 1
    devices = fit_devices(axes, shape, dict(batches or {}), jax.devices(), shrink)
    mesh = make_mesh(axes, shape, devices)
    log.info("jaxret: %s", device_banner(mesh))
    return mesh


def _device_ids(value: Any) -> list[int] | None:
    if value in (None, "", (), []):
        return None
    if isinstance(value, str):
        return [int(x) for x in value.replace(" ", "").split(",") if x]
    if isinstance(value, int):
        return [value]
    return [int(x) for x in value]


def _slurm_gpus_per_task() -> int | None:
    """GPUs each task of this SLURM step may drive, when the environment says."""
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not gpus or not tasks:
        return None
    try:
        per_node = int(tasks.split("(")[0].split(",")[0])
        return max(1, int(gpus) // max(1, per_node))
    except ValueError:
        return None


def tpu_host() -> bool:
    """Whether this is a TPU VM (libtpu installed and JAX not told to use another platform).
    A Cloud TPU VM keeps its worker id and peers in its metadata, not in the environment."""
    import importlib.util

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms.split(","):
        return False
    return importlib.util.find_spec("libtpu") is not None


def initialize_distributed(cfg: Any | None = None) -> bool:
    """Calls `jax.distributed.initialize` when configured or when the environment asks for it.

    How a process finds the job (enabled="auto"): an explicit coordinator
    (`coordinator_address` or JAXRET_COORDINATOR, with JAXRET_NUM_PROCESSES / _PROCESS_ID);
    a SLURM job (JAX reads its variables); a TPU VM, where `initialize()` gets no arguments
    and JAX reads the pod from the VM's metadata (a single-host TPU VM stays one process).
    `cfg` may carry coordinator_address / num_processes / process_id / local_device_ids
    (ints, "0,1,2,3", or empty for JAX's default) / expected_devices (0 = don't check).
    Returns whether it initialized. Either way the device counts are checked and the banner
    logged.
    """
    cfg = dict(cfg or {})
    enabled = cfg.get("enabled", "auto")
    env_says = any(k in os.environ for k in ("JAXRET_COORDINATOR", "SLURM_JOB_ID", "TPU_WORKER_ID"))
    tpu = tpu_host()
    env_says = env_says or tpu
    initialized = False
    if not (
        enabled is False or (enabled == "auto" and not (env_says or cfg.get("coordinator_address")))
    ):
        kwargs: dict[str, Any] = {}
        address = cfg.get("coordinator_address") or os.environ.get("JAXRET_COORDINATOR")
        if address:
            kwargs["coordinator_address"] = address
        for key, env in (
            ("num_processes", "JAXRET_NUM_PROCESSES"),
            ("process_id", "JAXRET_PROCESS_ID"),
        ):
            value = cfg.get(key)
            value = os.environ.get(env) if value in (None, -1, "") else value
            if value not in (None, ""):
                kwargs[key] = int(value)
        ids = _device_ids(cfg.get("local_device_ids"))
        if ids is None:
            ids = _device_ids(os.environ.get("JAX_LOCAL_DEVICE_IDS"))
        if ids is not None:
            kwargs["local_device_ids"] = ids
        elif "SLURM_JOB_ID" in os.environ and (_slurm_gpus_per_task() or 1) > 1:
            # JAX would take [SLURM_LOCALID] (jax-ml/jax#16788): one GPU per task.
            log.warning(
                "SLURM gives each task %d GPUs but no local_device_ids were set: JAX drives "
                "only GPU SLURM_LOCALID. Set distributed.local_device_ids or JAX_LOCAL_DEVICE_IDS "
                "(launch/gpu_slurm.sh does).",
                _slurm_gpus_per_task(),
            )
        try:
            jax.distributed.initialize(**kwargs)
            initialized = True
        except ValueError as e:
            # A TPU VM outside a pod: JAX finds no coordinator to join (the device check
            # below still refuses a job that expected more devices).
            if not (tpu and not kwargs):
                raise
            log.info("jaxret: no TPU pod found (%s): one process", e)
    check_devices(cfg.get("expected_devices") or 0)
    return initialized


def device_banner(mesh: Mesh | None = None) -> str:
    local, total = jax.local_device_count(), jax.device_count()
    text = (
        f"process {jax.process_index()} of {jax.process_count()}: {local} local / {total} global "
        f"{jax.default_backend()} devices ({jax.local_devices()[0].device_kind})"
    )
    if mesh is not None:
        text += f", mesh {dict(mesh.shape)}"
    return text


def check_devices(expected: int = 0) -> None:
    """Logs the banner (WARNING, every process) and refuses a start with fewer devices than
    the job expects, or a GPU task that SLURM gave more GPUs than JAX drives."""
    # Every process of a multi-host job says what it drives; a single process only at INFO.
    level = logging.WARNING if jax.process_count() > 1 else logging.INFO
    log.log(level, "jaxret: %s", device_banner())
    total = jax.device_count()
    if expected and total != int(expected):
        raise RunError(
            f"distributed.expected_devices={expected} but JAX sees {total} devices "
            f"({device_banner()}). On SLURM with one task per node, set "
            "distributed.local_device_ids (or JAX_LOCAL_DEVICE_IDS) to every GPU of the node."
        )
    per_task = _slurm_gpus_per_task()
    if jax.default_backend() == "gpu" and per_task and jax.local_device_count() < per_task:
        raise RunError(
            f"SLURM gives this task {per_task} GPUs but JAX drives {jax.local_device_count()}: "
            "set distributed.local_device_ids (or JAX_LOCAL_DEVICE_IDS)"
        )
