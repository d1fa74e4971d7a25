"""Losses shared by the methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def kl_teacher_student(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """KL(softmax(teacher) ‖ softmax(student)) over the last axis, mean over the batch.

    The teacher is a target: no gradient reaches it. d loss / d student_logits =
    (softmax(student) − softmax(teacher)) / B.
    """
    t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(t)
    # 0 · log 0 = 0 where the teacher gives a passage no mass (-inf logits); a NaN teacher
    # stays NaN, so the step is skipped rather than trained on garbage.
    kl = jnp.where(p == 0, 0.0, p * (t - s)).sum(-1)
    return kl.mean()


def info_nce(scores: jax.Array, positive: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """−log softmax(scores)[positive], mean over rows: the DPR / in-batch sampled-softmax loss.

    scores [B, M] (query × candidate, already scaled), positive [B] int: the column of each
    row's positive; valid [B, M] or [M] bool: candidates that may compete (empty cache slots,
    padding), default all. Softmax and log-softmax in fp32.
    """
    s = scores.astype(jnp.float32)
    if valid is not None:
        s = jnp.where(valid, s, -jnp.inf)
    logp = jax.nn.log_softmax(s, axis=-1)
    return -jnp.take_along_axis(logp, positive[:, None].astype(jnp.int32), axis=-1)[:, 0].mean()


def contrastive_loss(
    q: jax.Array,
    candidates: jax.Array,
    positive: jax.Array,
    scale: float = 1.0,
    valid: jax.Array | None = None,
) -> jax.Array:
    """info_nce of scale · q·cᵀ: q [B, d], candidates [M, d] (every positive and negative of
    the global batch, so each query's negatives are all the others' passages), positive [B]."""
    scores = jnp.einsum("bd,md->bm", q, candidates, preferred_element_type=jnp.float32) * scale
    return info_nce(scores, positive, valid)


def info_nce_with_cache(
    scores: jax.Array,
    positive: jax.Array,
    cache_scores: jax.Array | None = None,
    cache_valid: jax.Array | None = None,
) -> jax.Array:
    """info_nce over two blocks of candidates: `scores` [B, M] (fresh, in-batch, holding each
    row's positive) and `cache_scores` [B, C] (cached negatives, e.g. a queue; `cache_valid`
    [C] masks its empty slots). The two blocks are never concatenated: each gets its own
    logsumexp, so a cache sharded over devices is reduced where it lives."""
    s = scores.astype(jnp.float32)
    pos = jnp.take_along_axis(s, positive[:, None].astype(jnp.int32), axis=-1)[:, 0]
    lse = jax.nn.logsumexp(s, axis=-1)
    if cache_scores is not None:
        c = cache_scores.astype(jnp.float32)
        if cache_valid is not None:
            c = jnp.where(cache_valid[None, :], c, -jnp.inf)
        lse = jnp.logaddexp(lse, jax.nn.logsumexp(c, axis=-1))
    return (lse - pos).mean()


def sequence_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Teacher-forced token cross-entropy [B, T, V] vs labels [B, T], mean over the unmasked
    tokens of the batch (fp32 log-softmax)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    gold = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return -(gold * m).sum() / jnp.maximum(m.sum(), 1.0)
