"""Autoregressive T5 generation under jit: greedy, top-k and nucleus sampling.

Fixed maximum length, EOS stopping (then padding), n samples per input, and the
log-likelihood of each returned sequence under the model itself (temperature 1, no
truncation), so samples can be ranked as QGen does (keep the best 5 of 10).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxret.models.t5 import T5, shift_right


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then nucleus: logits outside the kept set become -inf."""
    logits = logits / max(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p  # the most likely token is always kept
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "max_length",
        "num_samples",
        "sample",
        "temperature",
        "top_k",
        "top_p",
        "use_cache",
    ),
)
def generate(
    model: T5,
    params: Any,
    input_ids: jax.Array,  # [B, L]
    attention_mask: jax.Array,  # [B, L]
    rng: jax.Array,
    max_length: int,
    num_samples: int = 1,
    sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """→ (sequences [B, n, max_length] (EOS included, then padding), log-likelihood [B, n])."""
    cfg = model.config
    b = input_ids.shape[0]
    ids = jnp.repeat(input_ids, num_samples, axis=0)  # [B·n, L]
    mask = jnp.repeat(attention_mask, num_samples, axis=0)
    bn = ids.shape[0]
    apply = lambda fn, *a: model.apply({"params": params}, *a, method=fn)
    encoded = apply(T5.encode, ids, mask)

    def next_logits(t: jax.Array, tokens: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        if use_cache:
            prev = jnp.where(t == 0, cfg.decoder_start_token_id, tokens[:, jnp.maximum(t - 1, 0)])
            cache, cross = state
            logits, cache = apply(T5.decode_step, prev, t, cache, cross, mask)
            return logits, (cache, cross)
        # No cache: re-run the decoder over the whole prefix and read position t.
        dec_in = shift_right(tokens, cfg.decoder_start_token_id, cfg.pad_token_id)
        hidden = apply(T5.decode, dec_in, encoded, mask)
        row = jax.lax.dynamic_index_in_dim(hidden, t, axis=1, keepdims=False)
        return apply(T5.logits, row), state

    state = apply(T5.init_cache, encoded, max_length) if use_cache else None

    def cond(carry: tuple) -> jax.Array:
        t, _, _, done, _ = carry
        return (t < max_length) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        t, tokens, loglik, done, state = carry
        logits, state = next_logits(t, tokens, state)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if sample:
            key = jax.random.fold_in(rng, t)
            choice = jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p))
        else:
            choice = jnp.argmax(logits, axis=-1)
        choice = jnp.where(done, cfg.pad_token_id, choice).astype(jnp.int32)
        picked = jnp.take_along_axis(logp, choice[:, None], axis=-1)[:, 0]
        loglik = loglik + jnp.where(done, 0.0, picked)
        tokens = tokens.at[:, t].set(choice)
        done = done | (choice == cfg.eos_token_id)
        return t + 1, tokens, loglik, done, state

    tokens = jnp.full((bn, max_length), cfg.pad_token_id, jnp.int32)
    init = (jnp.int32(0), tokens, jnp.zeros(bn, jnp.float32), jnp.zeros(bn, bool), state)
    _, tokens, loglik, _, _ = jax.lax.while_loop(cond, body, init)
    return tokens.reshape(b, num_samples, max_length), loglik.reshape(b, num_samples)


def best_of(sequences: jax.Array, loglik: jax.Array, keep: int) -> tuple[jax.Array, jax.Array]:
    """The `keep` most likely of n samples per input: [B, keep, T], [B, keep]."""
    order = jnp.argsort(-loglik, axis=-1)[:, :keep]
    return jnp.take_along_axis(sequences, order[..., None], axis=1), jnp.take_along_axis(
        loglik, order, axis=1
    )
