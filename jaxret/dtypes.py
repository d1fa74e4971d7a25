"""The compute and storage dtypes a config may name: one map for models, teachers and indexes."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

NAMES = ("float32", "bfloat16")


def by_name(name: Any, what: str = "dtype") -> jnp.dtype:
    """`name` (a name, or a dtype) as float32 or bfloat16; any other is refused, naming `what`."""
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in NAMES:
        raise ValueError(f"{what} {name!r}; expected float32 or bfloat16")
    return dtype
