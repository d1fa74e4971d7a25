"""`ShardedIndex`: a row-sharded embedding matrix with exact top-k search.

It is a pytree (the embedding matrix is its only leaf), so a jitted train step takes it as
an argument and calls `index.search` inside the trace, with no host round trip.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxret import dtypes
from jaxret.index.mips import (
    RowLayout,
    mips_top_k,
    row_sharding,
    storage_dtype,
    stored_values,
    to_storage,
    value_dtype,
)
from jaxret.parallel.mesh import make_mesh

MANIFEST = "manifest.json"


class IndexMismatchError(ValueError):
    pass


def index_dtype(dtype: Any) -> jnp.dtype:
    """The values' dtype of an index (a name or dtype): float32 or bfloat16, else refused."""
    return dtypes.by_name(dtype, "index dtype")


def process_row_range(layout: RowLayout, mesh: Mesh, process_index: int | None = None) -> range:
    """Padded global rows whose blocks live on this process's devices (contiguous by design)."""
    p = jax.process_index() if process_index is None else process_index
    blocks = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == p]
    if blocks != list(range(blocks[0], blocks[-1] + 1)):
        raise ValueError(
            "this mesh gives a process non-contiguous row blocks; order devices by host"
        )
    return range(blocks[0] * layout.rows_per_shard, (blocks[-1] + 1) * layout.rows_per_shard)


