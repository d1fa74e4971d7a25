"""HF T5 checkpoints ↔ `jaxret.models.t5.T5` parameters (safetensors, sharded or not)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxret.models import hf_io
from jaxret.models.t5 import T5, T5Config

# The tied copies of `shared.weight` that some checkpoints also store.
_IGNORED = (r"^(encoder|decoder)\.embed_tokens\.weight$",)


def _rules(cfg: T5Config) -> list[hf_io.TensorRule]:
    rule = hf_io.TensorRule
    h, dk, d = cfg.num_heads, cfg.d_kv, cfg.d_model

    def attention(hf: str, fx: tuple[str, ...]) -> list[hf_io.TensorRule]:
        out = [  # HF [H·Dk, D] → [D, H·Dk] → Flax [D, H, Dk]
            rule(f"{hf}.{n}.weight", fx + (n, "kernel"), True, (d, h, dk), ((0,), (1, 2)))
            for n in ("q", "k", "v")
        ]
        # HF [D, H·Dk] → [H·Dk, D] → Flax [H, Dk, D]
        out.append(rule(f"{hf}.o.weight", fx + ("o", "kernel"), True, (h, dk, d), ((0, 1), (2,))))
        return out

    def mlp(hf: str, fx: tuple[str, ...]) -> list[hf_io.TensorRule]:
        names = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
        return [
            rule(f"{hf}.DenseReluDense.{n}.weight", fx + ("mlp", n, "kernel"), transpose=True)
            for n in names
        ]

    def norm(hf: str, fx: tuple[str, ...]) -> hf_io.TensorRule:
        return rule(f"{hf}.weight", fx + ("scale",))

    rules = [rule("shared.weight", ("shared", "embedding"))]
    for stack, n_layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        rules.append(
            rule(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                (stack, "relative_bias", "relative_attention_bias", "embedding"),
            )
        )
        for i in range(n_layers):
            hf, fx = f"{stack}.block.{i}.layer.", (stack, f"layer_{i}")
            rules += attention(f"{hf}0.SelfAttention", fx + ("self_attention",))
            if stack == "encoder":
                rules.append(norm(f"{hf}0.layer_norm", fx + ("pre_attention_norm",)))
                rules += mlp(f"{hf}1", fx)
                rules.append(norm(f"{hf}1.layer_norm", fx + ("pre_mlp_norm",)))
            else:
                rules.append(norm(f"{hf}0.layer_norm", fx + ("pre_self_attention_norm",)))
                rules += attention(f"{hf}1.EncDecAttention", fx + ("cross_attention",))
                rules.append(norm(f"{hf}1.layer_norm", fx + ("pre_cross_attention_norm",)))
                rules += mlp(f"{hf}2", fx)
                rules.append(norm(f"{hf}2.layer_norm", fx + ("pre_mlp_norm",)))
        rules.append(norm(f"{stack}.final_layer_norm", (stack, "final_norm")))
    if not cfg.tie_word_embeddings:
        rules.append(rule("lm_head.weight", ("lm_head", "kernel"), transpose=True))
    return rules


def abstract_params(cfg: T5Config) -> dict:
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: T5(cfg).init(jax.random.key(0), ids, ids, ids))["params"]


def _separate_lm_head(names: set[str], read: Any, rows: int | None = None) -> bool:
    """Whether the checkpoint's lm_head is its own tensor (T5 v1.1, T0) or a copy of the
    tied embedding. `read(name, block)`; with `rows`, compared `rows` vocabulary rows at a
    time (an untied head differs in its first block)."""
    if "lm_head.weight" not in names:
        return False
    if "shared.weight" not in names:
        return True
    if rows is None:
        return not np.array_equal(read("lm_head.weight", None), read("shared.weight", None))
    start = 0
    while True:
        block = (slice(start, start + rows),)
        a, b = read("lm_head.weight", block), read("shared.weight", block)
        if a.shape != b.shape or not np.array_equal(a, b):
            return True
        if len(a) < rows:
            return False
        start += rows


def load_t5(
    path_or_hub_id: str | os.PathLike, dtype: str = "float32"
) -> tuple[T5Config, dict, Path]:
    """(config, numpy params in `dtype`, resolved folder). bf16 halves host memory for T0-3B."""
    folder = hf_io.resolve_checkpoint(path_or_hub_id)
    tensors = hf_io.read_tensors(folder)
    separate = _separate_lm_head(set(tensors), lambda name, block: tensors[name])
    if "lm_head.weight" in tensors and not separate:  # one more copy of the tied embedding
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    cfg = T5Config.from_hf_dict(hf_io.read_config(folder), separate_lm_head=separate)
    expected = hf_io.flat_shapes(abstract_params(cfg))
    np_dtype = jnp.dtype(dtype)
    params = hf_io.tensors_to_params(
        tensors, _rules(cfg), expected, ignore=_IGNORED, source=str(folder), dtype=np_dtype
    )
    return cfg, params, folder


def load_t5_sharded(
    path_or_hub_id: str | os.PathLike, dtype: str, mesh: Any, strategy: str
) -> tuple[T5Config, dict, Path]:
    """(config, params as global arrays sharded by `strategy`, folder). Each process reads
    from the safetensors only the blocks its devices hold (T5-XXL: 1.4 GB per device of 16
    under FSDP, never the 22 GB whole)."""
    from jaxret.parallel.partitioning import param_shardings

    folder = hf_io.resolve_checkpoint(path_or_hub_id)
    source = hf_io.TensorSource(folder)
    names = set(source.names())
    separate = _separate_lm_head(names, source.read, rows=4096)
    ignore = _IGNORED if separate else _IGNORED + (r"^lm_head\.weight$",)
    cfg = T5Config.from_hf_dict(hf_io.read_config(folder), separate_lm_head=separate)
    abstract = abstract_params(cfg)
    shardings = param_shardings(abstract, mesh, strategy)
    params = hf_io.place_params(
        source,
        _rules(cfg),
        hf_io.flat_shapes(abstract),
        shardings,
        ignore=ignore,
        dtype=jnp.dtype(dtype),
    )
    return cfg, params, folder


def save_t5(folder: str | os.PathLike, cfg: T5Config, params: dict) -> None:
    """Writes a folder that `transformers.T5ForConditionalGeneration.from_pretrained` loads."""
    config = cfg.to_hf_dict()
    config["dtype"] = "float32"
    tensors = hf_io.params_to_tensors(jax.device_get(params), _rules(cfg))
    if cfg.tie_word_embeddings and not cfg.scale_decoder_outputs:
        # transformers 4 reads tie_word_embeddings=False as "untied": give it the lm_head.
        tensors["lm_head.weight"] = tensors["shared.weight"].copy()
    hf_io.write_checkpoint(Path(folder), config, tensors)
