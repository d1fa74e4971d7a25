"""Host numpy batches → global jax.Arrays, single- and multi-process."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = PartitionSpec("data")


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