def params_fingerprint(params: Any, step: int) -> dict[str, Any]:
    """Which encoder produced an index: training step + a hash of the parameter values."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf, dtype=np.float32)).tobytes())
    return {"step": int(step), "param_hash": h.hexdigest()[:32]}


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class ShardedIndex:
    # [N_pad, d], rows sharded over every device of `mesh`, stored in
    # `mips.storage_dtype(dtype, mesh)`: a bf16 index on CPU as the uint16 bits of its values
    embeddings: jax.Array
    layout: RowLayout
    mesh: Mesh
    fingerprint: tuple[tuple[str, Any], ...] = ()  # e.g. corpus hash, encoder step/hash

    # The fingerprint is host metadata, not structure: it changes at every refresh and must
    # neither retrigger compilation nor travel through jit.
    def tree_flatten(self) -> tuple[tuple[jax.Array], tuple[Any, ...]]:
        return (self.embeddings,), (self.layout, self.mesh)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[jax.Array]) -> ShardedIndex:
        return cls(children[0], *aux)

    @property
    def num_rows(self) -> int:
        return self.layout.num_rows

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the rows' values (float32 or bfloat16), however they are stored."""
        return value_dtype(self.embeddings.dtype)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.fingerprint)

    @classmethod
    def from_embeddings(
        cls,
        embeddings: Any,
        mesh: Mesh | None = None,
        dtype: Any = jnp.bfloat16,
        chunk_rows: int = 32768,
        fingerprint: dict[str, Any] | None = None,
    ) -> ShardedIndex:
        """All N rows given on every process (host numpy or a jax.Array)."""
        mesh = mesh or make_mesh()
        n, d = embeddings.shape
        layout = RowLayout.for_mesh(n, mesh, chunk_rows)
        host = np.asarray(jax.device_get(embeddings), dtype=np.float32)
        rows = process_row_range(layout, mesh)
        local = np.zeros((len(rows), d), np.float32)
        real = host[rows.start : min(rows.stop, n)]
        local[: len(real)] = real
        return cls._assemble(local, layout, mesh, dtype, fingerprint)

    @classmethod
    def from_process_rows(
        cls,
        local_rows: np.ndarray,  # this process's rows of `process_row_range(layout, mesh)`
        layout: RowLayout,
        mesh: Mesh,
        dtype: Any = jnp.bfloat16,
        fingerprint: dict[str, Any] | None = None,
    ) -> ShardedIndex:
        """Multi-host construction: each process encoded only its own rows."""
        want = len(process_row_range(layout, mesh))
        local = np.zeros((want, local_rows.shape[1]), np.float32)
        local[: len(local_rows)] = local_rows[:want]
        return cls._assemble(local, layout, mesh, dtype, fingerprint)

    @classmethod
    def _assemble(
        cls,
        local: np.ndarray,
        layout: RowLayout,
        mesh: Mesh,
        dtype: Any,
        fingerprint: dict[str, Any] | None,
    ) -> ShardedIndex:
        stored = storage_dtype(index_dtype(dtype), mesh)
        global_shape = (layout.padded_rows, local.shape[1])
        arr = jax.make_array_from_process_local_data(
            row_sharding(mesh), to_storage(local, stored), global_shape
        )
        return cls(arr, layout, mesh, tuple(sorted((fingerprint or {}).items())))

    def search(self, queries: Any, k: int) -> tuple[jax.Array, jax.Array]:
        """(scores [B, k] fp32, row ids [B, k] int32). Works on host arrays and inside jit."""
        if isinstance(queries, jax.core.Tracer):
            return mips_top_k(self.embeddings, queries, k, self.layout, self.mesh)
        return _jitted_search(self, jnp.asarray(queries, jnp.float32), k)

    def search_batched(
        self, queries: np.ndarray, k: int, batch_size: int = 256, desc: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Host search over many queries in fixed-size batches (one compilation)."""
        n = len(queries)
        scores = np.zeros((n, k), np.float32)
        ids = np.zeros((n, k), np.int32)
        bs = min(batch_size, n)
        for s in tqdm(range(0, n, bs), desc=desc, disable=desc is None, unit="batch"):
            q = np.asarray(queries[s : s + bs], np.float32)
            real = len(q)
            if real < bs:
                q = np.concatenate([q, np.zeros((bs - real, q.shape[1]), np.float32)])
            sc, ix = jax.device_get(self.search(q, k))
            scores[s : s + real], ids[s : s + real] = sc[:real], ix[:real]
        return scores, ids

    def rows(self) -> np.ndarray:
        """The N real rows on the host (fp32); for tests and exports."""
        full = multihost_utils.process_allgather(self.embeddings, tiled=True)
        return np.asarray(stored_values(np.asarray(full)), np.float32)[: self.num_rows]

    # -- persistence ---------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        import orbax.checkpoint as ocp

        directory = Path(directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(directory / "embeddings", {"embeddings": self.embeddings}, force=True)
        ckpt.wait_until_finished()
        if jax.process_index() == 0:
            manifest = {
                "num_rows": self.num_rows,
                "dim": self.dim,
                "dtype": index_dtype(self.dtype).name,
                # how the saved rows are stored (`load` converts to its platform's storage)
                "storage": jnp.dtype(self.embeddings.dtype).name,
                "chunk": self.layout.chunk,
                "fingerprint": self.meta,
            }
            (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))

    @staticmethod
    def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise IndexMismatchError(f"{directory} is not a jaxret index (no {MANIFEST})")
        return json.loads(path.read_text())

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        mesh: Mesh | None = None,
        expect: dict[str, Any] | None = None,
    ) -> ShardedIndex:
        """Restores onto `mesh` (any device count). Each key of `expect` (e.g. corpus_hash,
        encoder) must equal the saved fingerprint, else the index is refused."""
        import orbax.checkpoint as ocp

        directory = Path(directory).absolute()
        manifest = cls.read_manifest(directory)
        saved = manifest["fingerprint"]
        for key, want in (expect or {}).items():
            have = saved.get(key)
            if have != want:
                raise IndexMismatchError(
                    f"index at {directory} was built for {key}={have!r}, not {want!r}; "
                    "rebuild it with `jaxret encode` for this corpus/encoder"
                )
        mesh = mesh or make_mesh()
        # Restored straight into this mesh's layout: each process reads only the rows its
        # devices own; the saved zero padding is cut or extended to this layout's.
        layout = RowLayout.for_mesh(manifest["num_rows"], mesh, manifest["chunk"])
        dtype = index_dtype(manifest["dtype"])
        saved_as = jnp.dtype(manifest.get("storage", manifest["dtype"]))  # older: the values
        if value_dtype(saved_as) != dtype:
            raise IndexMismatchError(
                f"{directory / MANIFEST}: rows stored as {saved_as.name} cannot hold "
                f"{dtype.name} values; the manifest is damaged"
            )
        shape = (layout.padded_rows, manifest["dim"])
        sharding = row_sharding(mesh)
        args = ocp.args.PyTreeRestore(
            item={"embeddings": jax.ShapeDtypeStruct(shape, saved_as, sharding=sharding)},
            restore_args={
                "embeddings": ocp.ArrayRestoreArgs(
                    sharding=sharding, global_shape=shape, dtype=saved_as, strict=False
                )
            },
        )
        restored = ocp.PyTreeCheckpointer().restore(directory / "embeddings", args=args)
        rows = restored["embeddings"]
        stored = storage_dtype(dtype, mesh)
        if rows.dtype != stored:  # saved on another platform: bits <-> bf16, no rounding
            rows = _restore_as(rows, stored)
        fingerprint = tuple(sorted(saved.items()))
        return cls(rows, layout, mesh, fingerprint)


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(0,))
def _restore_as(rows: jax.Array, stored: jnp.dtype) -> jax.Array:
    return to_storage(stored_values(rows), stored)


@functools.partial(jax.jit, static_argnums=(2,))
def _jitted_search(index: ShardedIndex, queries: jax.Array, k: int):
    return mips_top_k(index.embeddings, queries, k, index.layout, index.mesh)
