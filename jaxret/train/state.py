"""The train state every method steps, and the guarded optimizer update they share.

A step whose loss or gradients are not finite is skipped inside the jitted step: parameters
and optimizer state stay as they were, the step counter moves on (the data position is the
step), and two counters record it. The loop stops after too many consecutive skips and never
checkpoints a state that is not finite.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxret.errors import RunError

log = logging.getLogger(__name__)
GB = 1e9


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


def device_bytes_needed(compiled: Any) -> int:
    """Bytes one device holds while `compiled` runs (XLA's buffer assignment, per device):
    its arguments, its outputs that do not reuse a donated argument, and its temporaries."""
    m = compiled.memory_analysis()
    out = m.output_size_in_bytes - m.alias_size_in_bytes
    return int(m.argument_size_in_bytes + out + m.temp_size_in_bytes)


def device_bytes_limit() -> int | None:
    """What XLA may allocate on this process's first device (GPU, TPU), or None (CPU:
    the host's memory, no fixed limit)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


# What to change when a dual encoder's train step cannot fit a device (`compile_ahead`).
RETRIEVER_FIXES = (
    "a smaller train.batch_size, model.remat=both, mesh.param_sharding=fsdp, or more devices"
)


def compile_ahead(
    step: Any, args: tuple, what: str, fixes: str, bytes_limit: int | None = None
) -> Any:
    """The jitted `step` compiled now for `args` (arrays, or `jax.ShapeDtypeStruct`s with
    shardings for arguments not allocated yet) → the compiled program, called like `step`.

    Compiled before the large arrays exist, the compiler's host memory is never added to
    theirs (+0.4 GB for seconds at the rehearsal's start, docs/scaling.md), and a program
    that cannot fit a device is refused here, in one line naming `fixes`, before the
    corpus is encoded — XLA on GPU would fail at the first call, minutes later. The limit
    is the device's (`device_bytes_limit`) unless given."""
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    m = compiled.memory_analysis()
    if m is None:  # a backend without the analysis: nothing to check against
        log.info("%s compiled in %.1fs", what, time.perf_counter() - t0)
        return compiled
    need = device_bytes_needed(compiled)
    limit = device_bytes_limit() if bytes_limit is None else bytes_limit
    if limit is not None and need > limit:
        raise RunError(
            f"{what} needs {need / GB:.2f} GB per device (arguments "
            f"{m.argument_size_in_bytes / GB:.2f}, temporaries {m.temp_size_in_bytes / GB:.2f}, "
            f"new outputs {(m.output_size_in_bytes - m.alias_size_in_bytes) / GB:.2f}) and a "
            f"device can hold {limit / GB:.2f} GB: {fixes}"
        )
    # Shown on accelerators and in multi-process jobs (a pod start-up fact, as the devices
    # line is), logged quietly on a laptop.
    level = logging.WARNING if limit is not None or jax.process_count() > 1 else logging.INFO
    log.log(
        level,
        "%s compiled in %.1fs: %.2f GB per device (arguments %.2f, temporaries %.2f)",
        what,
        time.perf_counter() - t0,
        need / GB,
        m.argument_size_in_bytes / GB,
        m.temp_size_in_bytes / GB,
    )
    return compiled
