"""Optimizer: Adam or AdamW, linear warmup then linear decay, global-norm clipping."""

from __future__ import annotations

from typing import Any

import optax


def schedule(peak_lr: float, total_steps: int, warmup_fraction: float = 0.01) -> optax.Schedule:
    warmup = max(1, int(round(total_steps * warmup_fraction)))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak_lr, warmup),
            optax.linear_schedule(peak_lr, 0.0, max(1, total_steps - warmup)),
        ],
        [warmup],
    )


def make_optimizer(cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """cfg: name ("adam" | "adamw"), lr, warmup_fraction, weight_decay, clip_norm, b1, b2, eps."""
    lr = schedule(cfg.lr, total_steps, cfg.warmup_fraction)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        # Coupled L2 decay (torch.optim.Adam semantics). Megatron's fused Adam, used by the
        # ART code, decouples the decay: that is "adamw", the configs' default.
        opt = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay),
            optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        )
    else:
        raise ValueError(f"optimizer {cfg.name!r}; expected 'adam' or 'adamw'")
    if cfg.clip_norm and cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt
