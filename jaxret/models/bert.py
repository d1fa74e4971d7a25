"""Flax (linen) BERT encoder, numerically equal to transformers' `BertModel` and
`MegatronBertModel`.

Two block layouts: BERT's post-LN (embedding LayerNorm, LayerNorm after each residual add)
and Megatron-BERT's pre-LN (no embedding LayerNorm, LayerNorm before attention and before
the MLP, a final LayerNorm) — the layout of the MSS-pretrained towers ART starts from.
Parameters are fp32; `dtype` is the compute dtype. Attention softmax and layer-norm
statistics always run in fp32. Parameter names follow the HF layout closely so that
`jaxret.models.hf_bert` can convert both ways without a lookup table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models.attention import dot_product_attention
from jaxret.parallel.activations import Activations, constrain

# Logical names of activation dimensions (jaxret.parallel.activations).
_BLE = ("batch", None, None)  # [B, L, E]
_BLHD = ("batch", None, "heads", None)  # [B, L, H, D]
_BLF = ("batch", None, "mlp")  # [B, L, F]

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    add_pooler: bool = True
    pre_layer_norm: bool = False  # Megatron-BERT block layout (model_type "megatron-bert")
    family: str = "bert"  # the HF checkpoint layout: bert | megatron-bert | distilbert

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], add_pooler: bool = True) -> BertConfig:
        """Builds from a HF `config.json` dict; rejects architectures this module cannot run."""
        model_type = d.get("model_type", "bert")
        if model_type == "distilbert":
            return cls._from_distilbert(d)
        if model_type not in ("bert", "megatron-bert", "roberta", "xlm-roberta", "electra"):
            raise ValueError(
                f"unsupported model_type {model_type!r}: jaxret's encoder is BERT-family"
            )
        if model_type not in ("bert", "megatron-bert"):
            raise ValueError(
                f"model_type {model_type!r} needs position-id offsets that jaxret's BERT "
                "does not implement yet; use a BERT checkpoint"
            )
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"position_embedding_type {pet!r} is not supported (only 'absolute')")
        act = d.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
        names = {f.name for f in dataclasses.fields(cls)} - {
            "add_pooler",
            "pre_layer_norm",
            "family",
        }
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        megatron = model_type == "megatron-bert"
        return cls(**kwargs, add_pooler=add_pooler, pre_layer_norm=megatron, family=model_type)

    @classmethod
    def _from_distilbert(cls, d: dict[str, Any]) -> BertConfig:
        """DistilBERT (LaPraDoR's initialisation): a post-LN BERT without token types or pooler."""
        if d.get("sinusoidal_pos_embds"):
            raise ValueError("DistilBERT with sinusoidal position embeddings is not supported")
        act = d.get("activation", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"activation {act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
        return cls(
            vocab_size=d.get("vocab_size", 30522),
            hidden_size=d.get("dim", 768),
            num_hidden_layers=d.get("n_layers", 6),
            num_attention_heads=d.get("n_heads", 12),
            intermediate_size=d.get("hidden_dim", 3072),
            hidden_act=act,
            hidden_dropout_prob=d.get("dropout", 0.1),
            attention_probs_dropout_prob=d.get("attention_dropout", 0.1),
            max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=0,
            layer_norm_eps=1e-12,
            pad_token_id=d.get("pad_token_id", 0),
            add_pooler=False,
            family="distilbert",
        )

    def to_hf_dict(self) -> dict[str, Any]:
        if self.family == "distilbert":
            return {
                "model_type": "distilbert",
                "architectures": ["DistilBertModel"],
                "vocab_size": self.vocab_size,
                "dim": self.hidden_size,
                "n_layers": self.num_hidden_layers,
                "n_heads": self.num_attention_heads,
                "hidden_dim": self.intermediate_size,
                "activation": self.hidden_act,
                "dropout": self.hidden_dropout_prob,
                "attention_dropout": self.attention_probs_dropout_prob,
                "max_position_embeddings": self.max_position_embeddings,
                "sinusoidal_pos_embds": False,
                "pad_token_id": self.pad_token_id,
            }
        d = dataclasses.asdict(self)
        d.pop("add_pooler")
        d.pop("family")
        pre_ln = d.pop("pre_layer_norm")
        model_type, arch = (
            ("megatron-bert", "MegatronBertModel") if pre_ln else ("bert", "BertModel")
        )
        d.update(model_type=model_type, architectures=[arch], position_embedding_type="absolute")
        return d

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class LayerNorm(nn.Module):
    """Layer norm with fp32 statistics whatever the compute dtype."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


def _dense(features: Any, dtype: Any, name: str, axis: Any = -1) -> nn.Module:
    return nn.DenseGeneral(
        features,
        axis=axis,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


class SelfAttention(nn.Module):
    config: BertConfig
    dtype: Any
    act: Activations | None = None

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        heads = (cfg.num_attention_heads, cfg.head_dim)
        c = lambda y, axes: constrain(self.act, y, axes)
        q = c(_dense(heads, self.dtype, "query")(x), _BLHD)  # [B, L, H, D]
        k = c(_dense(heads, self.dtype, "key")(x), _BLHD)
        v = c(_dense(heads, self.dtype, "value")(x), _BLHD)
        dropout = nn.Dropout(cfg.attention_probs_dropout_prob)
        ctx = dot_product_attention(
            q,
            k,
            v,
            bias,
            self.dtype,
            lambda p: dropout(p, deterministic=deterministic),
            logit_scale=cfg.head_dim**-0.5,
            act=self.act,
        )
        ctx = c(ctx, _BLHD)
        out = _dense(cfg.hidden_size, self.dtype, "output", axis=(-2, -1))(ctx)
        return c(out, _BLE)  # [B, L, E]


class BertLayer(nn.Module):
    """Post-LN transformer block."""

    config: BertConfig
    dtype: Any
    act: Activations | None = None

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        drop = nn.Dropout(cfg.hidden_dropout_prob)
        c = lambda y, axes: constrain(self.act, y, axes)
        h = SelfAttention(cfg, self.dtype, self.act, name="attention")(x, bias, deterministic)
        x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="attention_norm")(
            drop(h, deterministic=deterministic) + x
        )
        h = c(_dense(cfg.intermediate_size, self.dtype, "intermediate")(x), _BLF)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        h = c(_dense(cfg.hidden_size, self.dtype, "output")(h), _BLE)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="output_norm")(
            drop(h, deterministic=deterministic) + x
        )


class PreLNBertLayer(nn.Module):
    """Megatron-BERT's pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    config: BertConfig
    dtype: Any
    act: Activations | None = None

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        drop = nn.Dropout(cfg.hidden_dropout_prob)
        c = lambda y, axes: constrain(self.act, y, axes)
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="attention_norm")(x)
        h = SelfAttention(cfg, self.dtype, self.act, name="attention")(h, bias, deterministic)
        x = x + drop(h, deterministic=deterministic)
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="output_norm")(x)
        h = c(_dense(cfg.intermediate_size, self.dtype, "intermediate")(h), _BLF)
        h = c(_dense(cfg.hidden_size, self.dtype, "output")(_ACTIVATIONS[cfg.hidden_act](h)), _BLE)
        return x + drop(h, deterministic=deterministic)


