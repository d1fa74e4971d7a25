"""Losses shared by the recipes."""

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
