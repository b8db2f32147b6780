"""The compiled training step: step(state, teacher_params, batch, rng) -> (state, metrics), a pure function.

Only the student (and its hidden-state projection) is differentiated; the teacher runs under stop_gradient.
The pieces it puts together: completions.py (where completions come from), objective.py (the loss terms and
their global denominators), optim.py (the optax chain); placement.py runs it on one device, pmap or a mesh.
With gradient accumulation every batch leaf carries a leading micro-batch axis [A, B, L].
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from so8t_jax import so8t
from so8t_jax.completions import PolicyConfig, mix_completions
from so8t_jax.config import ModelConfig
from so8t_jax.objective import LossConfig, batch_counts, loss_terms
from so8t_jax.optim import OptimConfig, freeze_tree, make_optimizer, make_schedule


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict        # {"student": decoder params, "proj": [Ds, Dt] when hidden matching is on}
    opt_state: Any
    lr_scale: jax.Array  # multiplies every update; the stability monitor's back-off lowers it


def init_state(student_params, optimizer, key=None, teacher_width: int | None = None,
               loss_cfg: LossConfig | None = None) -> TrainState:
    params = {"student": student_params}
    if loss_cfg is not None and loss_cfg.hidden_weight > 0:
        d_s = student_params["embed"].shape[1]
        key = jax.random.key(0) if key is None else key
        # identity-like start when widths match (a student cut from its teacher already agrees)
        params["proj"] = jnp.eye(d_s, teacher_width, dtype=jnp.float32) if teacher_width == d_s else \
            jax.random.normal(key, (d_s, teacher_width), jnp.float32) / jnp.sqrt(d_s)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.ones((), jnp.float32))


def gate_metrics(student_params, alpha) -> dict[str, jax.Array]:
    """The gate's alpha, sigmoid(alpha) (how much of the rotation acts) and the mean rotation angle."""
    layers = student_params["layers"]
    angles = [so8t.mean_rotation_angle(layers[k]) for k in ("attn_gate", "mlp_gate") if k in layers]
    return {"so8t/alpha": alpha, "so8t/gate": jax.nn.sigmoid(alpha),
            "so8t/rotation_angle": sum(angles) / len(angles)}


def _with_alpha(params, alpha):
    return dict(params, student=dict(params["student"], so8t_alpha=alpha))


