"""The DPR contrastive step that SPAR (Λ on BM25 labels) and QGen (synthetic pairs) share.

    q      = Q(θ, query tokens)                                  [B, d]
    p      = P(θ, passages: gathered token rows or given tokens)  [B·(1+n), d]
             rows: the B positives first, then the B·n hard negatives
    p_all  = all_gather(p) over the whole mesh                    [B·(1+n), d] on every device
    loss   = −log softmax(scale · q · p_allᵀ)[i, i]               in-batch + hard negatives

Every query competes against the positives and hard negatives of the whole global batch, not
only of its own device. A candidate that is the query's own positive passage again (another
query of the same passage in the batch, or a hard negative that is that passage) is left out
of its softmax (`mask_duplicates`): it would be a positive scored as a negative. Parameters may
be replicated or sharded by the usual rules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxret.index.gather import gather_rows
from jaxret.index.mips import RowLayout, row_sharding
from jaxret.losses import contrastive_loss
from jaxret.models.dual_encoder import DualEncoder
from jaxret.parallel.axes import DATA
from jaxret.train.setup import RetrieverRunner, batch_shardings
from jaxret.train.state import (
    RETRIEVER_FIXES,
    TrainState,
    apply_gradients,
    compile_ahead,
    jit_step,
    step_rng,
)


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    scale: float = 1.0  # multiplies the similarity (DPR: dot product, 1.0)
    dropout: bool = True
    mask_duplicates: bool = True  # candidates equal to the query's own positive do not compete

    @classmethod
    def for_encoder(cls, encoder: DualEncoder, **kwargs: Any) -> ContrastiveConfig:
        """Trains on the similarity the encoder is evaluated with: `model.scale` × cosine,
        or the plain dot product (one scale per model, never a second knob to keep equal)."""
        return cls(scale=encoder.logit_scale, **kwargs)


def not_own_positive(rows: jax.Array, batch_size: int) -> jax.Array:
    """valid [B, M]: candidate m may compete for query i unless it is passage `rows[i]` (the
    query's positive) at another column. rows [M]: candidate passage rows, positives first."""
    own = rows[:batch_size, None] == rows[None, :]
    return ~own | (jnp.arange(batch_size)[:, None] == jnp.arange(rows.shape[0])[None, :])


def passage_tokens(
    batch: dict[str, Any],
    tables: dict[str, jax.Array],
    layout: RowLayout | None,
    mesh: Mesh,
) -> dict[str, jax.Array]:
    """The batch's passages as encoder inputs [B·(1+n), L]: gathered from the device token
    tables by `passage_rows` [B, 1+n] (positives first), or given as `passages` tokens."""
    if "passage_rows" in batch:
        rows = batch["passage_rows"].T.reshape(-1)  # [(1+n)·B]: all positives, then negatives
        tokens = {k: gather_rows(t, rows, layout, mesh) for k, t in tables.items()}
        tokens["attention_mask"] = (tokens["input_ids"] != 0).astype(jnp.int32)
        tokens.setdefault("token_type_ids", jnp.zeros_like(tokens["input_ids"]))
    else:
        p = batch["passages"]  # {input_ids, attention_mask, token_type_ids}: [B, 1+n, L]
        tokens = {k: v.swapaxes(0, 1).reshape((-1,) + v.shape[2:]) for k, v in p.items()}
    return jax.lax.with_sharding_constraint(tokens, NamedSharding(mesh, DATA))


def contrastive_loss_fn(
    params: Any,
    batch: dict[str, Any],
    tables: dict[str, jax.Array],
    rng: jax.Array,
    *,
    encoder: DualEncoder,
    cfg: ContrastiveConfig,
    mesh: Mesh,
    layout: RowLayout | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    q_rng, p_rng = jax.random.split(rng)
    drop = lambda r: r if cfg.dropout else None
    q = encoder.embed(params, "query", batch["query"], dropout_rng=drop(q_rng))  # [B, d]
    tokens = passage_tokens(batch, tables, layout, mesh)
    p = encoder.embed(params, "passage", tokens, dropout_rng=drop(p_rng))  # [B(1+n), d]
    # The whole mesh's passages are every query's candidates.
    p_all = jax.lax.with_sharding_constraint(p, NamedSharding(mesh, PartitionSpec()))
    b = q.shape[0]
    positive = jnp.arange(b)
    valid = None
    if cfg.mask_duplicates and "passage_rows" in batch:
        rows = batch["passage_rows"].T.reshape(-1)  # [M], in the order of p
        rows = jax.lax.with_sharding_constraint(rows, NamedSharding(mesh, PartitionSpec()))
        valid = not_own_positive(rows, b)
    loss = contrastive_loss(q, p_all, positive, cfg.scale, valid)
    scores = jnp.einsum("bd,md->bm", q, p_all, preferred_element_type=jnp.float32)
    if valid is not None:
        scores = jnp.where(valid, scores, -jnp.inf)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(scores, -1) == positive),
        "candidates": jnp.float32(p_all.shape[0]),
    }
    return loss, metrics


def make_train_step(
    encoder: DualEncoder,
    optimizer: optax.GradientTransformation,
    cfg: ContrastiveConfig,
    mesh: Mesh,
    in_shardings: tuple,
    layout: RowLayout | None = None,
) -> Any:
    """step(state, batch, tables) → (state, metrics): jitted, explicit shardings, donated."""

    def step(
        state: TrainState, batch: dict[str, Any], tables: dict[str, jax.Array]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_fn = jax.value_and_grad(contrastive_loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(
            state.params,
            batch,
            tables,
            step_rng(state),
            encoder=encoder,
            cfg=cfg,
            mesh=mesh,
            layout=layout,
        )
        state, update = apply_gradients(state, grads, loss, optimizer)
        return state, {**metrics, **update}

    return jit_step(step, mesh, in_shardings)


def compile_train_step(
    encoder: DualEncoder,
    optimizer: optax.GradientTransformation,
    cfg: ContrastiveConfig,
    mesh: Mesh,
    layout: RowLayout,
    state: TrainState,
    state_shardings: Any,
    example: dict[str, Any],
    tables: dict[str, jax.Array],
    what: str,
) -> Any:
    """`make_train_step` for global batches like `example` over the row-sharded token
    `tables`, compiled now (`compile_ahead`: refused in one line if a device cannot hold it)."""
    in_shardings = (
        state_shardings,
        batch_shardings(mesh, example),
        jax.tree.map(lambda _: row_sharding(mesh), tables),
    )
    step = make_train_step(encoder, optimizer, cfg, mesh, in_shardings, layout)
    return compile_ahead(step, (state, example, tables), what, RETRIEVER_FIXES)


class ContrastiveRunner(RetrieverRunner):
    """A retriever trained by this step (SPAR's Λ, QGen's retriever) over the row-sharded
    token `tables` of its corpus (`layout`; empty for ICT batches that carry their tokens)."""

    layout: RowLayout | None
    tables: dict[str, jax.Array]

    def compile_step(self, dropout: bool, what: str) -> None:
        """The train step for this runner's batches, compiled now (after `start_training`)."""
        cfg = ContrastiveConfig.for_encoder(self.encoder, dropout=dropout)
        self.step_fn = compile_train_step(
            self.encoder,
            self.optimizer,
            cfg,
            self.mesh,
            self.layout,
            self.state,
            self.shardings,
            self.batch_at(0),
            self.tables,
            what,
        )

    def train_step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        return self.step_fn(state, batch, self.tables)
