"""How ART's training index follows the parameters: two strategies behind one interface.

SyncRefresh (the paper's, `art.refresh = "sync"`): the corpus is re-encoded whole every
`train.refresh_every` steps, after the step and before the loop's checkpoint of it (so a
resume rebuilds the index once, never twice). Its checkpointed item is the passage tower
that built the index: a resume re-encodes exactly that index.

RollingRefresh (`art.refresh = "rolling"`): after every step each device re-encodes its next
slice of rows in place (index.rolling), so training never stalls; a cycle of `refresh_every`
steps encodes the corpus once. `art.rolling_program = "fused"` does it inside the train step
(one program), "separate" as a second program dispatched after the step. Its checkpointed
item is the index itself and its per-row staleness record (exact resume), kept in the newest
checkpoint only.

Both encode lazily: `ensure` encodes a pending index (the start's, or a resume's) at first
use, inside the loop where a SIGTERM is seen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxret.configlib import ConfigError
from jaxret.index.encode import abstract_index, empty_index, is_allocated
from jaxret.index.mips import BF16_BITS, RowLayout, row_sharding
from jaxret.index.rolling import (
    empty_staleness,
    rolling_refresher,
    rolling_update,
    slice_rows,
    staleness,
)
from jaxret.index.sharded import ShardedIndex
from jaxret.models.dual_encoder import DualEncoder
from jaxret.train.row_snapshot import Rows

# (passage-tower params, step, why, donor index or None) -> the corpus encoded on the devices
Encode = Callable[[Any, int, str, ShardedIndex | None], ShardedIndex]


class SyncRefresh:
    """The whole index re-encoded every `refresh_every` steps."""

    name = "sync"

    def __init__(
        self,
        *,
        cfg: Any,
        encoder: DualEncoder,
        layout: RowLayout,
        mesh: Any,
        encode: Encode,
        passage_params: Any,
        passage_tables: dict[str, jax.Array],
        corpus_hash: str,
        total_steps: int,
    ):
        self.encoder, self.layout, self.mesh, self.cfg = encoder, layout, mesh, cfg
        self.encode, self.total_steps = encode, total_steps
        self.passage_tables, self.corpus_hash = passage_tables, corpus_hash
        self.refresh_every = int(cfg.train.refresh_every)
        self.index_params = _copy(passage_params)  # the tower that built `index` (None: state's)
        # Allocated at first use (`allocated`): the train step compiles before it exists.
        self.index = abstract_index(layout, mesh, encoder.dim, cfg.encode.index_dtype)
        # The step whose parameters built all of `index`; None: its rows are of several steps.
        self.index_step: int | None = 0
        self.pending: tuple[int, str] | None = (0, "start")  # (step, why) to encode at use
        self.done = 0

    def allocated(self) -> ShardedIndex:
        """The index, its memory allocated (zero rows) if it was not yet."""
        if not is_allocated(self.index):
            dtype = self.cfg.encode.index_dtype
            self.index = empty_index(self.layout, self.mesh, self.encoder.dim, dtype)
        return self.index

    # -- the train step -------------------------------------------------------------------

    fused_update: Any = None  # a refresh carried inside the train step (rolling, fused)

    def step_in_shardings(self) -> tuple:
        """Extra in_shardings of the train step (after the teacher's)."""
        return ()

    def step_args(self) -> tuple:
        """Extra arguments of the train step (after the teacher's), as `train_step` passes."""
        return ()

    def ensure(self, state: Any) -> None:
        """Encodes the pending index with `index_params` (None: those of `state`)."""
        if self.pending is None:
            return
        step, why = self.pending
        params = self.index_params
        if params is None:
            params = self.encoder.tower_params(state.params, "passage")
        self.index = self.encode(params, step, why, self.allocated())
        self.index_step, self.pending = step, None

    def train_step(self, step_fn: Any, state: Any, args: tuple) -> tuple[Any, dict]:
        return step_fn(state, *args)

    def after_step(self, state: Any, done: int) -> dict[str, float]:
        """Re-encodes the corpus every refresh_every steps (not after the last step)."""
        self.done = done
        if done % self.refresh_every or done >= self.total_steps:
            return {}
        self.index_params = _copy(self.encoder.tower_params(state.params, "passage"))
        self.index_step = done
        self.index = self.encode(self.index_params, done, "refresh", self.index)
        return {}

    # -- evaluation -----------------------------------------------------------------------

    def age(self, step: int) -> dict[str, float]:
        """How old the index's rows are at `step` (reported with every evaluation on it)."""
        return {} if self.index_step is None else {"index_age": float(step - self.index_step)}

    def fresh_at(self, step: int) -> bool:
        """Whether every row was encoded with the parameters of `step`."""
        return self.index_step == step

    def replace(self, index: ShardedIndex, step: int | None) -> None:
        """An index encoded whole outside training (the final test's)."""
        self.index, self.index_step = index, step

    # -- checkpoints ----------------------------------------------------------------------

    def aux(self) -> Any:
        return self.index_params

    def rows(self) -> Rows | None:
        return None

    def aux_meta(self) -> dict[str, Any]:
        return {"index_step": self.index_step, "refresh": self.name}

    def restore(self, aux: Any, meta: dict[str, Any]) -> None:
        self.index_params = aux  # the index of the checkpoint, encoded on first use
        self.pending = (int(meta.get("index_step", 0)), "resume")


class RollingRefresh(SyncRefresh):
    """A slice of every device's rows re-encoded after every step."""

    name = "rolling"

    def __init__(self, *, program: str = "separate", **kwargs: Any):
        super().__init__(**kwargs)
        if program not in ("fused", "separate"):
            raise ConfigError(f"art.rolling_program={program!r}; expected 'fused' or 'separate'")
        self.program = program
        self.stale = empty_staleness(self.layout, self.mesh)  # [N_pad]: step of each row
        self.stats: dict[str, Any] = {}
        roll_args = (self.encoder, self.mesh, self.layout, self.refresh_every)
        batch = self.cfg.encode.device_batch
        if program == "fused":
            self.fused_update = rolling_update(*roll_args, batch)
        else:
            self.roll_fn = rolling_refresher(*roll_args, batch)

    def step_in_shardings(self) -> tuple:
        return (row_sharding(self.mesh),) if self.program == "fused" else ()

    def step_args(self) -> tuple:
        return (self.stale,) if self.program == "fused" else ()

    def ensure(self, state: Any) -> None:
        if self.pending is None:
            return
        step = self.pending[0]
        super().ensure(state)
        self.index = self._wrap(self.index.embeddings, step)

    def train_step(self, step_fn: Any, state: Any, args: tuple) -> tuple[Any, dict]:
        if self.program == "separate":
            return step_fn(state, *args)
        state, metrics, index, self.stale = step_fn(state, *args, self.stale)
        self.index = index
        # Reported by after_step as events, the same rows as the separate program writes.
        self.stats = {k: metrics.pop(k) for k in list(metrics) if k.startswith("refresh_")}
        return state, metrics

    def after_step(self, state: Any, done: int) -> dict[str, float]:
        """Re-embeds this step's slice of every device's rows (fused: the step did)."""
        self.done = done
        if self.program == "separate":
            tower = tower_of(self.encoder, self.encoder.tower_params(state.params, "passage"))
            emb, self.stale, stats = self.roll_fn(
                tower, self.passage_tables, self.index.embeddings, self.stale, np.int32(done)
            )
            self.stats = {f"refresh_{k}": v for k, v in stats.items()}
        else:
            emb = self.index.embeddings
        self.index = self._wrap(emb, done)
        self.index_step = None  # rows of several steps: never "fresh" for evaluation
        return {k: float(v) for k, v in jax.device_get(self.stats).items()}

    def _wrap(self, embeddings: jax.Array, done: int) -> ShardedIndex:
        meta = {
            "corpus_hash": self.corpus_hash,
            "encoder": {"refresh": "rolling", "step": done},
        }
        return ShardedIndex(embeddings, self.layout, self.mesh, tuple(sorted(meta.items())))

    def age(self, step: int) -> dict[str, float]:
        return {f"index_{k}": v for k, v in staleness(self.stale, self.layout, step).items()}

    def aux(self) -> Any:
        return None  # the index and its staleness are `rows`

    def rows(self) -> Rows:
        """The index and the step of each row (32 GB at the paper's size): saved piece by
        piece before the rolling refresh overwrites each (train/row_snapshot.py); a
        piece is one refresh slice, the next step's the next in the ring. Also the restore
        template (before any step: the empty donor index has the shape). The rows' key
        names their storage (`mips.storage_dtype`): bf16 rows stored as bits on CPU are
        not restored into bf16 on GPU/TPU (the dtypes differ: refused, re-encoded)."""
        s = slice_rows(self.layout, self.refresh_every, self.cfg.encode.device_batch)
        embeddings = self.allocated().embeddings
        arrays = {_rows_key(embeddings): embeddings, "stale": self.stale}
        return Rows(arrays, s, self.refresh_every, self.done % self.refresh_every)

    def aux_meta(self) -> dict[str, Any]:
        meta = super().aux_meta()
        meta["refresh_pointer"] = self.done % self.refresh_every
        return meta

    def restore(self, aux: Any, meta: dict[str, Any]) -> None:
        step = int(meta["step"])
        self.done = step
        if aux is None:
            # An older checkpoint (its index is kept in the newest only): the whole index is
            # encoded once, with the restored parameters, and every row is that step's.
            self.index_params, self.pending = None, (step, "resume")
            self.stale = empty_staleness(self.layout, self.mesh, step)
            return
        # The index itself was saved: nothing to re-encode.
        self.index, self.stale = self._wrap(aux[_rows_key(self.index.embeddings)], -1), aux["stale"]
        saved = meta.get("index_step")
        self.index_step = None if saved is None or saved < 0 else int(saved)
        self.pending = None


def _rows_key(embeddings: jax.Array) -> str:
    return "embedding_bits" if embeddings.dtype == BF16_BITS else "embeddings"


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def tower_of(encoder: DualEncoder, passage_params: Any) -> dict[str, Any]:
    """The parameter tree the passage tower's forward pass takes."""
    return {"shared" if encoder.spec.shared else "passage": passage_params}


def make_refresh(cfg: Any, **kwargs: Any) -> SyncRefresh:
    """The strategy `art.refresh` names; kwargs as SyncRefresh's."""
    mode = cfg.art.get("refresh", "sync")
    if mode == "sync":
        return SyncRefresh(cfg=cfg, **kwargs)
    if mode == "rolling":
        program = cfg.art.get("rolling_program", "separate")
        return RollingRefresh(cfg=cfg, program=program, **kwargs)
    raise ConfigError(f"art.refresh={mode!r}; expected 'sync' or 'rolling'")
