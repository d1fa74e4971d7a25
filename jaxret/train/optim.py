"""Optimizer: Adam or AdamW, linear warmup then linear decay, global-norm clipping.

Weight decay follows Megatron (`get_params_for_weight_decay_optimization`, used by ART):
LayerNorm parameters and biases are not decayed; kernels and embedding tables are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import optax

# Leaf names (last path element) that never get weight decay: biases and layer-norm
# parameters ("scale" is jaxret's LayerNorm / RMSNorm weight, "bias" every bias).
NO_DECAY_LEAVES = ("bias", "scale")


def _leaf_name(path: Sequence[Any]) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params: Any) -> Any:
    """A tree like `params`: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) not in NO_DECAY_LEAVES, params
    )


def schedule(
    peak_lr: float, total_steps: int, warmup_fraction: float = 0.01, warmup_steps: int = 0
) -> optax.Schedule:
    """Linear warmup (`warmup_steps`, else `warmup_fraction` of the steps), linear decay."""
    warmup = max(1, int(warmup_steps) or int(round(total_steps * warmup_fraction)))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak_lr, warmup),
            optax.linear_schedule(peak_lr, 0.0, max(1, total_steps - warmup)),
        ],
        [warmup],
    )


def make_optimizer(
    cfg: Any, total_steps: int, learning_rate: float | optax.Schedule | None = None
) -> optax.GradientTransformation:
    """cfg: name ("adam" | "adamw"), lr, warmup_fraction, weight_decay, clip_norm, b1, b2, eps.
    `learning_rate` replaces the warmup + linear-decay schedule of cfg.lr (e.g. 1.0 for a
    step that scales the update by its own schedule)."""
    lr = (
        schedule(cfg.lr, total_steps, cfg.warmup_fraction, cfg.get("warmup_steps", 0))
        if learning_rate is None
        else learning_rate
    )
    if cfg.name == "adamw":
        opt = optax.adamw(
            lr,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    elif cfg.name == "adam":
        # Coupled L2 decay (torch.optim.Adam semantics). Megatron's fused Adam, used by the
        # ART code, decouples the decay: that is "adamw", the configs' default.
        opt = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        )
    else:
        raise ValueError(f"optimizer {cfg.name!r}; expected 'adam' or 'adamw'")
    if cfg.clip_norm and cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt


def total_steps(train_cfg: Any, num_items: int) -> int:
    """`train.steps`, or `train.epochs` passes over `num_items` examples."""
    from jaxret.train.batching import steps_per_epoch

    return int(train_cfg.steps) or int(train_cfg.epochs) * steps_per_epoch(
        num_items, train_cfg.batch_size
    )


@dataclasses.dataclass
class Training:
    """What a method's runner needs to start: the step budget, the optimizer and its
    schedule, and the initial train state placed on the mesh with its shardings."""

    total: int
    optimizer: optax.GradientTransformation
    lr_at: optax.Schedule
    state: Any
    shardings: Any


def start_training(cfg: Any, params: Any, mesh: Any, num_items: int) -> Training:
    from jaxret.parallel.host_data import place
    from jaxret.train import state as train_state

    total = total_steps(cfg.train, num_items)
    optimizer = make_optimizer(cfg.optimizer, total)
    state = train_state.init_state(params, optimizer, cfg.seed)
    shardings = train_state.state_shardings(state, mesh, cfg.mesh.param_sharding)
    return Training(
        total=total,
        optimizer=optimizer,
        lr_at=schedule(
            cfg.optimizer.lr,
            total,
            cfg.optimizer.warmup_fraction,
            cfg.optimizer.get("warmup_steps", 0),
        ),
        state=place(state, shardings),
        shardings=shardings,
    )