def make_step(s_cfg: ModelConfig, t_cfg: ModelConfig, loss_cfg: LossConfig, optim_cfg: OptimConfig,
              axis_name: str | None = None, policy: PolicyConfig | None = None,
              gate_cfg: so8t.GateConfig | None = None):
    """(step, optimizer): the per-device step body. With axis_name (pmap), counts and gradients are summed
    across devices. With a generating policy the batch must also carry prompt_ids / prompt_mask (see
    data.Batcher). With gate_cfg.gates the student carries SO(8) gates: each step sets
    params["student"]["so8t_alpha"] to gate_cfg.alpha(step, total_steps) before the forward pass and keeps
    that value after the update."""
    gated = gate_cfg is not None and gate_cfg.gates
    optimizer = make_optimizer(optim_cfg)
    gradients = _make_gradients(s_cfg, t_cfg, loss_cfg, optim_cfg.grad_accum_steps, optim_cfg.freeze)
    update = _make_update(optimizer, make_schedule(optim_cfg), optim_cfg)

    def reduce(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    def step(state: TrainState, teacher_params, batch, rng):
        alpha = None
        if gated:
            alpha = gate_cfg.alpha(state.step, optim_cfg.total_steps)
            state = state.replace(params=_with_alpha(state.params, alpha))
        source = jnp.zeros((), jnp.int32)
        if policy is not None and policy.generates:
            batch, source = mix_completions(batch, rng, state.params["student"], teacher_params, s_cfg, t_cfg,
                                            policy, axis_name, policy.lmbda_at(state.step, optim_cfg.total_steps))
        counts = reduce(batch_counts(batch, loss_cfg))
        grads, terms = gradients(state.params, teacher_params, batch, counts)
        # Each device's loss is its share of the global mean, so the global gradient is the SUM over devices.
        grads, terms = reduce(grads), reduce(terms)
        new_state, metrics = update(state, grads, terms, alpha)
        if gated:
            metrics.update(gate_metrics(new_state.params["student"], alpha))
        # the tokens this step ran through the models: the completions it trained on (generated ones
        # included, to their stopping point), not the dataset's
        if policy is not None:
            metrics["lmbda"] = policy.lmbda_at(state.step, optim_cfg.total_steps)
        metrics.update(num_targets=counts["targets"], source=source.astype(jnp.float32),
                       tokens=reduce(jnp.sum(batch["attention_mask"], dtype=jnp.float32)),
                       on_policy=(source == 1).astype(jnp.float32))
        return new_state, metrics

    return step, optimizer


def _make_gradients(s_cfg, t_cfg, loss_cfg: LossConfig, accum: int, freeze: tuple = ()):
    """(params, teacher_params, batch, counts) -> (grads, terms); with accum > 1 the micro-batches on the
    leading axis are scanned and summed (each term is already divided by the global count). Frozen
    parameters (optim.freeze) get zero gradients, never computed."""
    def grads_of(trainable, teacher_params, batch, counts):
        def f(p):
            terms = loss_terms(freeze_tree(p, freeze), teacher_params, batch, counts, s_cfg, t_cfg, loss_cfg)
            return terms["loss"], terms
        (_, terms), grads = jax.value_and_grad(f, has_aux=True)(trainable)
        return grads, terms

    if accum == 1:
        return grads_of

    def accumulated(params, teacher_params, batch, counts):
        def body(carry, micro):
            g, t = grads_of(params, teacher_params, micro, counts)
            return jax.tree_util.tree_map(jnp.add, carry, (g, t)), None
        zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
            grads_of, params, teacher_params, jax.tree_util.tree_map(lambda x: x[0], batch), counts))
        return jax.lax.scan(body, zeros, batch)[0]
    return accumulated


def _make_update(optimizer, schedule, optim_cfg: OptimConfig):
    """(state, grads, terms, alpha) -> (state, metrics): the optax update (heads at their own lr: optim.py) scaled
    by lr_scale, applied; a scheduled gate alpha (not None) is put back after it, since it is not learned and weight
    decay must not pull on it. metrics: every loss term, gradient / parameter / update norms, clipping, lr."""
    def update(state: TrainState, grads, terms, alpha=None):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, value=terms["loss"])
        updates = jax.tree_util.tree_map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        if alpha is not None:
            params = _with_alpha(params, alpha)
        grad_norm = optax.tree_utils.tree_norm(grads)
        # A non-finite loss or gradient never reaches the weights or the Adam moments: the step keeps the old
        # ones (the host's monitor still sees the NaN one step later and rolls back, as the loop decides).
        finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                                   (params, opt_state), (state.params, state.opt_state))
        step_lr = schedule(state.step) * state.lr_scale
        if optim_cfg.plateau:
            step_lr = step_lr * optax.tree_utils.tree_get(opt_state, "scale")
        metrics = {**{f"loss/{k}" if k != "loss" else "loss": v for k, v in terms.items()},
                   "grad_norm": grad_norm, "param_norm": optax.tree_utils.tree_norm(params),
                   "update_norm": optax.tree_utils.tree_norm(updates),
                   "clipped": (grad_norm > optim_cfg.max_grad_norm).astype(jnp.float32)
                   if optim_cfg.max_grad_norm > 0 else jnp.zeros(()),
                   "lr": step_lr, "skipped": 1.0 - finite.astype(jnp.float32)}
        return TrainState(state.step + 1, params, opt_state, state.lr_scale), metrics
    return update
