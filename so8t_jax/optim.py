"""The optimizer: AdamW after optional adaptive and global-norm clipping, with warmup + decay schedules
(optax), and optional reduce-on-plateau. Defaults: so8t_jax/defaults.py (the optim.* keys).

Two parameter groups through optax.multi_transform: the trunk (the decoder, the hidden projection) at
learning_rate and the SO8T heads at head_learning_rate, each with the same warmup / decay shape. Weight decay
(an optax mask) pulls only on matrices: never on norms, biases, the SO(8) gates, the scheduled alpha or the
heads. optim.freeze names student parameters kept as copied (e.g. ("embed", "lm_head")): a third group whose
update is zero (optax.set_to_zero: no Adam moments) and whose gradient the step never computes (freeze_tree)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from so8t_jax.defaults import DEFAULTS
from so8t_jax.so8t import HEADS

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
    freeze: tuple = tuple(_D.freeze)  # student parameters not trained (FREEZABLE names)

    def __post_init__(self):
        object.__setattr__(self, "freeze", tuple(self.freeze))  # from a config list
        unknown = [n for n in self.freeze if n not in FREEZABLE]
        if unknown:
            raise ValueError(f"optim.freeze: unknown parameter(s) {unknown}; choose from {FREEZABLE}")
        if self.head_learning_rate < 0:
            raise ValueError(f"optim.head_learning_rate must be >= 0, got {self.head_learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"optim.min_lr must be in [0, learning_rate], got {self.min_lr}")
        if self.warmup_steps < 0 or self.total_steps < 1 or self.grad_accum_steps < 1:
            raise ValueError("optim.warmup_steps >= 0, total_steps >= 1 and grad_accum_steps >= 1 are required")


def make_schedule(cfg: OptimConfig, peak: float | None = None) -> optax.Schedule:
    """Linear warmup to learning_rate, then decay to min_lr by total_steps; never below min_lr, never rising.
    peak: another peak (the heads') with the same shape: min_lr scales with it."""
    floor = cfg.min_lr
    if peak is not None:
        floor = floor * peak / cfg.learning_rate if cfg.learning_rate else 0.0
    peak = cfg.learning_rate if peak is None else peak
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


_NO_DECAY = ("attn_gate", "mlp_gate", "so8t_alpha")
FREEZABLE = ("embed", "lm_head")  # lm_head exists only in untied models (a tied one's is embed)


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def group_labels(params, freeze: tuple = ()) -> dict:
    """"heads" for the SO8T heads (params["student"]["safety_head" | "verifier"]), "frozen" for the student
    parameters named in freeze, "trunk" for the rest."""
    def label(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        if len(names) > 1 and names[0] == "student":
            if names[1] in HEADS:
                return "heads"
            if names[1] in freeze:
                return "frozen"
        return "trunk"
    return jax.tree_util.tree_map_with_path(label, params)


def freeze_tree(params, freeze: tuple):
    """params with the frozen student parameters under stop_gradient: their gradients are zeros XLA never
    computes (a tied embedding's [D, V] weight gradient is a third of the student's vocabulary projection)."""
    if not freeze:
        return params
    missing = [n for n in freeze if n not in params.get("student", {})]
    if missing:
        raise ValueError(f"optim.freeze: the student has no {missing} (a model with tied embeddings has no "
                         f"lm_head: its output layer is embed)")
    return jax.tree_util.tree_map(lambda x, g: jax.lax.stop_gradient(x) if g == "frozen" else x, params,
                                  group_labels(params, freeze))


def decay_mask(params) -> dict:
    """True where weight decay applies: matrices only; not norms, biases, gates, alpha or heads."""
    heads = group_labels(params)

    def decays(path, _, group):
        name = _leaf_name(path)
        return group == "trunk" and not (name.endswith(("norm", "bias")) or name in _NO_DECAY)
    return jax.tree_util.tree_map_with_path(decays, params, heads)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
    parts = []
    if cfg.adaptive_clip > 0:
        parts.append(optax.adaptive_grad_clip(cfg.adaptive_clip))
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))

    def adamw(schedule):
        return optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    parts.append(optax.multi_transform({"trunk": adamw(make_schedule(cfg)),
                                        "heads": adamw(make_schedule(cfg, cfg.head_learning_rate)),
                                        "frozen": optax.set_to_zero()},
                                       functools.partial(group_labels, freeze=cfg.freeze)))
    if cfg.plateau:
        parts.append(optax.contrib.reduce_on_plateau(cfg.plateau_factor, cfg.plateau_patience))
    return optax.chain(*parts)
