"""The train state every method steps, and the guarded optimizer update they share.

A step whose loss or gradients are not finite is skipped inside the jitted step: parameters
and optimizer state stay as they were, the step counter moves on (the data position is the
step), and two counters record it. The loop stops after too many consecutive skips and never
checkpoints a state that is not finite.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] raw key data (checkpoint-friendly)
    skipped: jax.Array  # int32: steps skipped for non-finite loss or gradients, in total
    skipped_in_a_row: jax.Array  # int32: consecutive skipped steps up to this one
    extra: Any = None  # method state that is not trained (LaPraDoR's cache queue, ...)


def init_state(
    params: Any, optimizer: optax.GradientTransformation, seed: int, extra: Any = None
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
        skipped_in_a_row=jnp.zeros((), jnp.int32),
        extra=extra,
    )


def step_rng(state: TrainState) -> jax.Array:
    """This step's key: a function of the seed and the step only (exact resume)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def apply_gradients(
    state: TrainState,
    grads: Any,
    loss: jax.Array,
    optimizer: optax.GradientTransformation,
    extra: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer update, applied only when `loss` and `grads` are finite.

    `extra`, when given, replaces `state.extra` on a finite step (kept otherwise).
    Returns the new state and metrics (grad_norm, skipped).
    """
    finite = jnp.isfinite(loss) & all_finite(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_extra = state.extra if extra is None else keep(extra, state.extra)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + skipped,
        skipped_in_a_row=jnp.where(finite, 0, state.skipped_in_a_row + 1),
        extra=new_extra,
    )
    metrics = {"grad_norm": optax.global_norm(grads), "skipped": skipped}
    return new_state, metrics


def state_shardings(state: TrainState, mesh: Mesh, strategy: str, extra: Any = None) -> TrainState:
    """Parameters and optimizer moments by the logical-axis rules; scalars replicated;
    `extra` as given (default: replicated)."""
    from jaxret.parallel.partitioning import param_shardings

    replicated = NamedSharding(mesh, PartitionSpec())
    if extra is None:
        extra = jax.tree.map(lambda _: replicated, state.extra)
    return TrainState(
        step=replicated,
        params=param_shardings(state.params, mesh, strategy),
        opt_state=param_shardings(state.opt_state, mesh, strategy),
        rng=replicated,
        skipped=replicated,
        skipped_in_a_row=replicated,
        extra=extra,
    )


def jit_step(step: Any, mesh: Mesh, in_shardings: tuple, carry: tuple[int, ...] = ()) -> Any:
    """A method's step(state, batch, …) → (state, metrics, *carried), jitted with explicit
    shardings: the state keeps its layout and is donated, the metrics come back replicated.
    `carry` names further arguments (by position) the step updates and returns after the
    metrics, in their input layout and donated (e.g. ART's index under a rolling refresh)."""
    carried = tuple(in_shardings[i] for i in carry)
    return jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=(in_shardings[0], NamedSharding(mesh, PartitionSpec()), *carried),
        donate_argnums=(0, *carry),
    )