class BertModel(nn.Module):
    """Returns (last hidden states [B, L, E], pooled [B, E] or None)."""

    config: BertConfig
    dtype: Any = jnp.float32
    remat: bool = False
    act: Activations | None = None  # activation sharding (None: let XLA choose)

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,  # [B, L] int32
        attention_mask: jax.Array,  # [B, L] 1 = token, 0 = padding
        token_type_ids: jax.Array | None = None,  # [B, L]
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        _, length = input_ids.shape
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embed = lambda n, size: nn.Embed(
            size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02), name=n
        )
        x = (
            embed("word_embeddings", cfg.vocab_size)(input_ids)
            + embed("position_embeddings", cfg.max_position_embeddings)(jnp.arange(length))[None]
        )
        if cfg.type_vocab_size:  # DistilBERT has no token types
            x = x + embed("token_type_embeddings", cfg.type_vocab_size)(token_type_ids)
        if cfg.pre_layer_norm:  # Megatron applies no LayerNorm to the embeddings
            x = x.astype(self.dtype)
        else:
            x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="embeddings_norm")(x)
        x = constrain(self.act, x, _BLE)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)

        # Additive mask in fp32: 0 for tokens, finfo.min for padding (as HF does).
        neg = jnp.finfo(jnp.float32).min
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(jnp.float32)

        block = PreLNBertLayer if cfg.pre_layer_norm else BertLayer
        layer_cls = nn.remat(block, static_argnums=(3,)) if self.remat else block
        for i in range(cfg.num_hidden_layers):
            x = layer_cls(cfg, self.dtype, self.act, name=f"layer_{i}")(x, bias, deterministic)
        if cfg.pre_layer_norm:
            x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="final_norm")(x)

        pooled = None
        if cfg.add_pooler:
            pooled = jnp.tanh(_dense(cfg.hidden_size, self.dtype, "pooler")(x[:, 0]))
        return x, pooled
