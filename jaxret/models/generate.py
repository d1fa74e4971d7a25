"""Autoregressive generation for the seq2seq models (T5, BART) under jit, with a KV cache.

Greedy, sampling (temperature, top-k, nucleus) and beam search, following transformers'
`generate` so that the same checkpoint gives the same tokens:

* `max_new_tokens` counts generated tokens, EOS included; after EOS a sequence is padded;
* `forced_bos_token_id` / `forced_eos_token_id` (BART's generation config) force the first /
  the last possible token, as ForcedBOS/EOSTokenLogitsProcessor do;
* beam search is transformers' vectorized algorithm: the top 2·K continuations of all beams,
  the best K that did not end continue, the ones that ended (EOS or the length limit) among
  the top K join the finished hypotheses with score sum(log p) / length^length_penalty, and
  the loop stops early the way `early_stopping` (False, True or "never") says.

Every returned sequence comes with its log-likelihood under the model (temperature 1, no
truncation, forced tokens included), so samples can be ranked ("n samples, keep the best m").
Sampling keys can be given per input row (`row_seeds`), which makes a row's samples
independent of the batch it is in: sharded or resumed generation reproduces itself.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1.0e9


@dataclasses.dataclass(frozen=True)
class Decoding:
    method: Literal["greedy", "sample", "beam"] = "greedy"
    max_new_tokens: int = 64
    num_return: int = 1  # samples per input, or the best beams returned
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0  # EOS is impossible before this many new tokens (HF's option)

    def __post_init__(self) -> None:
        if self.method not in ("greedy", "sample", "beam"):
            raise ValueError(f"decoding method {self.method!r}; expected greedy, sample or beam")
        if self.method == "beam" and self.num_return > self.num_beams:
            raise ValueError(f"{self.num_return} sequences from {self.num_beams} beams")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")


def nucleus_mask(probs: jax.Array, top_p: float) -> jax.Array:
    """[B, V] → keep [B, V]: the smallest set of most likely tokens whose mass reaches top_p
    (ties at its edge kept), found without sorting the vocabulary.

    The kept set is {v : probs[v] ≥ τ} for the largest τ whose set still holds mass ≥ top_p.
    Non-negative fp32 values order like their int32 bit patterns, so a bisection over the bits
    finds τ exactly in 32 masked sums over the vocabulary (a 32k-vocabulary sort per decoding
    step costs ~10× more on CPU).
    """
    bits = jax.lax.bitcast_convert_type(probs.astype(jnp.float32), jnp.int32)  # [B, V]
    mass_from = lambda t: jnp.sum(jnp.where(bits >= t, probs, 0.0), axis=-1, keepdims=True)

    def halve(_: int, bounds: tuple) -> tuple:
        lo, hi = bounds  # mass_from(lo) ≥ top_p > mass_from(hi)
        mid = lo + (hi - lo) // 2
        ok = mass_from(mid) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo = jnp.zeros(bits.shape[:-1] + (1,), jnp.int32)
    hi = bits.max(axis=-1, keepdims=True) + 1
    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    # The most likely token always stays (fp32 sums may fall short of top_p near 1).
    return (bits >= lo) | (bits == bits.max(axis=-1, keepdims=True))


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then nucleus: logits outside the kept set become -inf.

    Nucleus keeps the smallest set of most likely tokens whose mass reaches top_p (the most
    likely token always)."""
    logits = logits / max(temperature, 1e-6)
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        logits = jnp.where(nucleus_mask(jax.nn.softmax(logits, axis=-1), top_p), logits, -jnp.inf)
    return logits


def _forced(logp: jax.Array, t: jax.Array, max_new: int, cfg: Any, min_new: int = 0) -> jax.Array:
    """No EOS before `min_new` tokens, ForcedBOS at the first new token, ForcedEOS at the last
    allowed one (HF's processor order: the forced tokens win)."""
    vocab = jnp.arange(logp.shape[-1])
    if min_new > 0:
        logp = jnp.where((t < min_new) & (vocab == cfg.eos_token_id), -jnp.inf, logp)
    bos = getattr(cfg, "forced_bos_token_id", None)
    eos = getattr(cfg, "forced_eos_token_id", None)
    if bos is not None:
        logp = jnp.where(t == 0, jnp.where(vocab == bos, 0.0, -jnp.inf), logp)
    if eos is not None:
        logp = jnp.where(t == max_new - 1, jnp.where(vocab == eos, 0.0, -jnp.inf), logp)
    return logp


def _methods(model: Any, params: Any) -> tuple:
    apply = lambda fn, *a: model.apply({"params": params}, *a, method=fn)
    cls = type(model)
    return (
        lambda ids, mask: apply(cls.encode, ids, mask),
        lambda enc, n: apply(cls.init_cache, enc, n),
        lambda tok, t, cache, cross, mask: apply(cls.decode_step, tok, t, cache, cross, mask),
    )


