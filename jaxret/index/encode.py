"""Corpus encoding: jitted, data-parallel over the mesh, each process encoding its own rows."""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from jaxret.data.corpus_store import TokenTable, open_table, tokenizer_fingerprint
from jaxret.data.readers import Corpus
from jaxret.data.tokenization import Truncation, tokenize_passages
from jaxret.index.mips import RowLayout, row_sharding, row_spec, storage_dtype, to_storage
from jaxret.index.sharded import (
    ShardedIndex,
    index_dtype,
    params_fingerprint,
    process_row_range,
)
from jaxret.models.dual_encoder import DualEncoder, EncoderSpec, Tower
from jaxret.parallel.activations import map_rows
from jaxret.parallel.axes import DATA
from jaxret.parallel.host_data import global_batch


def passage_table(
    store: str | os.PathLike,
    corpus: Corpus,
    encoder: DualEncoder | EncoderSpec,
    tokenizer: Any,
    **build: Any,
) -> TokenTable:
    """The retriever's tokenization of the corpus, built once and memory-mapped. `encoder`
    may be just its spec (`jaxret prepare` loads no weights); `build`: open_table's options."""
    spec = encoder.spec if isinstance(encoder, DualEncoder) else encoder

    def tokenize(titles: list[str], texts: list[str], trunc: Truncation) -> dict[str, np.ndarray]:
        return tokenize_passages(
            tokenizer,
            titles,
            texts,
            spec.max_passage_length,
            spec.passage_format,
            truncation=trunc,
        )

    fingerprint = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "max_length": spec.max_passage_length,
        "passage_format": spec.passage_format,
        "layout": 2,  # bumped whenever the row layout of a format changes
    }
    return open_table(store, "passages", corpus, tokenize, fingerprint, **build)


def token_keys(passage_format: str) -> tuple[str, ...]:
    """The columns a passage tower reads: only HF sentence pairs carry token types; every
    other format has all-zero types (steps derive the mask from pad id 0)."""
    return ("input_ids", "token_type_ids") if passage_format == "hf_pair" else ("input_ids",)


def tables_on_device(
    table: TokenTable, layout: RowLayout, mesh: Mesh, keys: tuple[str, ...]
) -> dict[str, jax.Array]:
    """Columns `keys` of a token table on the devices in the index layout [N_pad, L]."""
    from jaxret.index.gather import device_table, memmap_rows

    arrays = table.arrays
    return {
        k: device_table(memmap_rows(arrays[k], len(table)), layout, mesh, arrays[k].dtype)
        for k in keys
    }


@functools.lru_cache(maxsize=32)
def make_embed_fn(encoder: DualEncoder, tower: Tower, mesh: Mesh) -> Any:
    """One jitted encoder per (model, tower, mesh): refreshes and evaluations reuse its
    compilations instead of re-tracing a fresh wrapper each time."""
    return jax.jit(
        lambda params, tokens: encoder.embed(params, tower, tokens),
        out_shardings=NamedSharding(mesh, DATA),
    )


