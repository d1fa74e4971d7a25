"""Activation sharding inside the models, and a row-chunked map that keeps work divided.

`Activations` maps logical activation axes to mesh axes, as t5x and MaxText do: the batch is
split over "data" and, under tensor parallelism, heads / MLP / vocabulary over "model". The
models constrain their activations with it at every projection. Without these constraints
XLA is free to follow the parameters' FSDP layout, sharding the contraction dimension and
all-reducing whole activations after every matmul; with them it all-gathers each weight
instead (ZeRO-3), which is what FSDP is for.

`map_rows` runs a function over row chunks of arrays split over devices so that every chunk
spans all devices (each device takes `per_device` of its own rows per step). A plain
`reshape(-1, chunk)` + `lax.map` would hand every chunk to one device's rows, and GSPMD would
gather the chunk onto every device: the same work done D times.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxret.parallel.axes import DATA_AXIS

# Logical activation axis -> mesh axis, per parameter-sharding strategy.
_TENSOR = {"heads": "model", "mlp": "model", "vocab": "model"}


@dataclasses.dataclass(frozen=True)
class Activations:
    mesh: Mesh
    batch: tuple[str, ...] = (DATA_AXIS,)
    rules: tuple[tuple[str, str], ...] = ()  # e.g. (("heads", "model"), ("mlp", "model"))

    @classmethod
    def for_strategy(cls, mesh: Mesh, strategy: str = "replicated") -> Activations:
        batch = tuple(a for a in (DATA_AXIS,) if a in mesh.shape)
        rules = ()
        if "tensor" in strategy and mesh.shape.get("model", 1) > 1:
            rules = tuple(_TENSOR.items())
        return cls(mesh, batch, rules)

    def spec(self, axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        mapping = dict(self.rules)
        out: list[Any] = []
        for name, size in zip(axes, shape):
            mesh_axes: tuple[str, ...] = ()
            if name == "batch":
                mesh_axes = self.batch
            elif name in mapping:
                mesh_axes = (mapping[name],)
            n = math.prod(self.mesh.shape[a] for a in mesh_axes) if mesh_axes else 1
            if not mesh_axes or n == 1 or size % n:
                out.append(None)  # this dimension stays whole where it does not divide
            else:
                out.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
        return PartitionSpec(*out)

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """`axes` names each dimension of x: "batch", "heads", "mlp", "vocab" or None."""
        spec = self.spec(axes, x.shape)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def constrain(act: Activations | None, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    return x if act is None else act.constrain(x, axes)


def map_rows(
    fn: Callable[[Any], Any],
    rows: Any,  # pytree of [N, ...] arrays, axis 0 split in equal blocks over `axes`
    mesh: Mesh,
    axes: tuple[str, ...],
    per_device: int,
) -> Any:
    """fn over chunks of `per_device` rows per device, every chunk spanning every device.

    N must be a multiple of (devices along `axes`) · per_device. Returns fn's outputs
    ([N, ...] leaves) with axis 0 split over `axes` as the input was.
    """
    d = math.prod(mesh.shape[a] for a in axes)
    n = jax.tree.leaves(rows)[0].shape[0]
    if n % (d * per_device):
        raise ValueError(f"{n} rows do not split into chunks of {per_device} rows × {d} devices")
    steps = n // (d * per_device)
    axis_spec = axes if len(axes) > 1 else axes[0]

    def to_steps(x: jax.Array) -> jax.Array:  # [N, ...] -> [S, D·c, ...], one chunk per step
        x = x.reshape((d, steps, per_device) + x.shape[1:]).swapaxes(0, 1)
        x = x.reshape((steps, d * per_device) + x.shape[3:])
        spec = PartitionSpec(None, axis_spec, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def from_steps(y: jax.Array) -> jax.Array:  # [S, D·c, ...] -> [N, ...]
        y = y.reshape((steps, d, per_device) + y.shape[2:]).swapaxes(0, 1)
        y = y.reshape((n,) + y.shape[3:])
        spec = PartitionSpec(axis_spec, *([None] * (y.ndim - 1)))
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))

    def one(chunk: Any) -> Any:
        chunk = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, PartitionSpec(axis_spec, *([None] * (x.ndim - 1))))
            ),
            chunk,
        )
        return fn(chunk)

    stepped = jax.tree.map(to_steps, rows)
    if steps == 1:
        out = jax.tree.map(lambda y: y[None], one(jax.tree.map(lambda x: x[0], stepped)))
    else:
        out = jax.lax.map(one, stepped)
    return jax.tree.map(from_steps, out)


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """Zero rows appended so that axis 0 is a multiple of `multiple`."""
    extra = (-x.shape[0]) % multiple
    if not extra:
        return x
    return jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])
