import jax.numpy as jnp
import numpy as np
import pytest

from jaxret.models.attention import dot_product_attention


def reference(q, k, v, bias, scale):
    """Attention written out in float64 numpy on [B, L, H, D] operands."""
    q, k, v, bias = (np.asarray(x, np.float64) for x in (q, k, v, bias))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale + bias
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_matches_the_written_out_formula_with_mask_and_scale(scale):
    rng = np.random.default_rng(0)
    b, lq, lk, h, d = 2, 3, 5, 4, 8
    q = rng.normal(size=(b, lq, h, d)).astype(np.float32)
    k = rng.normal(size=(b, lk, h, d)).astype(np.float32)
    v = rng.normal(size=(b, lk, h, d)).astype(np.float32)
    mask = np.ones((b, lk), bool)
    mask[1, 3:] = False  # padded keys of row 1 get no weight
    bias = np.where(mask, 0.0, np.finfo(np.float32).min)[:, None, None, :].astype(np.float32)
    bias = bias + rng.normal(size=(1, h, lq, lk)).astype(np.float32)  # a position bias
    out = dot_product_attention(q, k, v, bias, jnp.float32, logit_scale=scale)
    assert out.shape == (b, lq, h, d) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference(q, k, v, bias, scale), rtol=1e-5, atol=1e-5)
    # Row 1 ignores its padded keys: changing their values changes nothing.
    v2 = v.copy()
    v2[1, 3:] = 100.0
    out2 = dot_product_attention(q, k, v2, bias, jnp.float32, logit_scale=scale)
    np.testing.assert_array_equal(out[1], out2[1])


def test_dropout_acts_on_the_probabilities():
    q = k = v = jnp.ones((1, 2, 1, 4))
    bias = jnp.zeros((1, 1, 2, 2))
    out = dot_product_attention(q, k, v, bias, jnp.float32, drop_probs=lambda p: p * 0.0)
    np.testing.assert_array_equal(out, 0.0)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    half = dot_product_attention(q16, k16, v16, bias, jnp.bfloat16, drop_probs=lambda p: p * 0.5)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), 0.5)
