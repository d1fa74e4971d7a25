"""Query generators: any HF T5 (docT5query, BEIR's query-gen-msmarco-t5-*) or BART checkpoint
(the query-generation paper's generator), loaded into jaxret's Flax modules and saved back."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxret import dtypes
from jaxret.models import hf_io
from jaxret.models.bart import Bart, BartConfig
from jaxret.models.hf_bart import load_bart, save_bart
from jaxret.models.hf_t5 import load_t5, save_t5
from jaxret.models.t5 import T5


@dataclasses.dataclass(frozen=True)
class Generator:
    model: Any  # a T5 or Bart module (hashable: a jit static argument)
    kind: str  # "t5" | "bart"

    @property
    def config(self) -> Any:
        return self.model.config


def load_generator(
    path_or_hub_id: str | os.PathLike, dtype: str = "float32", remat: bool = False
) -> tuple[Generator, dict, Any, Path]:
    """(generator, numpy params, tokenizer, folder) from an HF folder or hub id."""
    from transformers import AutoTokenizer

    dtypes.by_name(dtype)
    folder = hf_io.resolve_checkpoint(path_or_hub_id)
    kind = hf_io.read_config(folder).get("model_type")
    if kind in ("t5", "mt5"):
        cfg, params, folder = load_t5(folder, dtype=dtype)
        model = T5(cfg, dtype=dtypes.by_name(dtype), remat=remat)
        kind = "t5"
    elif kind == "bart":
        cfg, params, folder = load_bart(folder, dtype=dtype)
        model = Bart(cfg, dtype=dtypes.by_name(dtype), remat=remat)
    else:
        raise hf_io.CheckpointError(f"{folder}: model_type {kind!r} is not a T5 or BART generator")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return Generator(model, kind), params, tokenizer, folder


def save_generator(
    folder: str | os.PathLike, generator: Generator, params: dict, tokenizer: Any
) -> Path:
    """An HF folder that transformers' AutoModelForSeq2SeqLM loads (plus the tokenizer)."""
    folder = Path(folder)
    if generator.kind == "t5":
        save_t5(folder, generator.config, params)
    else:
        save_bart(folder, generator.config, params)
    tokenizer.save_pretrained(str(folder))
    return folder


def scratch_generator(
    tokenizer_folder: str | os.PathLike,
    sizes: dict[str, Any],
    rng: jax.Array,
    dtype: str = "float32",
    remat: bool = False,
) -> tuple[Generator, dict, Any]:
    """A randomly initialized BART on an existing tokenizer (for offline demos and tests).

    `sizes`: BartConfig fields (d_model, encoder_layers, …). With a BERT-style tokenizer the
    sequence is `[CLS] query [SEP]`: [CLS] is BOS, [SEP] is EOS and, as in BART, the decoder
    start token.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if None in (bos, eos, tokenizer.pad_token_id):
        raise ValueError(f"{tokenizer_folder}: the tokenizer needs BOS/CLS, EOS/SEP and PAD tokens")
    cfg = BartConfig(
        **{
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "decoder_start_token_id": eos,
            "forced_eos_token_id": eos,
            **dict(sizes),
        }
    )
    model = Bart(cfg, dtype=dtypes.by_name(dtype), remat=remat)
    ids = jnp.zeros((1, 2), jnp.int32)
    params = jax.device_get(jax.jit(lambda r: model.init(r, ids, ids, ids)["params"])(rng))
    params = jax.tree.map(np.asarray, params)
    return Generator(model, "bart"), params, tokenizer
