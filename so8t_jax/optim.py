"""The optimizer: AdamW after optional adaptive and global-norm clipping, with warmup + decay schedules
(optax), and optional reduce-on-plateau. Defaults: so8t_jax/defaults.py (the optim.* keys)."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

from so8t_jax.defaults import DEFAULTS

SCHEDULES = ("cosine", "linear", "exponential", "constant")
_D = DEFAULTS.optim


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = _D.learning_rate
    min_lr: float = _D.min_lr
    warmup_steps: int = _D.warmup_steps
    total_steps: int = DEFAULTS.train.steps
    schedule: str = _D.schedule            # cosine | linear | exponential | constant (after warmup)
    decay_rate: float = _D.decay_rate      # exponential: lr multiplier over the decay span
    b1: float = _D.b1
    b2: float = _D.b2
    eps: float = _D.eps
    weight_decay: float = _D.weight_decay
    max_grad_norm: float = _D.max_grad_norm  # 0: no global-norm clipping
    adaptive_clip: float = _D.adaptive_clip  # > 0: optax.adaptive_grad_clip(clipping) before the global clip
    plateau: bool = _D.plateau             # optax.contrib.reduce_on_plateau on the loss
    plateau_factor: float = _D.plateau_factor
    plateau_patience: int = _D.plateau_patience
    grad_accum_steps: int = _D.grad_accum_steps
    head_learning_rate: float = _D.head_learning_rate  # peak lr of the SO8T safety / verifier heads (fresh linear
                                                       # heads on a trained trunk): the trunk's warmup and decay

    def __post_init__(self):
        if self.head_learning_rate < 0:
            raise ValueError(f"optim.head_learning_rate must be >= 0, got {self.head_learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"optim.min_lr must be in [0, learning_rate], got {self.min_lr}")
        if self.warmup_steps < 0 or self.total_steps < 1 or self.grad_accum_steps < 1:
            raise ValueError("optim.warmup_steps >= 0, total_steps >= 1 and grad_accum_steps >= 1 are required")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup to learning_rate, then decay to min_lr by total_steps; never below min_lr, never rising."""
    peak, floor = cfg.learning_rate, cfg.min_lr
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, span, alpha=floor / peak if peak else 0.0)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, span)
    elif cfg.schedule == "exponential":
        decay = optax.exponential_decay(peak, span, cfg.decay_rate, end_value=floor)
    else:
        decay = optax.constant_schedule(peak)
    warmup = optax.linear_schedule(peak / max(cfg.warmup_steps, 1), peak, max(cfg.warmup_steps - 1, 0))
    sched = optax.join_schedules([warmup, decay], [cfg.warmup_steps]) if cfg.warmup_steps else decay
    return lambda step: jnp.maximum(sched(step), floor)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
    parts = []
    if cfg.adaptive_clip > 0:
        parts.append(optax.adaptive_grad_clip(cfg.adaptive_clip))
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(make_schedule(cfg), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay))
    if cfg.plateau:
        parts.append(optax.contrib.reduce_on_plateau(cfg.plateau_factor, cfg.plateau_patience))
    return optax.chain(*parts)
