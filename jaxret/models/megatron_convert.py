"""Megatron-LM retriever checkpoints (ART, MSS, EMDR²) → a jaxret export of HF MegatronBERT
towers.

ART starts from MSS-pretrained Megatron BERT towers and saves its retriever the same way
(DevSinghSachan/art: `megatron/model/dualencoder_model.py`, `tools/save_art_retriever.py`).
A checkpoint is `DIR/latest_checkpointed_iteration.txt` + `DIR/iter_NNNNNNN/mp_rank_00/
model_optim_rng.pt` (or `release/`), whose `model` holds `query_model` and `context_model`,
each a `language_model` with `embedding` (word, position, tokentype) and `encoder` (or
`transformer` in older Megatron) with pre-LN layers and a final LayerNorm.

The fused `query_key_value` projection is stored in one of three row orders, told by the
checkpoint's `checkpoint_version`: 0 → [3, heads, head_dim], 1.0 → [heads, head_dim, 3]
(ART's Megatron), ≥ 2.0 → [heads, 3, head_dim].

The output is a folder `jaxret eval/encode/train --model OUT` loads directly (two towers,
[CLS] pooling, dot product, ART's `[CLS] title [SEP] text [SEP]` passages), each tower an HF
folder that `transformers.AutoModel` loads as `MegatronBertModel`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxret.models.dual_encoder import EncoderSpec
from jaxret.models.hf_io import CheckpointError, write_checkpoint

TOWERS = {"query_model": "query_encoder", "context_model": "passage_encoder"}


def checkpoint_file(path: str | os.PathLike) -> Path:
    """The `model_optim_rng.pt` of a Megatron checkpoint folder (latest iteration), or `path`
    itself when it is a file."""
    path = Path(path)
    if path.is_file():
        return path
    tracker = path / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        it = tracker.read_text().strip()
        sub = "release" if it == "release" else f"iter_{int(it):07d}"
        path = path / sub
    for candidate in (path / "mp_rank_00" / "model_optim_rng.pt", path / "model_optim_rng.pt"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{path}: no Megatron checkpoint (expected latest_checkpointed_iteration.txt and "
        "iter_*/mp_rank_00/model_optim_rng.pt)"
    )


def load_state(path: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """torch.load with `weights_only=True` (plus argparse.Namespace, which Megatron stores);
    `trust_pickle` allows arbitrary pickles for checkpoints that need more."""
    import torch

    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} holds objects other than tensors and Megatron's argparse.Namespace "
            f"({type(e).__name__}: {str(e)[:200]}). If you trust the file, pass --trust-pickle."
        ) from e


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _find_towers(model: Mapping) -> dict[str, Mapping]:
    """The query/context tower dicts, wherever ART nests them (`retriever/biencoder_model`)."""
    if all(t in model for t in TOWERS):
        return {t: model[t] for t in TOWERS}
    for value in model.values():
        if isinstance(value, Mapping):
            found = _find_towers(value)
            if found:
                return found
    return {}


def split_qkv(fused: np.ndarray, heads: int, version: float) -> list[np.ndarray]:
    """[3·H·D, ...] fused rows → [q, k, v], each [H·D, ...] in HF's (head, dim) order."""
    rest = fused.shape[1:]
    d = fused.shape[0] // (3 * heads)
    if version == 0:
        parts = fused.reshape((3, heads, d) + rest)
    elif version < 2.0:
        parts = np.moveaxis(fused.reshape((heads, d, 3) + rest), 2, 0)
    else:
        parts = np.moveaxis(fused.reshape((heads, 3, d) + rest), 1, 0)
    return [np.ascontiguousarray(p.reshape((heads * d,) + rest)) for p in parts]


def _numpy(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)