def _start(
    encode: Any,
    init_cache: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    n: int,
    t_max: int,
) -> tuple[Any, Any, jax.Array]:
    """Encode each input once, then give each of its n sequences a copy of the cross-attention
    keys/values: (empty self-attention cache, cross K/V, mask [B·n, L]) in row order
    (input 0's n sequences first). Encoding the n copies instead would cost n× the encoder."""
    cache, cross = init_cache(encode(input_ids, attention_mask), t_max)
    copies = lambda tree: jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)
    return copies(cache), copies(cross), copies(attention_mask)


@functools.partial(jax.jit, static_argnames=("model", "decoding"))
def generate(
    model: Any,
    params: Any,
    input_ids: jax.Array,  # [B, L]
    attention_mask: jax.Array,  # [B, L]
    rng: jax.Array,
    decoding: Decoding,
    row_seeds: jax.Array | None = None,  # [B] int: per-row sampling keys
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """→ (sequences [B, n, max_new_tokens] (EOS included, then padding), log-likelihood [B, n],
    scores [B, n]: the log-likelihood for greedy/sampling, the length-penalised beam score for
    beam search)."""
    if decoding.method == "beam":
        return _beam_search(model, params, input_ids, attention_mask, decoding)
    return _greedy_or_sample(model, params, input_ids, attention_mask, rng, decoding, row_seeds)


def _greedy_or_sample(
    model: Any,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: jax.Array,
    d: Decoding,
    row_seeds: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    cfg = model.config
    b = input_ids.shape[0]
    n = d.num_return if d.method == "sample" else 1
    bn = b * n
    encode, init_cache, step = _methods(model, params)
    cache, cross, mask = _start(encode, init_cache, input_ids, attention_mask, n, d.max_new_tokens)
    seeds = jnp.arange(b) if row_seeds is None else row_seeds
    # One key per (row, sample): independent of which other rows share the batch.
    row_keys = jax.vmap(lambda s: jax.random.fold_in(rng, s))(seeds)
    keys = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(n)))(row_keys)
    keys = keys.reshape((bn,) + keys.shape[2:])

    def cond(c: tuple) -> jax.Array:
        t, _, _, done, _ = c
        return (t < d.max_new_tokens) & ~jnp.all(done)

    def body(c: tuple) -> tuple:
        t, tokens, loglik, done, cache = c
        prev = jnp.where(t == 0, cfg.decoder_start_token_id, tokens[:, jnp.maximum(t - 1, 0)])
        logits, cache = step(prev, t, cache, cross, mask)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        forced = _forced(logp, t, d.max_new_tokens, cfg, d.min_new_tokens)
        if d.method == "sample":
            filtered = filter_logits(forced, d.temperature, d.top_k, d.top_p)
            step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
            choice = jax.vmap(jax.random.categorical)(step_keys, filtered)
        else:
            choice = jnp.argmax(forced, axis=-1)
        choice = jnp.where(done, cfg.pad_token_id, choice).astype(jnp.int32)
        picked = jnp.take_along_axis(logp, choice[:, None], axis=-1)[:, 0]
        loglik = loglik + jnp.where(done, 0.0, picked)
        tokens = tokens.at[:, t].set(choice)
        return t + 1, tokens, loglik, done | (choice == cfg.eos_token_id), cache

    tokens = jnp.full((bn, d.max_new_tokens), cfg.pad_token_id, jnp.int32)
    init = (jnp.int32(0), tokens, jnp.zeros(bn, jnp.float32), jnp.zeros(bn, bool), cache)
    _, tokens, loglik, _, _ = jax.lax.while_loop(cond, body, init)
    loglik = loglik.reshape(b, n)
    return tokens.reshape(b, n, d.max_new_tokens), loglik, loglik


