"""The one map of dtype names (models, teachers, indexes)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import dtypes
from jaxret.index.sharded import index_dtype
from jaxret.models.dual_encoder import EncoderSpec


def test_names_and_dtypes_map_to_the_two_compute_dtypes():
    """Mutation: `by_name` without the NAMES check → float16 and float64 are accepted."""
    assert dtypes.by_name("float32") == np.float32
    assert dtypes.by_name("bfloat16") == jnp.bfloat16
    assert dtypes.by_name(jnp.bfloat16) == jnp.bfloat16
    assert dtypes.by_name(np.dtype("float32")) == np.float32
    for bad in ("float16", "float64", "int8", "fp32", None):
        with pytest.raises(ValueError, match=r"index dtype .*expected float32 or bfloat16"):
            index_dtype(bad)
    with pytest.raises(ValueError, match="dtype='float16'"):
        EncoderSpec(dtype="float16")
