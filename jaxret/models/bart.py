"""Flax (linen) BART encoder-decoder, numerically equal to transformers'
`BartForConditionalGeneration` (the generator of the query-generation paper).

Post-LN blocks, learned positions with BART's offset of 2, a LayerNorm on the embeddings,
scaled query projection in attention, GELU feed-forward, an lm_head tied to the shared
embedding plus `final_logits_bias`. The same interface as `jaxret.models.t5.T5` (encode,
decode, logits, init_cache, decode_step), so one generation routine serves both.

Compute runs in `dtype`; layer-norm statistics, attention softmax and the logits in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models.attention import dot_product_attention
from jaxret.models.bert import _ACTIVATIONS, LayerNorm
from jaxret.models.encoder_decoder import EncoderDecoder
from jaxret.models.t5 import LMHead
from jaxret.parallel.activations import Activations, constrain

_BLE = ("batch", None, None)
_BLHD = ("batch", None, "heads", None)
_BLF = ("batch", None, "mlp")
_POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding


@dataclasses.dataclass(frozen=True)
class BartConfig:
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_position_embeddings: int = 1024
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> BartConfig:
        if d.get("model_type", "bart") != "bart":
            raise ValueError(f"model_type {d.get('model_type')!r} is not BART")
        if d.get("add_final_layer_norm") or d.get("normalize_before"):
            raise ValueError("pre-LN BART variants (mBART) are not supported")
        act = d.get("activation_function", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"activation_function {act!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in names if k in d}
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(model_type="bart", architectures=["BartForConditionalGeneration"])
        return d

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0


def _dense(features: Any, dtype: Any, name: str, axis: Any = -1) -> nn.Module:
    return nn.DenseGeneral(
        features,
        axis=axis,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


def _mask_bias(mask: jax.Array) -> jax.Array:
    return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)


class Attention(nn.Module):
    config: BartConfig
    heads: int
    dtype: Any
    act: Activations | None = None

    def setup(self) -> None:
        d = self.config.d_model
        shape = (self.heads, d // self.heads)
        self.q_proj = _dense(shape, self.dtype, "q_proj")
        self.k_proj = _dense(shape, self.dtype, "k_proj")
        self.v_proj = _dense(shape, self.dtype, "v_proj")
        self.out_proj = _dense(d, self.dtype, "out_proj", axis=(-2, -1))
        self.dropout = nn.Dropout(self.config.attention_dropout)

    def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = lambda y: constrain(self.act, y, _BLHD)
        return c(self.k_proj(x)), c(self.v_proj(x))

    def attend(
        self, x: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, deterministic: bool
    ) -> jax.Array:
        head_dim = self.config.d_model // self.heads
        q = constrain(self.act, self.q_proj(x), _BLHD) * (head_dim**-0.5)
        drop = lambda p: self.dropout(p, deterministic=deterministic)
        ctx = dot_product_attention(q, k, v, bias, self.dtype, drop, act=self.act)
        return constrain(self.act, self.out_proj(ctx), _BLE)


class FeedForward(nn.Module):
    config: BartConfig
    ffn: int
    dtype: Any
    act: Activations | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        h = constrain(self.act, _dense(self.ffn, self.dtype, "fc1")(x), _BLF)
        h = _ACTIVATIONS[cfg.activation_function](h)
        h = nn.Dropout(cfg.activation_dropout)(h, deterministic=deterministic)
        return constrain(self.act, _dense(cfg.d_model, self.dtype, "fc2")(h), _BLE)


class EncoderLayer(nn.Module):
    config: BartConfig
    dtype: Any
    act: Activations | None = None

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        attn = Attention(cfg, cfg.encoder_attention_heads, self.dtype, self.act, name="self_attn")
        k, v = attn.kv(x)
        x = x + drop(attn.attend(x, k, v, bias, deterministic))
        x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="self_attn_layer_norm")(x)
        ff = FeedForward(cfg, cfg.encoder_ffn_dim, self.dtype, self.act, name="ffn")
        x = x + drop(ff(x, deterministic))
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_layer_norm")(x)


class DecoderLayer(nn.Module):
    config: BartConfig
    dtype: Any
    act: Activations | None = None

    def setup(self) -> None:
        cfg = self.config
        heads = cfg.decoder_attention_heads
        self.self_attn = Attention(cfg, heads, self.dtype, self.act)
        self.self_attn_layer_norm = LayerNorm(cfg.layer_norm_eps, self.dtype)
        self.encoder_attn = Attention(cfg, heads, self.dtype, self.act)
        self.encoder_attn_layer_norm = LayerNorm(cfg.layer_norm_eps, self.dtype)
        self.ffn = FeedForward(cfg, cfg.decoder_ffn_dim, self.dtype, self.act)
        self.final_layer_norm = LayerNorm(cfg.layer_norm_eps, self.dtype)
        self.dropout = nn.Dropout(cfg.dropout)

    def cross_kv(self, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encoder_attn.kv(encoded)

    def __call__(
        self,
        x: jax.Array,
        self_bias: jax.Array,
        cross_bias: jax.Array,
        cross_kv: tuple[jax.Array, jax.Array],
        deterministic: bool,
        cache: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        drop = lambda y: self.dropout(y, deterministic=deterministic)
        k, v = self.self_attn.kv(x)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, 1)
            cache = (k, v)
        x = self.self_attn_layer_norm(
            x + drop(self.self_attn.attend(x, k, v, self_bias, deterministic))
        )
        h = self.encoder_attn.attend(x, *cross_kv, cross_bias, deterministic)
        x = self.encoder_attn_layer_norm(x + drop(h))
        x = self.final_layer_norm(x + drop(self.ffn(x, deterministic)))
        return x, cache


class Bart(EncoderDecoder):
    config: BartConfig
    dtype: Any = jnp.float32
    remat: bool = False
    act: Activations | None = None

    def setup(self) -> None:
        cfg = self.config
        emb = lambda n: nn.Embed(n, cfg.d_model, embedding_init=nn.initializers.normal(0.02))
        self.shared = emb(cfg.vocab_size)
        if not cfg.tie_word_embeddings:
            # transformers 5 unties every tied key with tie_word_embeddings=False: the encoder
            # and decoder token tables are then their own parameters, like the lm_head.
            self.encoder_tokens = emb(cfg.vocab_size)
            self.decoder_tokens = emb(cfg.vocab_size)
        n_pos = cfg.max_position_embeddings + _POSITION_OFFSET
        self.encoder_positions = emb(n_pos)
        self.decoder_positions = emb(n_pos)
        self.encoder_layernorm_embedding = LayerNorm(cfg.layer_norm_eps, self.dtype)
        self.decoder_layernorm_embedding = LayerNorm(cfg.layer_norm_eps, self.dtype)
        enc = nn.remat(EncoderLayer, static_argnums=(3,)) if self.remat else EncoderLayer
        dec = nn.remat(DecoderLayer, static_argnums=(5,)) if self.remat else DecoderLayer
        self.encoder_layers = [
            enc(cfg, self.dtype, self.act, name=f"encoder_layer_{i}")
            for i in range(cfg.encoder_layers)
        ]
        self.decoder_layers = [
            dec(cfg, self.dtype, self.act, name=f"decoder_layer_{i}")
            for i in range(cfg.decoder_layers)
        ]
        self.final_logits_bias = self.param(
            "final_logits_bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg.vocab_size, self.dtype)
        self.dropout = nn.Dropout(cfg.dropout)

    def _embed(
        self, ids: jax.Array, positions: jax.Array, side: str, deterministic: bool
    ) -> jax.Array:
        """Token × embed_scale + learned position (offset 2), then LayerNorm and dropout."""
        if self.config.tie_word_embeddings:
            tokens = self.shared
        else:
            tokens = self.encoder_tokens if side == "encoder" else self.decoder_tokens
        table = self.encoder_positions if side == "encoder" else self.decoder_positions
        norm = (
            self.encoder_layernorm_embedding
            if side == "encoder"
            else self.decoder_layernorm_embedding
        )
        x = tokens(ids) * self.config.embed_scale + table(positions + _POSITION_OFFSET)
        x = constrain(self.act, norm(x), _BLE)
        return self.dropout(x, deterministic=deterministic)

    def encode(self, ids: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        pos = jnp.arange(ids.shape[1])[None]
        x = self._embed(ids, pos, "encoder", deterministic)
        bias = _mask_bias(mask)
        for layer in self.encoder_layers:
            x = layer(x, bias, deterministic)
        return x

    def decode(
        self,
        decoder_input_ids: jax.Array,
        encoded: jax.Array,
        encoder_mask: jax.Array,
        decoder_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced decoder hidden states [B, T, D] (before the lm_head)."""
        length = decoder_input_ids.shape[1]
        pos = jnp.arange(length)
        x = self._embed(decoder_input_ids, pos[None], "decoder", deterministic)
        causal = jnp.where(pos[None, :] <= pos[:, None], 0.0, jnp.finfo(jnp.float32).min)
        self_bias = causal[None, None]
        if decoder_mask is not None:
            self_bias = self_bias + _mask_bias(decoder_mask)
        cross_bias = _mask_bias(encoder_mask)
        for layer in self.decoder_layers:
            x, _ = layer(x, self_bias, cross_bias, layer.cross_kv(encoded), deterministic)
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Hidden [..., D] → logits [..., V] in fp32 (tied head + final_logits_bias)."""
        if self.config.tie_word_embeddings:
            table = self.shared.embedding.astype(self.dtype)
            out = jnp.einsum(
                "...d,vd->...v",
                hidden.astype(self.dtype),
                table,
                preferred_element_type=jnp.float32,
            )
        else:
            out = self.lm_head(hidden)
        out = out + self.final_logits_bias
        if out.ndim == 3:
            out = constrain(self.act, out, ("batch", None, "vocab"))
        return out

    def init_cache(self, encoded: jax.Array, max_len: int) -> tuple[list, list]:
        cfg = self.config
        heads = cfg.decoder_attention_heads
        shape = (encoded.shape[0], max_len, heads, cfg.d_model // heads)
        cache = [
            (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
            for _ in self.decoder_layers
        ]
        return cache, [layer.cross_kv(encoded) for layer in self.decoder_layers]

    def decode_step(
        self,
        token: jax.Array,
        index: jax.Array,
        cache: list,
        cross_kv: list,
        encoder_mask: jax.Array,
    ) -> tuple[jax.Array, list]:
        """token [B] at position `index` → (logits [B, V] fp32, cache)."""
        max_len = cache[0][0].shape[1]
        x = self._embed(token[:, None], index[None, None], "decoder", True)
        k_pos = jnp.arange(max_len)
        self_bias = jnp.where(k_pos <= index, 0.0, jnp.finfo(jnp.float32).min)[None, None, None, :]
        cross_bias = _mask_bias(encoder_mask)
        new_cache = []
        for layer, kv, layer_cache in zip(self.decoder_layers, cross_kv, cache):
            x, layer_cache = layer(x, self_bias, cross_bias, kv, True, layer_cache, index)
            new_cache.append(layer_cache)
        return self.logits(x[:, 0]), new_cache
