"""Flax (linen) T5 encoder-decoder, numerically equal to transformers' T5ForConditionalGeneration.

Both families: original T5 (ReLU MLP, lm_head tied to the shared embedding with the
d_model^-0.5 output scaling) and T5 v1.1 / LM-adapted / T0 (gated-GELU MLP, untied lm_head,
no scaling). Tying and scaling are separate flags: transformers 5 always ties T5 weights
unless the checkpoint stores a distinct lm_head, and reads the legacy `tie_word_embeddings`
as "scale the decoder output" (`scale_decoder_outputs`).
No biases, RMS layer norm, no 1/√d attention scaling (T5 folds it into the init), relative
position buckets computed once per stack and shared by its layers.

Compute runs in `dtype` (bf16 for the teacher); RMS statistics, attention softmax and
everything after the logits run in fp32. Decoding keeps an explicit KV cache
(self-attention keys/values per layer, cross-attention keys/values computed once).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models.attention import dot_product_attention
from jaxret.models.encoder_decoder import EncoderDecoder
from jaxret.parallel.activations import Activations, constrain

# Logical names of activation dimensions (jaxret.parallel.activations).
_BLE = ("batch", None, None)  # [B, L, D]
_BLHD = ("batch", None, "heads", None)  # [B, L, H, Dk]
_BLF = ("batch", None, "mlp")  # [B, L, F]

_ACT = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True  # lm_head is the shared embedding
    scale_decoder_outputs: bool = True  # multiply decoder output by d_model^-0.5
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.removeprefix("gated-")
        # HF maps "gated-gelu" to the tanh approximation ("gelu_new").
        return "gelu_new" if act == "gelu" and self.gated else act

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], separate_lm_head: bool | None = None) -> T5Config:
        """`separate_lm_head`: whether the checkpoint stores an lm_head distinct from the
        embedding (None: trust the config, as for a config without weights)."""
        if d.get("model_type", "t5") not in ("t5", "mt5"):
            raise ValueError(f"model_type {d.get('model_type')!r} is not T5")
        proj = d.get("feed_forward_proj", "relu")
        if proj.removeprefix("gated-") not in ("relu", "gelu", "silu"):
            raise ValueError(f"feed_forward_proj {proj!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
        if d.get("num_decoder_layers") is None:
            kwargs["num_decoder_layers"] = d.get("num_layers", cls.num_layers)
        legacy_tie = d.get("tie_word_embeddings", True) is not False
        scale = d.get("scale_decoder_outputs")
        kwargs["scale_decoder_outputs"] = legacy_tie if scale is None else bool(scale)
        kwargs["tie_word_embeddings"] = (
            legacy_tie if separate_lm_head is None else not separate_lm_head
        )
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """Readable by transformers 4 and 5: the legacy flag carries the scaling; an untied or
        unscaled model ships an explicit lm_head.weight (see hf_t5.save_t5)."""
        d = dataclasses.asdict(self)
        d["tie_word_embeddings"] = self.scale_decoder_outputs
        d.update(model_type="t5", architectures=["T5ForConditionalGeneration"])
        return d


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's log-spaced buckets of (key position − query position)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # float32 log as in the reference; the int cast truncates toward zero.
    large = max_exact + (
        jnp.log(jnp.maximum(relative_position, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


def _dense(features: Any, dtype: Any, name: str, axis: Any = -1) -> nn.Module:
    return nn.DenseGeneral(
        features,
        axis=axis,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.05),
        name=name,
    )


class LMHead(nn.Module):
    """Untied output projection [D, V]; the logits accumulate in fp32 whatever the compute
    dtype (a bf16 [.., V] output would round every logit before the log-softmax)."""

    vocab_size: int
    dtype: Any

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.normal(0.05), (hidden.shape[-1], self.vocab_size), jnp.float32
        )
        return jnp.einsum(
            "...d,dv->...v",
            hidden.astype(self.dtype),
            kernel.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )


class RelativeBias(nn.Module):
    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
        """q_pos [Q], k_pos [K] → bias [1, H, Q, K] in fp32."""
        cfg = self.config
        table = nn.Embed(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            embedding_init=nn.initializers.normal(0.05),
            name="relative_attention_bias",
        )
        buckets = relative_position_bucket(
            k_pos[None, :] - q_pos[:, None],
            self.bidirectional,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )
        return jnp.transpose(table(buckets), (2, 0, 1))[None].astype(jnp.float32)


class Attention(nn.Module):
    config: T5Config
    dtype: Any
    act: Activations | None = None

    def setup(self) -> None:
        cfg = self.config
        heads = (cfg.num_heads, cfg.d_kv)
        self.q = _dense(heads, self.dtype, "q")
        self.k = _dense(heads, self.dtype, "k")
        self.v = _dense(heads, self.dtype, "v")
        self.o = _dense(cfg.d_model, self.dtype, "o", axis=(-2, -1))
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = lambda y: constrain(self.act, y, _BLHD)
        return c(self.k(x)), c(self.v(x))  # [B, K, H, Dk] each

    def attend(
        self,
        x: jax.Array,  # [B, Q, D] queries' inputs
        k: jax.Array,  # [B, K, H, Dk]
        v: jax.Array,
        bias: jax.Array,  # [B or 1, H or 1, Q, K] fp32: position bias + mask
        deterministic: bool,
    ) -> jax.Array:
        c = lambda y, axes: constrain(self.act, y, axes)
        q = c(self.q(x), _BLHD)
        drop = lambda p: self.dropout(p, deterministic=deterministic)
        ctx = c(dot_product_attention(q, k, v, bias, self.dtype, drop, act=self.act), _BLHD)
        return c(self.o(ctx), _BLE)

    def __call__(self, x: jax.Array, kv_input: jax.Array, bias: jax.Array, deterministic: bool):
        k, v = self.kv(kv_input)
        return self.attend(x, k, v, bias, deterministic)


class MLP(nn.Module):
    config: T5Config
    dtype: Any
    act: Activations | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        fn = _ACT[cfg.activation]
        wi = lambda name: constrain(self.act, _dense(cfg.d_ff, self.dtype, name)(x), _BLF)
        h = fn(wi("wi_0")) * wi("wi_1") if cfg.gated else fn(wi("wi"))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return constrain(self.act, _dense(cfg.d_model, self.dtype, "wo")(h), _BLE)


def _mask_bias(mask: jax.Array) -> jax.Array:
    """[B, K] 1/0 → additive [B, 1, 1, K] fp32."""
    return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)


class EncoderLayer(nn.Module):
    config: T5Config
    dtype: Any
    act: Activations | None = None

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate)
        h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="pre_attention_norm")(x)
        x = x + drop(
            Attention(cfg, self.dtype, self.act, name="self_attention")(h, h, bias, deterministic),
            deterministic=deterministic,
        )
        h = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="pre_mlp_norm")(x)
        return x + drop(
            MLP(cfg, self.dtype, self.act, name="mlp")(h, deterministic),
            deterministic=deterministic,
        )


class Encoder(nn.Module):
    config: T5Config
    dtype: Any
    remat: bool = False
    act: Activations | None = None

    @nn.compact
    def __call__(self, embedded: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        length = embedded.shape[1]
        pos = jnp.arange(length)
        bias = RelativeBias(cfg, True, name="relative_bias")(pos, pos) + _mask_bias(mask)
        x = constrain(self.act, embedded, _BLE)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        layer = nn.remat(EncoderLayer, static_argnums=(3,)) if self.remat else EncoderLayer
        for i in range(cfg.num_layers):
            x = layer(cfg, self.dtype, self.act, name=f"layer_{i}")(x, bias, deterministic)
        x = RMSNorm(cfg.layer_norm_epsilon, self.dtype, name="final_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class DecoderLayer(nn.Module):
    config: T5Config
    dtype: Any
    act: Activations | None = None

    def setup(self) -> None:
        cfg = self.config
        self.pre_self_attention_norm = RMSNorm(cfg.layer_norm_epsilon, self.dtype)
        self.self_attention = Attention(cfg, self.dtype, self.act)
        self.pre_cross_attention_norm = RMSNorm(cfg.layer_norm_epsilon, self.dtype)
        self.cross_attention = Attention(cfg, self.dtype, self.act)
        self.pre_mlp_norm = RMSNorm(cfg.layer_norm_epsilon, self.dtype)
        self.mlp = MLP(cfg, self.dtype, self.act)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def cross_kv(self, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.cross_attention.kv(encoded)

    def __call__(
        self,
        x: jax.Array,  # [B, Q, D]
        self_bias: jax.Array,  # [B|1, H, Q, K_self]
        cross_bias: jax.Array,  # [B, 1, 1, K_enc]
        cross_kv: tuple[jax.Array, jax.Array],
        deterministic: bool,
        cache: tuple[jax.Array, jax.Array] | None = None,  # [B, T, H, Dk] self-attention K/V
        index: jax.Array | None = None,  # where x's single position goes in the cache
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        drop = lambda y: self.dropout(y, deterministic=deterministic)
        h = self.pre_self_attention_norm(x)
        k, v = self.self_attention.kv(h)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, 1)
            cache = (k, v)
        x = x + drop(self.self_attention.attend(h, k, v, self_bias, deterministic))
        h = self.pre_cross_attention_norm(x)
        x = x + drop(self.cross_attention.attend(h, *cross_kv, cross_bias, deterministic))
        x = x + drop(self.mlp(self.pre_mlp_norm(x), deterministic))
        return x, cache


class Decoder(nn.Module):
    config: T5Config
    dtype: Any
    remat: bool = False
    act: Activations | None = None

    def setup(self) -> None:
        cfg = self.config
        self.relative_bias = RelativeBias(cfg, False)
        # remat: the full teacher-forced pass only (generation steps keep their cache).
        layer = nn.remat(DecoderLayer, static_argnums=(5,)) if self.remat else DecoderLayer
        self.layers = [
            layer(cfg, self.dtype, self.act, name=f"layer_{i}")
            for i in range(cfg.num_decoder_layers)
        ]
        self.final_norm = RMSNorm(cfg.layer_norm_epsilon, self.dtype)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def cross_kv(self, encoded: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        return [layer.cross_kv(encoded) for layer in self.layers]

    def __call__(
        self,
        embedded: jax.Array,  # [B, T, D] decoder input embeddings
        decoder_mask: jax.Array | None,  # [B, T] or None
        encoded: jax.Array,
        encoder_mask: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """Full teacher-forced pass (training, scoring)."""
        length = embedded.shape[1]
        pos = jnp.arange(length)
        causal = jnp.where(pos[None, :] <= pos[:, None], 0.0, jnp.finfo(jnp.float32).min)
        self_bias = self.relative_bias(pos, pos) + causal[None, None]
        if decoder_mask is not None:
            self_bias = self_bias + _mask_bias(decoder_mask)
        cross_bias = _mask_bias(encoder_mask)
        x = self.dropout(embedded, deterministic=deterministic)
        for layer, kv in zip(self.layers, self.cross_kv(encoded)):
            x, _ = layer(x, self_bias, cross_bias, kv, deterministic)
        return self.dropout(self.final_norm(x), deterministic=deterministic)

    def step(
        self,
        embedded: jax.Array,  # [B, 1, D] the token at `index`
        index: jax.Array,  # scalar int32
        cache: list[tuple[jax.Array, jax.Array]],  # per layer [B, T, H, Dk]
        cross_kv: list[tuple[jax.Array, jax.Array]],
        encoder_mask: jax.Array,
    ) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        """One decoding step against the cache → (hidden [B, 1, D], updated cache)."""
        max_len = cache[0][0].shape[1]
        k_pos = jnp.arange(max_len)
        visible = jnp.where(k_pos <= index, 0.0, jnp.finfo(jnp.float32).min)
        self_bias = self.relative_bias(index[None], k_pos) + visible[None, None, None, :]
        cross_bias = _mask_bias(encoder_mask)
        x, new_cache = embedded, []
        for layer, kv, layer_cache in zip(self.layers, cross_kv, cache):
            x, layer_cache = layer(x, self_bias, cross_bias, kv, True, layer_cache, index)
            new_cache.append(layer_cache)
        return self.final_norm(x), new_cache


class T5(EncoderDecoder):
    config: T5Config
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialize each layer in the backward pass (generator training)
    act: Activations | None = None  # activation sharding (None: let XLA choose)

    def setup(self) -> None:
        cfg = self.config
        self.shared = nn.Embed(
            cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(1.0)
        )
        self.encoder = Encoder(cfg, self.dtype, self.remat, self.act)
        self.decoder = Decoder(cfg, self.dtype, self.remat, self.act)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg.vocab_size, self.dtype)

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.shared(ids).astype(self.dtype)

    def encode(self, ids: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        return self.encoder(self.embed(ids), mask, deterministic)

    def decode(
        self,
        decoder_input_ids: jax.Array,
        encoded: jax.Array,
        encoder_mask: jax.Array,
        decoder_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced decoder hidden states [B, T, D] (before the lm_head)."""
        return self.decoder(
            self.embed(decoder_input_ids), decoder_mask, encoded, encoder_mask, deterministic
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Hidden [..., D] → logits [..., V] in fp32."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * (self.config.d_model**-0.5)
        if self.config.tie_word_embeddings:
            table = self.shared.embedding.astype(self.dtype)
            logits = jnp.einsum(
                "...d,vd->...v",
                hidden.astype(self.dtype),
                table,
                preferred_element_type=jnp.float32,
            )
        else:
            logits = self.lm_head(hidden)
        if logits.ndim == 3:
            logits = constrain(self.act, logits, ("batch", None, "vocab"))
        return logits

    def init_cache(self, encoded: jax.Array, max_len: int) -> tuple[list, list]:
        """(empty self-attention cache, cross-attention K/V) for `max_len` decoding steps."""
        cfg = self.config
        b = encoded.shape[0]
        shape = (b, max_len, cfg.num_heads, cfg.d_kv)
        cache = [
            (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
            for _ in range(cfg.num_decoder_layers)
        ]
        return cache, self.decoder.cross_kv(encoded)

    def decode_step(
        self,
        token: jax.Array,
        index: jax.Array,
        cache: list,
        cross_kv: list,
        encoder_mask: jax.Array,
    ) -> tuple[jax.Array, list]:
        """token [B] at position `index` → (logits [B, V] fp32, cache)."""
        hidden, cache = self.decoder.step(
            self.embed(token[:, None]), index, cache, cross_kv, encoder_mask
        )
        return self.logits(hidden[:, 0]), cache


def shift_right(labels: jax.Array, start_id: int = 0, pad_id: int = 0) -> jax.Array:
    """Decoder inputs for teacher forcing: [start, y_0, ..., y_{T-2}]."""
    shifted = jnp.concatenate([jnp.full_like(labels[:, :1], start_id), labels[:, :-1]], axis=1)
    return jnp.where(shifted < 0, pad_id, shifted)
