"""Host numpy batches → global jax.Arrays, single- and multi-process."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxret.parallel.axes import DATA


def global_batch(local: Any, mesh: Mesh, spec: PartitionSpec = DATA) -> Any:
    """Each process passes its own rows; the result is one global array per leaf.

    With one process this is a plain sharded device_put. With several, process i's rows become
    rows [i·n, (i+1)·n) of the global batch (jax.make_array_from_process_local_data).
    """
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places host values on every device of the mesh (same value on every process)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            np.shape(x), sharding, lambda idx: np.asarray(x)[idx]
        ),
        tree,
    )


def place(tree: Any, shardings: Any) -> Any:
    """Host values (the same on every process) → global arrays with `shardings`. Each device's
    block is cut from the local copy on its own process: unlike `jax.device_put` of a host
    tree onto a multi-host sharding, no process compares its values with the others'."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree,
        shardings,
    )