def bucket_lengths(lengths: np.ndarray, max_length: int, multiple: int = 32) -> np.ndarray:
    """Pad lengths up to a multiple of `multiple` (at most `max_length`): few compiled shapes."""
    return np.minimum(np.maximum(1, -(-lengths // multiple)) * multiple, max_length)


def encode_rows(
    encoder: DualEncoder,
    params: Any,
    tokens: TokenTable | dict[str, np.ndarray],
    tower: Tower,
    mesh: Mesh,
    rows: range,
    batch_size: int = 128,
    desc: str | None = "encoding",
    embed_fn: Any = None,
) -> np.ndarray:
    """Embeds this process's `rows` (rows past the table's end are padding) → [len(rows), d].

    Rows are encoded longest first and each batch is cut to its bucketed longest length, so
    short passages do not pay for the maximum length. Every process must call this with
    ranges of equal length: each batch is one SPMD step, and the bucket lengths are agreed
    across processes.
    """
    data_size = mesh.shape["data"] if "data" in mesh.shape else 1
    local_data = max(1, data_size // jax.process_count())
    local_bs = math.ceil(max(1, batch_size // jax.process_count()) / local_data) * local_data
    embed_fn = embed_fn or make_embed_fn(encoder, tower, mesh)
    table = tokens if isinstance(tokens, TokenTable) else None
    arrays = table.arrays if table else tokens
    n_real = len(table) if table else len(tokens["input_ids"])
    max_len = next(iter(arrays.values())).shape[1]

    ids = np.arange(rows.start, rows.stop)
    lengths = np.zeros(len(ids), np.int64)
    real = ids < n_real
    lengths[real] = _lengths(arrays["attention_mask"], ids[real])
    order = np.argsort(-lengths, kind="stable")
    starts = list(range(0, len(ids), local_bs))
    batch_len = np.array(
        [bucket_lengths(lengths[order[s]], max_len) for s in starts], np.int64
    ).reshape(-1)
    if jax.process_count() > 1:
        batch_len = np.asarray(multihost_utils.process_allgather(batch_len)).max(0)

    out = np.zeros((len(ids), encoder.dim), np.float32)
    start_time = time.perf_counter()
    bar = tqdm(total=len(ids), desc=desc, unit="psg", disable=desc is None, unit_scale=True)
    for s, length in zip(starts, batch_len):
        sel = order[s : s + local_bs]
        real_rows = ids[sel][ids[sel] < n_real]  # a prefix: padding rows have length 0, sort last
        batch = {}
        for k, arr in arrays.items():
            block = np.zeros((local_bs, int(length)), np.int32)
            block[: len(real_rows)] = np.asarray(arr[real_rows], np.int32)[:, :length]
            batch[k] = block
        emb = embed_fn(params, global_batch(batch, mesh, DATA))
        local = np.asarray(multihost_utils.global_array_to_host_local_array(emb, mesh, DATA))
        out[sel] = local[: len(sel)]
        bar.update(len(sel))
    bar.close()
    if desc is not None and len(ids):
        rate = len(ids) / max(time.perf_counter() - start_time, 1e-9)
        tqdm.write(f"{desc}: {len(ids)} passages, {rate:.0f} passages/s")
    return out


def _lengths(mask: np.ndarray, ids: np.ndarray, block: int = 65536) -> np.ndarray:
    """Token counts of rows `ids` (contiguous in practice), read in blocks from a memmap."""
    out = np.zeros(len(ids), np.int64)
    for s in range(0, len(ids), block):
        part = ids[s : s + block]
        if len(part) and part[-1] - part[0] == len(part) - 1:
            out[s : s + block] = np.asarray(mask[part[0] : part[-1] + 1]).sum(1)
        else:
            out[s : s + block] = np.asarray(mask[part]).sum(1)
    return out


def encode_corpus(
    encoder: DualEncoder,
    params: Any,
    tokens: TokenTable | dict[str, np.ndarray],
    mesh: Mesh,
    batch_size: int = 128,
    dtype: Any = "bfloat16",
    chunk_rows: int = 32768,
    corpus_hash: str = "",
    step: int = 0,
    desc: str | None = "encoding corpus",
    embed_fn: Any = None,
) -> ShardedIndex:
    """Embeds every passage with the passage tower into a row-sharded `ShardedIndex`.

    The index's fingerprint records the corpus hash and which parameters produced it.
    """
    n = len(tokens) if isinstance(tokens, TokenTable) else len(tokens["input_ids"])
    layout = RowLayout.for_mesh(n, mesh, chunk_rows)
    rows = process_row_range(layout, mesh)
    local = encode_rows(
        encoder, params, tokens, "passage", mesh, rows, batch_size, desc, embed_fn=embed_fn
    )
    fingerprint = {
        "corpus_hash": corpus_hash,
        "encoder": params_fingerprint(encoder.tower_params(params, "passage"), step),
    }
    return ShardedIndex.from_process_rows(local, layout, mesh, dtype, fingerprint)


def tokens_from_table(rows: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Device token rows (uint16 ids, pad id 0) → the encoder's int32 inputs."""
    ids = rows["input_ids"].astype(jnp.int32)
    types = rows.get("token_type_ids")
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).astype(jnp.int32),
        "token_type_ids": jnp.zeros_like(ids) if types is None else types.astype(jnp.int32),
    }


@functools.lru_cache(maxsize=32)
def device_encoder(
    encoder: DualEncoder, mesh: Mesh, layout: RowLayout, per_device: int, dtype: str
) -> Any:
    """jit(params, tables, old_embeddings) → new embeddings [N_pad, d] in the index layout.

    The passage tower runs over the token tables where they already live (row-sharded on
    the devices, the index layout), `per_device` rows of every device per step; the output
    is born row-sharded like the index, and the old embeddings are donated so that their
    memory holds the new ones (never two full indexes at once).
    """
    axes = tuple(mesh.axis_names)
    stored = storage_dtype(index_dtype(dtype), mesh)
    rps, shards = layout.rows_per_shard, layout.num_shards
    per_device = max(1, min(per_device, rps))
    # Every call a full batch of `per_device` rows per device: each device's block is padded
    # to a whole number of batches inside the program (a block of 2687 rows, a prime, is 11
    # calls of 256, not 2687 calls of one row), and the padding is cut from the output.
    padded = -(-rps // per_device) * per_device
    spec = row_spec(mesh)

    def blocks(x: jax.Array, rows: int, to: int) -> jax.Array:  # [D·rows, …] → [D·to, …]
        x = x.reshape((shards, rows) + x.shape[1:])
        x = jnp.pad(x, [(0, 0), (0, to - rows)] + [(0, 0)] * (x.ndim - 2)) if to > rows else x
        x = x[:, :to].reshape((shards * to,) + x.shape[2:])
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def encode(params: Any, tables: dict[str, jax.Array], old: jax.Array) -> jax.Array:
        del old  # donated: its buffer is reused for the output
        embed = lambda rows: encoder.embed(params, "passage", tokens_from_table(rows))
        tables = jax.tree.map(lambda x: blocks(x, rps, padded), tables)
        out = map_rows(embed, tables, mesh, axes, per_device)  # [D·padded, d]
        return to_storage(blocks(out, padded, rps), stored)

    return jax.jit(encode, out_shardings=row_sharding(mesh), donate_argnums=(2,), keep_unused=True)


def refresh_index(
    encoder: DualEncoder,
    params: Any,
    tables: dict[str, jax.Array],
    index: ShardedIndex,
    per_device: int = 64,
    fingerprint: dict[str, Any] | None = None,
) -> ShardedIndex:
    """A new index of `tables` encoded with `params`; `index`'s buffer is donated (unusable
    afterwards)."""
    fn = device_encoder(encoder, index.mesh, index.layout, per_device, index.dtype.name)
    emb = fn(params, tables, index.embeddings)
    meta = index.meta if fingerprint is None else fingerprint
    return ShardedIndex(emb, index.layout, index.mesh, tuple(sorted(meta.items())))


def abstract_index(layout: RowLayout, mesh: Mesh, dim: int, dtype: str) -> ShardedIndex:
    """The index's shape, storage dtype and layout with no memory behind it
    (`jax.ShapeDtypeStruct` rows): what a program that takes the index compiles against
    before the index is allocated."""
    stored = storage_dtype(index_dtype(dtype), mesh)
    rows = jax.ShapeDtypeStruct((layout.padded_rows, dim), stored, sharding=row_sharding(mesh))
    return ShardedIndex(rows, layout, mesh, ())


def is_allocated(index: ShardedIndex) -> bool:
    """Whether the index has memory behind it: not an `abstract_index`, nor rows donated
    away (a restore that found them damaged while reading them in)."""
    return isinstance(index.embeddings, jax.Array) and not index.embeddings.is_deleted()


def empty_index(layout: RowLayout, mesh: Mesh, dim: int, dtype: str) -> ShardedIndex:
    """A zero index of the right shape and layout (the donor for the first refresh)."""
    rows = abstract_index(layout, mesh, dim, dtype).embeddings
    zeros = jax.jit(
        lambda: jnp.zeros(rows.shape, rows.dtype), out_shardings=rows.sharding
    )()  # zero bits are 0.0 in every storage
    return ShardedIndex(zeros, layout, mesh, ())
