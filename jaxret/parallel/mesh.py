"""Device mesh from config, and `jax.distributed` set-up for multi-host runs."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

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


def make_mesh(
    axes: Sequence[str] = ("data", "model"),
    shape: Sequence[int] = (-1, 1),
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """A mesh over all (or the given) devices; the last axis varies fastest (ICI-local)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(axes) != len(shape):
        raise ValueError(f"mesh axes {tuple(axes)} and shape {tuple(shape)} differ in length")
    shape = resolve_shape(shape, len(devices))
    if devices == list(jax.devices()):
        try:
            grid = jax.make_mesh(shape, tuple(axes)).devices
        except Exception:  # irregular topologies: fall back to plain order
            grid = np.asarray(devices).reshape(shape)
    else:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, tuple(axes))


def initialize_distributed(cfg: Any | None = None) -> bool:
    """Calls `jax.distributed.initialize` when configured or when the environment asks for it.

    `cfg` may carry coordinator_address / num_processes / process_id; empty values are left to
    JAX's auto-detection (SLURM, TPU pods, Open MPI). Returns whether it initialized.
    """
    cfg = dict(cfg or {})
    enabled = cfg.get("enabled", "auto")
    env_says = any(k in os.environ for k in ("JAXRET_COORDINATOR", "SLURM_JOB_ID", "TPU_WORKER_ID"))
    if enabled is False or (enabled == "auto" and not (env_says or cfg.get("coordinator_address"))):
        return False
    kwargs = {}
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
    if cfg.get("local_device_ids"):
        kwargs["local_device_ids"] = list(cfg["local_device_ids"])
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
