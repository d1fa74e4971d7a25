"""HF BART checkpoints ↔ `jaxret.models.bart.Bart` parameters."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxret.models import hf_io
from jaxret.models.bart import Bart, BartConfig

# Tied copies of the shared embedding that checkpoints may also store.
_TIED_COPIES = (r"^model\.(encoder|decoder)\.embed_tokens\.weight$",)


def _rules(cfg: BartConfig) -> list[hf_io.TensorRule]:
    rule = hf_io.TensorRule
    d = cfg.d_model

    def norm(hf: str, fx: tuple[str, ...]) -> list[hf_io.TensorRule]:
        return [rule(f"{hf}.weight", fx + ("scale",)), rule(f"{hf}.bias", fx + ("bias",))]

    def attention(hf: str, fx: tuple[str, ...], heads: int) -> list[hf_io.TensorRule]:
        hd = d // heads
        out = []
        for n in ("q_proj", "k_proj", "v_proj"):  # HF [H·Dh, D] → [D, H·Dh] → Flax [D, H, Dh]
            out += [
                rule(f"{hf}.{n}.weight", fx + (n, "kernel"), True, (d, heads, hd), ((0,), (1, 2))),
                rule(f"{hf}.{n}.bias", fx + (n, "bias"), False, (heads, hd), ((0, 1),)),
            ]
        out += [  # HF [D, H·Dh] → [H·Dh, D] → Flax [H, Dh, D]
            rule(
                f"{hf}.out_proj.weight",
                fx + ("out_proj", "kernel"),
                True,
                (heads, hd, d),
                ((0, 1), (2,)),
            ),
            rule(f"{hf}.out_proj.bias", fx + ("out_proj", "bias")),
        ]
        return out

    def ffn(hf: str, fx: tuple[str, ...]) -> list[hf_io.TensorRule]:
        return [
            rule(f"{hf}.fc1.weight", fx + ("ffn", "fc1", "kernel"), transpose=True),
            rule(f"{hf}.fc1.bias", fx + ("ffn", "fc1", "bias")),
            rule(f"{hf}.fc2.weight", fx + ("ffn", "fc2", "kernel"), transpose=True),
            rule(f"{hf}.fc2.bias", fx + ("ffn", "fc2", "bias")),
        ]

    rules = [
        rule("model.encoder.embed_positions.weight", ("encoder_positions", "embedding")),
        rule("model.decoder.embed_positions.weight", ("decoder_positions", "embedding")),
        rule("final_logits_bias", ("final_logits_bias",), shape=(cfg.vocab_size,), groups=((0,),)),
    ]
    rules += norm("model.encoder.layernorm_embedding", ("encoder_layernorm_embedding",))
    rules += norm("model.decoder.layernorm_embedding", ("decoder_layernorm_embedding",))
    for i in range(cfg.encoder_layers):
        hf, fx = f"model.encoder.layers.{i}", (f"encoder_layer_{i}",)
        rules += attention(f"{hf}.self_attn", fx + ("self_attn",), cfg.encoder_attention_heads)
        rules += norm(f"{hf}.self_attn_layer_norm", fx + ("self_attn_layer_norm",))
        rules += ffn(hf, fx)
        rules += norm(f"{hf}.final_layer_norm", fx + ("final_layer_norm",))
    for i in range(cfg.decoder_layers):
        hf, fx = f"model.decoder.layers.{i}", (f"decoder_layer_{i}",)
        heads = cfg.decoder_attention_heads
        rules += attention(f"{hf}.self_attn", fx + ("self_attn",), heads)
        rules += norm(f"{hf}.self_attn_layer_norm", fx + ("self_attn_layer_norm",))
        rules += attention(f"{hf}.encoder_attn", fx + ("encoder_attn",), heads)
        rules += norm(f"{hf}.encoder_attn_layer_norm", fx + ("encoder_attn_layer_norm",))
        rules += ffn(hf, fx)
        rules += norm(f"{hf}.final_layer_norm", fx + ("final_layer_norm",))
    if cfg.tie_word_embeddings:
        rules.append(rule("model.shared.weight", ("shared", "embedding")))
    else:
        rules += [
            rule("lm_head.weight", ("lm_head", "kernel"), transpose=True),
            rule("model.encoder.embed_tokens.weight", ("encoder_tokens", "embedding")),
            rule("model.decoder.embed_tokens.weight", ("decoder_tokens", "embedding")),
        ]
    return rules


def abstract_params(cfg: BartConfig) -> dict:
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: Bart(cfg).init(jax.random.key(0), ids, ids, ids))["params"]


def load_bart(
    path_or_hub_id: str | os.PathLike, dtype: str = "float32"
) -> tuple[BartConfig, dict, Path]:
    """(config, numpy params in `dtype`, resolved folder). A checkpoint without
    `final_logits_bias` (transformers treats it as a zero buffer) gets zeros; with tied word
    embeddings the lm_head is the shared embedding, whatever the file stores."""
    folder = hf_io.resolve_checkpoint(path_or_hub_id)
    tensors = dict(hf_io.read_tensors(folder))
    cfg = BartConfig.from_hf_dict(hf_io.read_config(folder))
    if cfg.tie_word_embeddings:  # transformers ties lm_head to the shared embedding, too
        tensors.pop("lm_head.weight", None)
    if "model.shared.weight" not in tensors and "model.encoder.embed_tokens.weight" in tensors:
        tensors["model.shared.weight"] = tensors["model.encoder.embed_tokens.weight"]
    if not cfg.tie_word_embeddings:  # transformers 4 files store only `shared`: the tables
        for side in ("encoder", "decoder"):
            tensors.setdefault(f"model.{side}.embed_tokens.weight", tensors["model.shared.weight"])
    if "final_logits_bias" not in tensors:
        tensors["final_logits_bias"] = np.zeros((1, cfg.vocab_size), np.float32)
    expected = hf_io.flat_shapes(abstract_params(cfg))
    params = hf_io.tensors_to_params(
        tensors,
        _rules(cfg),
        expected,
        # Untied (transformers 5): `shared` is stored but the model never reads it.
        ignore=_TIED_COPIES if cfg.tie_word_embeddings else (r"^model\.shared\.weight$",),
        source=str(folder),
        dtype=jnp.dtype(dtype),
    )
    return cfg, params, folder


def save_bart(folder: str | os.PathLike, cfg: BartConfig, params: dict) -> None:
    """Writes a folder that `transformers.BartForConditionalGeneration.from_pretrained` loads."""
    config = cfg.to_hf_dict()
    config["dtype"] = "float32"
    tensors = hf_io.params_to_tensors(jax.device_get(params), _rules(cfg))
    tensors["final_logits_bias"] = tensors["final_logits_bias"].reshape(1, -1)
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.shared.weight"].copy()
    else:
        tensors["model.shared.weight"] = tensors["model.encoder.embed_tokens.weight"].copy()
    hf_io.write_checkpoint(Path(folder), config, tensors)
