"""ART (Sachan et al.): the train step as one pure, jitted, sharded function.

    q      = Q(θ, question tokens)                              [B, d]
    ids    = index.search(stop_gradient(q), K)                   [B, K] exact MIPS, sharded index
    p      = P(θ, gather(passage token rows, ids))                [B, K, d] re-encoded, grads to P
    logq   = log_softmax(q · p / τ),  τ = multiplier · √d         student
    logp   = log_softmax(teacher(ids))                            frozen, no gradient
    loss   = KL(exp(logp) ‖ exp(logq)), batch mean → optax update

Teachers: "t5" (mean question log-likelihood given each passage, from the teacher's token
rows gathered like the student's), "bm25" and "oracle" (a per-question sparse list of
(row, score) pairs fed with the batch: BM25 top-M scores, or qrels relevance).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxret.index.gather import gather_rows
from jaxret.index.sharded import ShardedIndex
from jaxret.losses import kl_teacher_student
from jaxret.models.dual_encoder import DualEncoder
from jaxret.parallel.axes import DATA
from jaxret.teachers.t5_teacher import T5Teacher
from jaxret.train.state import TrainState, apply_gradients, jit_step, step_rng


@dataclasses.dataclass(frozen=True)
class ArtConfig:
    top_k: int = 32
    temperature_multiplier: float = 1.0  # τ = multiplier · √d
    teacher: str = "t5"  # t5 | bm25 | oracle
    teacher_temperature: float = 1.0  # divides sparse-teacher scores
    dropout: bool = True


def sparse_teacher_scores(
    table_ids: jax.Array, table_scores: jax.Array, ids: jax.Array
) -> jax.Array:
    """Score of each retrieved row from a per-question list; rows not listed score 0.

    table_ids [B, M] (−1 = empty), table_scores [B, M], ids [B, K] → [B, K].
    """
    match = table_ids[:, None, :] == ids[:, :, None]  # [B, K, M]
    scores = jnp.where(match, table_scores[:, None, :], 0.0).sum(-1)
    # A non-finite score anywhere in a question's list makes its logits NaN: a corrupt
    # teacher row skips the step (train.state.apply_gradients) instead of training on it.
    corrupt = ~jnp.all(jnp.isfinite(table_scores), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(corrupt, jnp.nan, scores)


def art_logits(
    params: Any,
    batch: dict[str, Any],
    index: ShardedIndex,
    passage_tables: dict[str, jax.Array],  # input_ids (+ token_type_ids) [N_pad, Lp], uint16
    teacher_tables: dict[str, jax.Array],  # t5: input_ids [N_pad, Lt], uint16
    teacher_params: Any,
    rng: jax.Array,
    *,
    encoder: DualEncoder,
    cfg: ArtConfig,
    mesh: Mesh,
    teacher: T5Teacher | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(student logits [B, K], teacher logits [B, K] (no gradient), retrieved rows [B, K])."""
    k = cfg.top_k
    q_rng, p_rng = jax.random.split(rng)
    drop = lambda r: r if cfg.dropout else None
    q = encoder.embed(params, "query", batch["query"], dropout_rng=drop(q_rng))  # [B, d]
    b = q.shape[0]
    _, ids = index.search(jax.lax.stop_gradient(q), k)  # [B, K]
    flat = ids.reshape(-1)
    layout = index.layout
    # Only ids live on the devices; the mask is "not padding" (pad id 0 in BERT and T5).
    p_tokens = {name: gather_rows(t, flat, layout, mesh) for name, t in passage_tables.items()}
    p_tokens["attention_mask"] = (p_tokens["input_ids"] != 0).astype(jnp.int32)
    p_tokens.setdefault("token_type_ids", jnp.zeros_like(p_tokens["input_ids"]))
    p_tokens = jax.lax.with_sharding_constraint(p_tokens, NamedSharding(mesh, DATA))
    p = encoder.embed(params, "passage", p_tokens, dropout_rng=drop(p_rng)).reshape(b, k, -1)
    tau = cfg.temperature_multiplier * math.sqrt(encoder.dim)
    student = jnp.einsum("bd,bkd->bk", q, p, preferred_element_type=jnp.float32) / tau

    if cfg.teacher == "t5":
        z_ids = gather_rows(teacher_tables["input_ids"], flat, layout, mesh)
        z_mask = (z_ids != 0).astype(jnp.int32)
        lt = z_ids.shape[-1]
        z_ids = jax.lax.with_sharding_constraint(z_ids.reshape(b, k, lt), NamedSharding(mesh, DATA))
        z_mask = jax.lax.with_sharding_constraint(
            z_mask.reshape(b, k, lt), NamedSharding(mesh, DATA)
        )
        teacher_logits = teacher.score_tokens(
            teacher_params, z_ids, z_mask, batch["target"]["labels"], batch["target"]["label_mask"]
        )
    elif cfg.teacher in ("bm25", "oracle"):
        teacher_logits = sparse_teacher_scores(batch["teacher_ids"], batch["teacher_scores"], ids)
        teacher_logits = teacher_logits / cfg.teacher_temperature
    else:
        raise ValueError(f"teacher {cfg.teacher!r}; expected t5, bm25 or oracle")
    return student, jax.lax.stop_gradient(teacher_logits), ids


