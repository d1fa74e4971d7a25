"""LaPraDoR's Iterative Contrastive Learning (Xu et al., §3.2–3.3) as one jitted step.

The query tower E_Q and the document tower E_D take turns: for `switch_every` steps E_Q
trains while E_D is frozen, then the other way round. With A the training tower on its
inputs x_A (queries or ICT documents) and B the frozen tower on the paired inputs x_B:

    a    = A(x_A), dropout on                         [B, d]   gradient
    a⁺   = A(x_A), another dropout mask               [B, d]   no gradient (DaPI)
    b    = B(x_B), frozen                             [B, d]   no gradient
    L_AA = −log softmax(20·cos(a_i, a⁺_*))_i          the global batch's a⁺ as candidates
    L_AB = −log softmax(20·cos(a_i, [b_*, queue]))_i  the batch's b and the cached b's
    loss = L_AB + λ·L_AA                               L_q (A = E_Q) or L_d (A = E_D), eq. (2)–(7)

The cache queue holds frozen-side vectors (b) of earlier steps: a FIFO ring buffer [m, d]
with a valid mask and a write pointer, split by rows over every device, cleared when the
towers switch (its vectors came from the tower that is about to train). Each step appends
its b after computing the loss. Only the training tower's parameters and optimizer state
change; the frozen tower's stay bit-identical. With `shared`, the towers are one set of
weights: at each switch the tower that just trained is copied into the other (and its
optimizer state with it), as the paper shares its encoders.

The paper's Table 2 baselines are variants of the same step (`IcolConfig.method`): In-Batch
(`joint_loss`: both towers at every step, no queue) and MoCo (the query tower at every step,
the document tower its momentum copy, the queue never cleared).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxret.losses import info_nce_with_cache
from jaxret.models.dual_encoder import DualEncoder
from jaxret.train.state import TrainState, all_finite, jit_step, step_rng

TOWERS = ("query", "passage")


@dataclasses.dataclass(frozen=True)
class IcolConfig:
    switch_every: int = 100
    scale: float = 20.0  # multiplies the cosine similarity
    lam: float = 1.0  # weight of the DaPI term L_AA
    queue_size: int = 100_000
    ict: bool = True  # the cross terms L_qd / L_dq (ICT pairs); off = DaPI only
    dapi: bool = True  # the L_qq / L_dd terms; off = λ 0
    use_queue: bool = True  # off = in-batch negatives only
    shared: bool = False
    # The paper's Table 2 baselines as variants of this step: "in_batch" (no queue, no
    # alternation: both towers train at every step on in-batch negatives, L_qd + L_dq +
    # λ(L_qq + L_dd)); "moco" (He et al. 2020: the query tower trains at every step, the
    # document tower is its momentum copy, θ_D ← m·θ_D + (1 − m)·θ_Q, and the queue of its
    # vectors is never cleared).
    method: str = "icol"
    momentum: float = 0.999  # MoCo's m (He et al. 2020, §3.2)

    def __post_init__(self) -> None:
        if self.method not in ("icol", "in_batch", "moco"):
            raise ValueError(f"icol.method={self.method!r}; expected icol, in_batch or moco")
        if self.method == "moco" and (self.shared or not self.ict or not self.use_queue):
            raise ValueError(
                "icol.method=moco needs two towers (icol.shared=false: the key tower is the "
                "query tower's momentum copy), the cross term (icol.ict) and the queue"
            )


def rows_spec(mesh: Mesh) -> PartitionSpec:
    return PartitionSpec(tuple(mesh.axis_names))


def queue_size(cfg: IcolConfig, mesh: Mesh) -> int:
    """Capacity rounded up so that every device holds the same number of rows."""
    return -(-max(1, cfg.queue_size) // mesh.size) * mesh.size


def init_queue(cfg: IcolConfig, dim: int, mesh: Mesh) -> dict[str, jax.Array]:
    m = queue_size(cfg, mesh)
    rows = NamedSharding(mesh, rows_spec(mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    make = jax.jit(
        lambda: {
            "vectors": jnp.zeros((m, dim), jnp.float32),
            "valid": jnp.zeros((m,), bool),
            "pointer": jnp.zeros((), jnp.int32),
        },
        out_shardings={"vectors": rows, "valid": rows, "pointer": replicated},
    )
    return make()


def queue_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    rows = NamedSharding(mesh, rows_spec(mesh))
    return {"vectors": rows, "valid": rows, "pointer": NamedSharding(mesh, PartitionSpec())}


def clear(queue: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {
        **queue,
        "valid": jnp.zeros_like(queue["valid"]),
        "pointer": jnp.zeros_like(queue["pointer"]),
    }


def enqueue(queue: dict[str, jax.Array], vectors: jax.Array) -> dict[str, jax.Array]:
    """Appends [n, d] vectors FIFO: the oldest entries are overwritten once the ring is full."""
    m = queue["vectors"].shape[0]
    n = vectors.shape[0]
    at = (queue["pointer"] + jnp.arange(n)) % m
    return {
        "vectors": queue["vectors"].at[at].set(vectors.astype(queue["vectors"].dtype)),
        "valid": queue["valid"].at[at].set(True),
        "pointer": (queue["pointer"] + n) % m,
    }


def phase(step: jax.Array, cfg: IcolConfig) -> jax.Array:
    """0 while E_Q trains, 1 while E_D trains (MoCo: always E_Q)."""
    if cfg.method == "moco":
        return jnp.zeros_like(step)
    return (step // cfg.switch_every) % 2


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def icol_loss(
    trained: Any,
    frozen: Any,
    x_trained: dict[str, jax.Array],
    x_frozen: dict[str, jax.Array],
    queue: dict[str, jax.Array],
    rng: jax.Array,
    *,
    encoder: DualEncoder,
    trained_tower: str,
    frozen_tower: str,
    cfg: IcolConfig,
    mesh: Mesh,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array]]:
    """L_AB + λ·L_AA for the training tower A (module docstring); returns (loss, (metrics,
    the frozen-side vectors b to enqueue))."""
    r1, r2 = jax.random.split(rng)
    one = lambda p, t: {"shared": p} if encoder.spec.shared else {t: p}
    a = _unit(encoder.embed(one(trained, trained_tower), trained_tower, x_trained, dropout_rng=r1))
    replicated = NamedSharding(mesh, PartitionSpec())
    gather = lambda x: jax.lax.with_sharding_constraint(x, replicated)
    positive = jnp.arange(a.shape[0])
    metrics: dict[str, jax.Array] = {}
    loss = jnp.float32(0.0)
    b = jax.lax.stop_gradient(
        _unit(encoder.embed(one(frozen, frozen_tower), frozen_tower, x_frozen))
    )
    if cfg.dapi:
        a_plus = jax.lax.stop_gradient(
            _unit(
                encoder.embed(one(trained, trained_tower), trained_tower, x_trained, dropout_rng=r2)
            )
        )
        scores = cfg.scale * jnp.einsum(
            "bd,md->bm", a, gather(a_plus), preferred_element_type=jnp.float32
        )
        l_aa = info_nce_with_cache(scores, positive)
        metrics["loss_same"] = l_aa
        loss = loss + cfg.lam * l_aa
    if cfg.ict:
        scores = cfg.scale * jnp.einsum(
            "bd,md->bm", a, gather(b), preferred_element_type=jnp.float32
        )
        cache = cache_valid = None
        if cfg.use_queue:
            spread = NamedSharding(mesh, PartitionSpec(None, rows_spec(mesh)[0]))
            cache = jax.lax.with_sharding_constraint(
                cfg.scale
                * jnp.einsum(
                    "bd,md->bm", gather(a), queue["vectors"], preferred_element_type=jnp.float32
                ),
                spread,
            )  # [B, m]: each device scores its own rows of the queue
            cache_valid = queue["valid"]
        l_ab = info_nce_with_cache(scores, positive, cache, cache_valid)
        metrics["loss_cross"] = l_ab
        metrics["accuracy_cross"] = jnp.mean(jnp.argmax(scores, -1) == positive)
        loss = loss + l_ab
    metrics["loss"] = loss
    metrics["negatives"] = jnp.float32(a.shape[0] - 1) + (
        queue["valid"].sum().astype(jnp.float32) if (cfg.ict and cfg.use_queue) else 0.0
    )
    return loss, (metrics, b)


def joint_loss(
    towers: dict[str, Any],
    x: dict[str, dict[str, jax.Array]],
    rng: jax.Array,
    *,
    encoder: DualEncoder,
    cfg: IcolConfig,
    mesh: Mesh,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The In-Batch baseline: both towers trained together on the global batch's in-batch
    negatives, L_qd + L_dq + λ·(L_qq + L_dd) (each term as in `icol_loss`, without a queue).
    `towers` = {"query", "passage"} parameters (the same tree twice when shared)."""
    rngs = jax.random.split(rng, 4)
    one = lambda t: {"shared": towers[t]} if encoder.spec.shared else {t: towers[t]}
    embed = lambda t, r: _unit(encoder.embed(one(t), t, x[t], dropout_rng=r))
    q, d = embed("query", rngs[0]), embed("passage", rngs[1])
    replicated = NamedSharding(mesh, PartitionSpec())
    gather = lambda v: jax.lax.with_sharding_constraint(v, replicated)
    positive = jnp.arange(q.shape[0])
    ce = lambda a, b: info_nce_with_cache(
        cfg.scale * jnp.einsum("bd,md->bm", a, gather(b), preferred_element_type=jnp.float32),
        positive,
    )
    metrics: dict[str, jax.Array] = {}
    loss = jnp.float32(0.0)
    if cfg.ict:
        metrics["loss_cross"] = ce(q, d) + ce(d, q)
        loss = loss + metrics["loss_cross"]
    if cfg.dapi:
        q_plus = jax.lax.stop_gradient(embed("query", rngs[2]))
        d_plus = jax.lax.stop_gradient(embed("passage", rngs[3]))
        metrics["loss_same"] = ce(q, q_plus) + ce(d, d_plus)
        loss = loss + cfg.lam * metrics["loss_same"]
    metrics["loss"] = loss
    metrics["negatives"] = jnp.float32(q.shape[0] - 1)
    return loss, metrics


