"""Scaled dot-product attention shared by BERT, T5 and BART.

The heads move in front of the sequence ([B, L, H, D] → [B, H, L, D]) before both products:
XLA:CPU runs a batched matmul whose batch dimensions lead ~2× faster than the same einsum on
[B, L, H, D] operands (measured on [32, 256, 12, 64]: fp32 forward 0.35 → 0.15 s, gradient
0.44 → 0.29 s); on GPU/TPU the transposes are layout changes XLA folds into the dots.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxret.parallel.activations import Activations, constrain

_BHLD = ("batch", "heads", None, None)  # [B, H, L, D] and [B, H, Q, K]


def dot_product_attention(
    q: jax.Array,  # [B, Q, H, D] in the compute dtype, already scaled if the model scales q
    k: jax.Array,  # [B, K, H, D]
    v: jax.Array,  # [B, K, H, D]
    bias: jax.Array,  # [B or 1, H or 1, Q or 1, K] fp32: mask and position bias
    dtype: Any,
    drop_probs: Callable[[jax.Array], jax.Array] = lambda p: p,
    logit_scale: float = 1.0,  # applied to the fp32 logits (BERT); 1.0 when q is prescaled
    act: Activations | None = None,
) -> jax.Array:
    """→ context [B, Q, H, D] in `dtype`; logits and softmax in fp32."""
    heads_first = lambda x: constrain(act, x.transpose(0, 2, 1, 3), _BHLD)
    q_h, k_h, v_h = heads_first(q), heads_first(k), heads_first(v)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q_h, k_h, preferred_element_type=jnp.float32)
    if logit_scale != 1.0:
        logits = logits * jnp.float32(logit_scale)
    probs = constrain(act, jax.nn.softmax(logits + bias, axis=-1), _BHLD)  # [B, H, Q, K]
    ctx = jnp.einsum("bhqk,bhkd->bhqd", drop_probs(probs).astype(dtype), v_h)
    return ctx.transpose(0, 2, 1, 3)  # [B, Q, H, D]