def art_loss(params: Any, *args: Any, **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KL(teacher ‖ student) over the retrieved top-K, batch mean; metrics on the side."""
    student, teacher_logits, _ = art_logits(params, *args, **kwargs)
    loss = kl_teacher_student(teacher_logits, student)
    t = jax.nn.softmax(teacher_logits, -1)
    metrics = {
        "loss": loss,
        "student_top1_agrees": jnp.mean(jnp.argmax(student, -1) == jnp.argmax(teacher_logits, -1)),
        "teacher_entropy": -jnp.sum(jnp.where(t > 0, t * jnp.log(t), 0.0), -1).mean(),
    }
    return loss, metrics


def make_train_step(
    encoder: DualEncoder,
    optimizer: optax.GradientTransformation,
    cfg: ArtConfig,
    mesh: Mesh,
    in_shardings: tuple,
    teacher: T5Teacher | None = None,
    roll: Any = None,
) -> Any:
    """Returns step(state, batch, index, passage_tables, teacher_tables, teacher_params)
    → (state, metrics), jitted with explicit in/out shardings, the state donated. A step with
    a non-finite loss or gradient is skipped (train.state.apply_gradients).

    roll: an `index.rolling.rolling_update`: the step then also takes the staleness record
    (stale [N_pad], in_shardings[6]) and, after the update, re-encodes this step's slice of
    every device's rows with the new parameters — one program: (state, metrics, index, stale),
    index and stale donated; the refresh's stats are the metrics "refresh_*".
    """

    def step(
        state: TrainState,
        batch: dict[str, Any],
        index: ShardedIndex,
        passage_tables: dict[str, jax.Array],
        teacher_tables: dict[str, jax.Array],
        teacher_params: Any,
        *stale: jax.Array,
    ) -> tuple:
        grad_fn = jax.value_and_grad(art_loss, has_aux=True)
        (loss, metrics), grads = grad_fn(
            state.params,
            batch,
            index,
            passage_tables,
            teacher_tables,
            teacher_params,
            step_rng(state),
            encoder=encoder,
            cfg=cfg,
            mesh=mesh,
            teacher=teacher,
        )
        state, update_metrics = apply_gradients(state, grads, loss, optimizer)
        metrics = {**metrics, **update_metrics}
        if roll is None:
            return state, metrics
        emb, new_stale, stats = roll(
            state.params, passage_tables, index.embeddings, stale[0], state.step
        )
        index = ShardedIndex(emb, index.layout, index.mesh)  # host metadata: set by the caller
        return state, {**metrics, **{f"refresh_{k}": v for k, v in stats.items()}}, index, new_stale

    return jit_step(step, mesh, in_shardings, carry=() if roll is None else (2, 6))