def make_train_step(
    encoder: DualEncoder,
    optimizer: optax.GradientTransformation,  # one tower's update direction (lr 1)
    lr_at: optax.Schedule,  # the learning rate of the global step
    cfg: IcolConfig,
    mesh: Mesh,
    in_shardings: tuple,
) -> Any:
    """step(state, batch) → (state, metrics). state.params = {"query", "passage"}; state.
    opt_state = {"query", "passage"} (one optimizer state per tower); state.extra = queue.
    batch = {"query": tokens [B, Lq], "document": tokens [B, Ld]} (ICT pairs)."""

    def train_tower(state: TrainState, batch: dict[str, Any], queue: Any, active: int):
        trained_t, frozen_t = TOWERS[active], TOWERS[1 - active]
        x = {"query": batch["query"], "passage": batch["document"]}
        grad_fn = jax.value_and_grad(icol_loss, has_aux=True)
        (loss, (metrics, frozen_vectors)), grads = grad_fn(
            state.params[trained_t],
            state.params[frozen_t],
            x[trained_t],
            x[frozen_t],
            queue,
            step_rng(state),
            encoder=encoder,
            trained_tower=trained_t,
            frozen_tower=frozen_t,
            cfg=cfg,
            mesh=mesh,
        )
        updates, opt = optimizer.update(grads, state.opt_state[trained_t], state.params[trained_t])
        lr = lr_at(state.step)
        updates = jax.tree.map(lambda u: lr * u, updates)
        params = optax.apply_updates(state.params[trained_t], updates)
        finite = jnp.isfinite(loss) & all_finite(grads)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": lr}
        return params, opt, finite, metrics, frozen_vectors

    def joint_step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict]:
        """In-Batch: both towers (or the one shared tree) updated from joint_loss."""
        x = {"query": batch["query"], "passage": batch["document"]}
        trained = TOWERS[:1] if cfg.shared else TOWERS
        towers = lambda p: {t: p[TOWERS[0] if cfg.shared else t] for t in TOWERS}
        grad_fn = jax.value_and_grad(
            lambda p: joint_loss(
                towers(p), x, step_rng(state), encoder=encoder, cfg=cfg, mesh=mesh
            ),
            has_aux=True,
        )
        (loss, metrics), grads = grad_fn({t: state.params[t] for t in trained})
        finite = jnp.isfinite(loss) & all_finite(grads)
        lr = lr_at(state.step)
        params, opt_state = dict(state.params), dict(state.opt_state)
        for t in trained:
            updates, opt = optimizer.update(grads[t], state.opt_state[t], state.params[t])
            new = optax.apply_updates(state.params[t], jax.tree.map(lambda u: lr * u, updates))
            keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(finite, a, b), n, o)
            params[t], opt_state[t] = keep(new, state.params[t]), keep(opt, state.opt_state[t])
        if cfg.shared:  # one tree: the document tower is the query tower
            params[TOWERS[1]], opt_state[TOWERS[1]] = params[TOWERS[0]], opt_state[TOWERS[0]]
        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped=state.skipped + skipped,
            skipped_in_a_row=jnp.where(finite, 0, state.skipped_in_a_row + 1),
        )
        metrics = {
            **metrics,
            "grad_norm": optax.global_norm(grads),
            "lr": lr,
            "skipped": skipped,
            "phase": jnp.float32(0.0),
        }
        return new_state, metrics

    def step(state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        if cfg.method == "in_batch":
            return joint_step(state, batch)
        p = phase(state.step, cfg)
        # (MoCo never switches: its queue holds the momentum tower's vectors throughout)
        switching = (state.step % cfg.switch_every == 0) & (state.step > 0) & (cfg.method == "icol")
        queue = jax.tree.map(
            lambda new, old: jnp.where(switching, new, old), clear(state.extra), state.extra
        )
        params, opt_state = state.params, state.opt_state
        if cfg.shared:  # the tower about to train starts from the one that just trained
            copy = lambda tree, dst: jax.tree.map(
                lambda s, d: jnp.where(switching & (p == dst), s, d),
                tree[TOWERS[1 - dst]],
                tree[TOWERS[dst]],
            )
            params = {TOWERS[i]: copy(params, i) for i in range(2)}
            opt_state = {TOWERS[i]: copy(opt_state, i) for i in range(2)}
        state = state.replace(params=params, opt_state=opt_state)

        def branch(active: int):
            return lambda: train_tower(state, batch, queue, active)

        new_p, new_opt, finite, metrics, vectors = jax.lax.cond(p == 0, branch(0), branch(1))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        def place(tree: dict, new: Any) -> dict:
            # The trained tower takes `new` (when finite); the frozen one is left as it was.
            return {
                t: jax.tree.map(
                    lambda n, o, t=t: jnp.where(p == TOWERS.index(t), n, o),
                    keep(new, tree[t]),
                    tree[t],
                )
                for t in TOWERS
            }

        if cfg.use_queue and cfg.ict:
            replicated = NamedSharding(mesh, PartitionSpec())
            queue = keep(
                enqueue(queue, jax.lax.with_sharding_constraint(vectors, replicated)), queue
            )
        params = place(state.params, new_p)
        if cfg.method == "moco":  # the key tower follows the query tower by momentum
            m = cfg.momentum
            momentum = jax.tree.map(
                lambda k, q: (m * k + (1 - m) * q).astype(k.dtype),
                params[TOWERS[1]],
                params[TOWERS[0]],
            )
            params = {**params, TOWERS[1]: keep(momentum, params[TOWERS[1]])}
        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=place(state.opt_state, new_opt),
            skipped=state.skipped + skipped,
            skipped_in_a_row=jnp.where(finite, 0, state.skipped_in_a_row + 1),
            extra=queue,
        )
        metrics = {**metrics, "skipped": skipped, "phase": p.astype(jnp.float32)}
        return new_state, metrics

    return jit_step(step, mesh, in_shardings)


def init_state(
    params: dict, optimizer: optax.GradientTransformation, seed: int, queue: Any
) -> TrainState:
    """Both towers' parameters, one optimizer state per tower, the queue as `extra`."""
    from jaxret.train.state import init_state as base_init

    state = base_init(params, optimizer, seed, queue)
    return state.replace(opt_state={t: optimizer.init(params[t]) for t in TOWERS})
