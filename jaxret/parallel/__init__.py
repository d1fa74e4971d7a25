"""Device mesh, parameter sharding rules, multi-host set-up and host→global data placement."""

from jaxret.parallel.host_data import global_batch, replicate
from jaxret.parallel.mesh import initialize_distributed, make_mesh, mesh_from_config
from jaxret.parallel.partitioning import logical_axes, param_shardings, shard_params

__all__ = [
    "global_batch",
    "initialize_distributed",
    "logical_axes",
    "make_mesh",
    "mesh_from_config",
    "param_shardings",
    "replicate",
    "shard_params",
]
