"""HF BERT / MegatronBERT checkpoints ↔ `jaxret.models.bert.BertModel` parameters."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxret.models import hf_io
from jaxret.models.bert import BertConfig, BertModel

# Pre-training heads and non-parameter buffers that a retriever never uses.
_IGNORED = (r"^cls\.", r"position_ids$", r"^vocab_(transform|layer_norm|projector)\.")


def _distilbert_rules(cfg: BertConfig, prefix: str = "") -> list[hf_io.TensorRule]:
    rule = hf_io.TensorRule
    h, d, e = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size

    def pair(hf: str, fx: tuple[str, ...], kernel: str = "kernel") -> list[hf_io.TensorRule]:
        return [
            rule(f"{hf}.weight", fx + (kernel,), transpose=True),
            rule(f"{hf}.bias", fx + ("bias",)),
        ]

    norm = lambda hf, fx: [
        rule(f"{hf}.weight", fx + ("scale",)),
        rule(f"{hf}.bias", fx + ("bias",)),
    ]
    rules = [
        rule(f"{prefix}embeddings.{n}.weight", (n, "embedding"))
        for n in ("word_embeddings", "position_embeddings")
    ]
    rules += norm(f"{prefix}embeddings.LayerNorm", ("embeddings_norm",))
    for i in range(cfg.num_hidden_layers):
        hf, fx = f"{prefix}transformer.layer.{i}.", (f"layer_{i}",)
        for ours, theirs in (("query", "q_lin"), ("key", "k_lin"), ("value", "v_lin")):
            rules += [
                rule(
                    f"{hf}attention.{theirs}.weight",
                    fx + ("attention", ours, "kernel"),
                    True,
                    (e, h, d),
                    ((0,), (1, 2)),
                ),
                rule(
                    f"{hf}attention.{theirs}.bias",
                    fx + ("attention", ours, "bias"),
                    False,
                    (h, d),
                    ((0, 1),),
                ),
            ]
        rules += [
            rule(
                f"{hf}attention.out_lin.weight",
                fx + ("attention", "output", "kernel"),
                True,
                (h, d, e),
                ((0, 1), (2,)),
            ),
            rule(f"{hf}attention.out_lin.bias", fx + ("attention", "output", "bias")),
        ]
        rules += norm(f"{hf}sa_layer_norm", fx + ("attention_norm",))
        rules += pair(f"{hf}ffn.lin1", fx + ("intermediate",))
        rules += pair(f"{hf}ffn.lin2", fx + ("output",))
        rules += norm(f"{hf}output_layer_norm", fx + ("output_norm",))
    return rules


def _rules(cfg: BertConfig, prefix: str = "") -> list[hf_io.TensorRule]:
    if cfg.family == "distilbert":
        return _distilbert_rules(cfg, prefix)
    rule = hf_io.TensorRule
    h, d, e = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    rules = [
        rule(f"{prefix}embeddings.{n}.weight", (n, "embedding"))
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    ]

    def norm(hf: str, flax: tuple[str, ...]) -> list[hf_io.TensorRule]:
        return [rule(f"{hf}.weight", flax + ("scale",)), rule(f"{hf}.bias", flax + ("bias",))]

    def dense(hf: str, flax: tuple[str, ...]) -> list[hf_io.TensorRule]:
        return [
            rule(f"{hf}.weight", flax + ("kernel",), transpose=True),
            rule(f"{hf}.bias", flax + ("bias",)),
        ]

    pre_ln = cfg.pre_layer_norm  # MegatronBertModel: attention.ln, layer ln, encoder.ln
    if not pre_ln:
        rules += norm(f"{prefix}embeddings.LayerNorm", ("embeddings_norm",))
    for i in range(cfg.num_hidden_layers):
        hf, fx = f"{prefix}encoder.layer.{i}.", (f"layer_{i}",)
        for n in ("query", "key", "value"):
            rules += [
                # HF [H·D, E] → [E, H·D] → Flax [E, H, D]
                rule(
                    f"{hf}attention.self.{n}.weight",
                    fx + ("attention", n, "kernel"),
                    transpose=True,
                    shape=(e, h, d),
                    groups=((0,), (1, 2)),
                ),
                rule(
                    f"{hf}attention.self.{n}.bias",
                    fx + ("attention", n, "bias"),
                    shape=(h, d),
                    groups=((0, 1),),
                ),
            ]
        rules += [
            rule(  # HF [E, H·D] → [H·D, E] → Flax [H, D, E]
                f"{hf}attention.output.dense.weight",
                fx + ("attention", "output", "kernel"),
                transpose=True,
                shape=(h, d, e),
                groups=((0, 1), (2,)),
            ),
            rule(f"{hf}attention.output.dense.bias", fx + ("attention", "output", "bias")),
        ]
        attention_norm = f"{hf}attention.ln" if pre_ln else f"{hf}attention.output.LayerNorm"
        rules += norm(attention_norm, fx + ("attention_norm",))
        rules += dense(f"{hf}intermediate.dense", fx + ("intermediate",))
        rules += dense(f"{hf}output.dense", fx + ("output",))
        rules += norm(f"{hf}ln" if pre_ln else f"{hf}output.LayerNorm", fx + ("output_norm",))
    if pre_ln:
        rules += norm(f"{prefix}encoder.ln", ("final_norm",))
    if cfg.add_pooler:
        rules += dense(f"{prefix}pooler.dense", ("pooler",))
    return rules


def _normalize_names(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """TF-converted checkpoints name layer norms gamma/beta; some nest under `bert.`."""
    renamed = {
        k.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        ): v
        for k, v in tensors.items()
    }
    prefix = ""
    for candidate in ("bert.", "distilbert."):  # heads' checkpoints nest the encoder
        if any(k.startswith(f"{candidate}embeddings.") for k in renamed):
            prefix = candidate
    return renamed, prefix


def abstract_params(cfg: BertConfig) -> dict:
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: BertModel(cfg).init(jax.random.key(0), ids, ids))
    return shapes["params"]


def load_bert(path_or_hub_id: str | os.PathLike) -> tuple[BertConfig, dict, Path]:
    """Loads a BERT-family HF checkpoint: (config, fp32 numpy params, resolved folder)."""
    folder = hf_io.resolve_checkpoint(path_or_hub_id)
    tensors, prefix = _normalize_names(hf_io.read_tensors(folder))
    has_pooler = f"{prefix}pooler.dense.weight" in tensors
    cfg = BertConfig.from_hf_dict(hf_io.read_config(folder), add_pooler=has_pooler)
    expected = hf_io.flat_shapes(abstract_params(cfg))
    params = hf_io.tensors_to_params(
        tensors, _rules(cfg, prefix), expected, ignore=_IGNORED, source=str(folder)
    )
    return cfg, params, folder


def bert_to_tensors(cfg: BertConfig, params: dict) -> dict[str, np.ndarray]:
    return hf_io.params_to_tensors(jax.device_get(params), _rules(cfg))


def save_bert(folder: str | os.PathLike, cfg: BertConfig, params: dict) -> None:
    """Writes a folder that `transformers.AutoModel.from_pretrained` loads (a `BertModel`, or
    a `MegatronBertModel` for the pre-LN layout)."""
    config = cfg.to_hf_dict()
    config["dtype"] = "float32"
    hf_io.write_checkpoint(Path(folder), config, bert_to_tensors(cfg, params))