def tower_to_hf(
    tower: Mapping, heads: int, version: float, eps: float, act: str
) -> tuple[dict, dict[str, np.ndarray]]:
    """One Megatron language model → (HF MegatronBertConfig dict, HF tensors)."""
    flat = {k: _numpy(v) for k, v in _flatten(tower).items()}
    flat = {re.sub(r"^language_model\.", "", k): v for k, v in flat.items()}
    flat = {re.sub(r"^transformer\.", "encoder.", k): v for k, v in flat.items()}
    flat = {k.replace(".self_attention.", ".attention."): v for k, v in flat.items()}
    emb = "embedding."
    out = {
        "embeddings.word_embeddings.weight": flat.pop(f"{emb}word_embeddings.weight"),
        "embeddings.position_embeddings.weight": flat.pop(f"{emb}position_embeddings.weight"),
    }
    if f"{emb}tokentype_embeddings.weight" in flat:
        out["embeddings.token_type_embeddings.weight"] = flat.pop(
            f"{emb}tokentype_embeddings.weight"
        )
    else:  # a model without token types: HF needs the table, all-zero rows change nothing
        out["embeddings.token_type_embeddings.weight"] = np.zeros(
            (2, out["embeddings.word_embeddings.weight"].shape[1]), np.float32
        )
    layers = sorted(
        {int(m.group(1)) for k in flat if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    )
    if layers != list(range(len(layers))) or not layers:
        raise CheckpointError(f"unexpected layer numbering in the checkpoint: {layers[:5]}…")
    names = {
        "input_layernorm": "attention.ln",
        "attention.dense": "attention.output.dense",
        "post_attention_layernorm": "ln",
        "mlp.dense_h_to_4h": "intermediate.dense",
        "mlp.dense_4h_to_h": "output.dense",
    }
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = split_qkv(flat.pop(f"{src}attention.query_key_value.{kind}"), heads, version)
            for name, value in (("query", q), ("key", k), ("value", v)):
                out[f"{dst}attention.self.{name}.{kind}"] = value
            for meg, hf in names.items():
                out[f"{dst}{hf}.{kind}"] = flat.pop(f"{src}{meg}.{kind}")
    for kind in ("weight", "bias"):
        out[f"encoder.ln.{kind}"] = flat.pop(f"encoder.final_layernorm.{kind}")
        if f"pooler.dense.{kind}" in flat:
            out[f"pooler.dense.{kind}"] = flat.pop(f"pooler.dense.{kind}")
    if flat:
        raise CheckpointError(f"tensors the converter does not know: {sorted(flat)[:8]}")
    word = out["embeddings.word_embeddings.weight"]
    config = {
        "model_type": "megatron-bert",
        "architectures": ["MegatronBertModel"],
        "vocab_size": int(word.shape[0]),
        "hidden_size": int(word.shape[1]),
        "num_hidden_layers": len(layers),
        "num_attention_heads": heads,
        "intermediate_size": int(out["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "hidden_act": act,
        "max_position_embeddings": int(out["embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(out["embeddings.token_type_embeddings.weight"].shape[0]),
        "layer_norm_eps": eps,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "dtype": "float32",
    }
    return config, out


def bert_tokenizer(vocab_file: str | os.PathLike, lowercase: bool = True) -> Any:
    """A fast BERT WordPiece tokenizer from a `vocab.txt` (Megatron's BertWordPieceLowerCase)."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    wp = BertWordPieceTokenizer(str(vocab_file), lowercase=lowercase)
    return PreTrainedTokenizerFast(
        tokenizer_object=wp._tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def convert(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    tokenizer: Any,
    num_heads: int | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Writes `out/{query,passage}_encoder` (HF MegatronBERT) and `out/jaxret.json`."""
    path = checkpoint_file(checkpoint)
    state = load_state(path, trust_pickle)
    args = state.get("args")
    heads = num_heads or getattr(args, "num_attention_heads", None)
    if not heads:
        raise CheckpointError(f"{path} stores no args.num_attention_heads: pass --num-heads")
    version = float(state.get("checkpoint_version", 0) or 0)
    eps = float(getattr(args, "layernorm_epsilon", 1e-5) or 1e-5)
    act = "gelu_new" if getattr(args, "openai_gelu", False) else "gelu"
    towers = _find_towers(state.get("model", state))
    if not towers:
        raise CheckpointError(f"{path}: no query_model/context_model (not a retriever checkpoint)")
    out = Path(out)
    for megatron_name, sub in TOWERS.items():
        config, tensors = tower_to_hf(towers[megatron_name], int(heads), version, eps, act)
        write_checkpoint(out / sub, config, tensors)
        tokenizer.save_pretrained(str(out / sub))
    # ART's retriever: [CLS] vectors, dot product, `[CLS] title [SEP] text [SEP]` passages.
    spec = dataclasses.asdict(
        EncoderSpec(shared=False, pooling="cls", normalize=False, passage_format="pair")
    )
    towers_json = {"query": "query_encoder", "passage": "passage_encoder"}
    (out / "jaxret.json").write_text(
        json.dumps({"spec": spec, "towers": towers_json, "source": str(path)}, indent=2)
    )
    return out
