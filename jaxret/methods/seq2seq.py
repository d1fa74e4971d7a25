"""Generator fine-tuning (QGen, Liang et al. §3.1): teacher-forced cross-entropy of the query
given its passage, for a T5 or BART generator.

    logits = G(θ, passage tokens, shift_right(query tokens))   [B, T, V] (one chunk at a time
                                                                 of the vocabulary: fp32)
    loss   = mean over query tokens of −log p(token)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxret.losses import sequence_cross_entropy
from jaxret.models.seq2seq import Generator
from jaxret.train.state import TrainState, apply_gradients, jit_step, step_rng


def decoder_inputs(labels: jax.Array, start_id: int, pad_id: int) -> jax.Array:
    """[start, y_0, …, y_{T−2}] (transformers' shift_tokens_right)."""
    shifted = jnp.concatenate([jnp.full_like(labels[:, :1], start_id), labels[:, :-1]], axis=1)
    return jnp.where(shifted < 0, pad_id, shifted)


def generator_loss(
    params: Any, batch: dict[str, Any], rng: jax.Array, *, generator: Generator, dropout: bool
) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = generator.config
    src, tgt = batch["source"], batch["target"]
    dec_in = decoder_inputs(tgt["input_ids"], cfg.decoder_start_token_id, cfg.pad_token_id)
    logits = generator.model.apply(
        {"params": params},
        src["input_ids"],
        src["attention_mask"],
        dec_in,
        None,
        not dropout,
        rngs={"dropout": rng} if dropout else None,
    )
    loss = sequence_cross_entropy(logits, tgt["input_ids"], tgt["attention_mask"])
    return loss, {"loss": loss, "tokens": tgt["attention_mask"].sum().astype(jnp.float32)}


def make_train_step(
    generator: Generator,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    in_shardings: tuple,
    dropout: bool = True,
) -> Any:
    """step(state, batch) → (state, metrics), batch = {"source", "target"} token dicts."""

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
        (loss, metrics), grads = grad_fn(
            state.params, batch, step_rng(state), generator=generator, dropout=dropout
        )
        state, update = apply_gradients(state, grads, loss, optimizer)
        return state, {**metrics, **update}

    return jit_step(step, mesh, in_shardings)