def _beam_search(
    model: Any, params: Any, input_ids: jax.Array, attention_mask: jax.Array, d: Decoding
) -> tuple[jax.Array, jax.Array, jax.Array]:
    cfg = model.config
    b, k, t_max = input_ids.shape[0], d.num_beams, d.max_new_tokens
    keep = 2 * k  # transformers: max(2, 1 + number of EOS ids) · beams
    encode, init_cache, step = _methods(model, params)
    cache, cross, mask = _start(encode, init_cache, input_ids, attention_mask, k, t_max)
    pad = cfg.pad_token_id
    gather = lambda x, idx: jnp.take_along_axis(
        x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1
    )
    top_k_mask = jnp.arange(keep) < k

    def cond(c: dict) -> jax.Array:
        improvable = jnp.any(c["unsatisfied"])
        open_beam = ~(jnp.all(c["finished"]) & (d.early_stopping is True))
        return (c["t"] < t_max) & improvable & open_beam & ~c["all_hit"]

    def body(c: dict) -> dict:
        t = c["t"]
        prev = jnp.where(t == 0, cfg.decoder_start_token_id, c["seqs"][:, :, jnp.maximum(t - 1, 0)])
        logits, cache = step(prev.reshape(-1), t, c["cache"], cross, mask)
        raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B·K, V]
        logp = _forced(raw, t, t_max, cfg, d.min_new_tokens)
        v = logp.shape[-1]
        acc = (logp.reshape(b, k, v) + c["scores"][:, :, None]).reshape(b, k * v)
        top_scores, top_idx = jax.lax.top_k(acc, keep)  # [B, 2K]
        beam, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
        seqs = gather(c["seqs"], beam).at[:, :, t].set(tok)  # [B, 2K, T]
        raw_pick = jnp.take_along_axis(raw.reshape(b, k, v), beam[..., None], 1)
        loglik = (
            gather(c["loglik"], beam)
            + jnp.take_along_axis(raw_pick.reshape(b, keep, v), tok[..., None], -1)[..., 0]
        )
        hits = (tok == cfg.eos_token_id) | (t + 1 >= t_max)
        # The best K continuations that did not end keep running.
        running = top_scores + hits * NEG
        next_scores, pick = jax.lax.top_k(running, k)
        new_seqs, new_loglik = gather(seqs, pick), gather(loglik, pick)
        origin = jnp.take_along_axis(beam, pick, 1)  # [B, K]: which old beam each continues
        # The ones that ended, among the top K, join the finished hypotheses.
        finished_score = top_scores / ((t + 1.0) ** d.length_penalty)
        full = jnp.all(c["finished"], axis=1, keepdims=True) & (d.early_stopping is True)
        finished_score = finished_score + full * NEG + (~c["unsatisfied"]) * NEG
        just = hits & top_k_mask[None, :]
        finished_score = finished_score + (~just) * NEG
        merged_scores = jnp.concatenate([c["best_scores"], finished_score], 1)
        best_scores, order = jax.lax.top_k(merged_scores, k)
        merged = lambda old, new: gather(jnp.concatenate([old, new], 1), order)
        best_seqs = merged(c["best_seqs"], seqs)
        best_loglik = merged(c["best_loglik"], loglik)
        finished = merged(c["finished"], just)
        # Reorder the cache like the surviving beams.
        flat = (origin + jnp.arange(b)[:, None] * k).reshape(-1)
        cache = jax.tree.map(lambda x: x[flat], cache)
        cur_len = t + 2  # decoder start + t + 1 new tokens
        if d.early_stopping == "never" and d.length_penalty > 0.0:
            best_len = 1 + t_max - 1
        else:
            best_len = cur_len - 1
        best_possible = next_scores[:, :1] / (best_len**d.length_penalty)
        worst = jnp.where(finished, jnp.min(best_scores, 1, keepdims=True), NEG)
        unsatisfied = c["unsatisfied"] & jnp.any(best_possible > worst, axis=-1, keepdims=True)
        return {
            "t": t + 1,
            "seqs": new_seqs,
            "scores": next_scores,
            "loglik": new_loglik,
            "best_seqs": best_seqs,
            "best_scores": best_scores,
            "best_loglik": best_loglik,
            "finished": finished,
            "unsatisfied": unsatisfied,
            "all_hit": jnp.all(hits),
            "cache": cache,
        }

    init = {
        "t": jnp.int32(0),
        "seqs": jnp.full((b, k, t_max), pad, jnp.int32),
        "scores": jnp.tile(jnp.concatenate([jnp.zeros(1), jnp.full(k - 1, NEG)]), (b, 1)),
        "loglik": jnp.zeros((b, k), jnp.float32),
        "best_seqs": jnp.full((b, k, t_max), pad, jnp.int32),
        "best_scores": jnp.full((b, k), NEG, jnp.float32),
        "best_loglik": jnp.zeros((b, k), jnp.float32),
        "finished": jnp.zeros((b, k), bool),
        "unsatisfied": jnp.ones((b, 1), bool),
        "all_hit": jnp.bool_(False),
        "cache": cache,
    }
    out = jax.lax.while_loop(cond, body, init)
    n = d.num_return
    seqs = out["best_seqs"][:, :n]
    # After EOS transformers' buffers hold padding (its fill value): so do ours.
    after_eos = jnp.cumsum(seqs == cfg.eos_token_id, axis=-1) - (seqs == cfg.eos_token_id) > 0
    seqs = jnp.where(after_eos, pad, seqs)
    return seqs, out["best_loglik"][:, :n], out["best_scores"][:, :n]


def best_of(
    sequences: jax.Array | np.ndarray, loglik: jax.Array | np.ndarray, keep: int
) -> tuple[jax.Array, jax.Array]:
    """The `keep` most likely of n sequences per input: [B, keep, T], [B, keep]."""
    sequences, loglik = jnp.asarray(sequences), jnp.asarray(loglik)
    order = jnp.argsort(-loglik, axis=-1)[:, :keep]
    return jnp.take_along_axis(sequences, order[..., None], axis=1), jnp.take_along_axis(
        loglik, order, axis=1
    )
