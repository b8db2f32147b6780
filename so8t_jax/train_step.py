"""The pure distillation step and its single-device, pmap and mesh wrappers; the optax chain.

step(state, teacher_params, batch, rng) -> (state, metrics). Only the student (and its hidden-state
projection) is differentiated; the teacher runs under stop_gradient.

Batch (TRL's convention): input_ids [B, L], attention_mask [B, L], labels [B, L] with -100 on the prompt,
padding and everything after the first EOS. Position t predicts token t+1, so every token-level loss is
masked by labels[:, 1:] != -100 and divided by the GLOBAL count of such targets (over all devices and
accumulation micro-batches), which makes 1 device, pmap, mesh and accumulation give the same update.
With gradient accumulation every batch leaf carries a leading micro-batch axis [A, B, L].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from so8t_jax import losses, sampling, so8t
from so8t_jax import model as model_lib
from so8t_jax.config import ModelConfig

IGNORE = losses.IGNORE_INDEX
SCHEDULES = ("cosine", "linear", "exponential", "constant")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the objectives (DESIGN.md section 3); a weight of 0 costs no compute.

    Seed names: kd_weight is the SO8T seed's alpha, ce_weight its beta (NOT the JSD beta), hidden_weight its
    gamma; jsd_beta is the GKD seed's beta (0 forward KL ... 1 reverse KL, TRL's convention).
    """
    divergence: str = "jsd"        # forward_kl | reverse_kl | jsd
    jsd_beta: float = 0.5
    temperature: float = 1.0       # loss temperature tau (forward/reverse KL carry tau^2; JSD, like TRL, not)
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    so8t_weight: float = 0.0       # relational Gram loss (lambda_so8t)
    pet_weight: float = 0.0
    safety_weight: float = 0.0     # lambda_safety: the safety head on the last prompt token (needs the heads)
    verification_weight: float = 0.0  # lambda_verification: the per-token verifier head (needs the heads)
    safety_class_weights: tuple[float, float, float] = (1.0, 3.0, 5.0)  # allow, escalate, deny
    chunk_size: int = 0            # > 0: chunked losses from hidden states, never [B, L, V] logits
    layer_map: tuple[tuple[int, int], ...] | None = None  # student -> teacher layer pairs for hidden terms

    def __post_init__(self):
        if self.divergence not in losses.DIVERGENCE_KINDS:
            raise ValueError(f"loss.divergence must be one of {losses.DIVERGENCE_KINDS}, got {self.divergence!r}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"loss.jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be positive, got {self.temperature}")
        for name in ("kd_weight", "ce_weight", "hidden_weight", "so8t_weight", "pet_weight", "safety_weight",
                     "verification_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if len(self.safety_class_weights) != 3 or min(self.safety_class_weights) <= 0:
            raise ValueError(f"loss.safety_class_weights must be 3 positive numbers, got {self.safety_class_weights}")

    @property
    def needs_heads(self) -> bool:
        return needs_heads(self)


def needs_heads(loss) -> bool:
    """Whether the safety / verification terms are on (a LossConfig or a run config's `loss` block)."""
    return loss.safety_weight > 0 or loss.verification_weight > 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: str = "cosine"       # cosine | linear | exponential | constant (after warmup)
    decay_rate: float = 0.1        # exponential: lr multiplier over the decay span
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0     # 0: no global-norm clipping
    adaptive_clip: float = 0.0     # > 0: optax.adaptive_grad_clip(clipping) before the global clip
    plateau: bool = False          # optax.contrib.reduce_on_plateau on the loss
    plateau_factor: float = 0.5
    plateau_patience: int = 10
    grad_accum_steps: int = 1
    head_learning_rate: float = 1e-2  # peak lr of the SO8T safety / verifier heads (fresh linear heads on a trained
                                      # trunk): the trunk's warmup and decay, scaled to this peak

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


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Where each step's completions come from (GKD). One uniform draw per step from the step's rng, the same
    on every device and host: < lmbda -> the student samples them; else with seq_kd the teacher generates
    them; else the dataset's own completions. Sampled completions end at the first EOS (labels -100 after)."""
    lmbda: float = 0.0
    seq_kd: bool = False
    temperature: float = 0.9
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"policy.lmbda must be in [0, 1], got {self.lmbda}")
        if self.max_new_tokens < 1:
            raise ValueError(f"policy.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        sampling.Sampler(self.temperature, self.top_k, self.top_p)  # validates the sampling values

    @property
    def generates(self) -> bool:
        return self.lmbda > 0 or self.seq_kd


SOURCES = ("dataset", "student", "teacher")


def choose_source(rng, policy: PolicyConfig) -> jax.Array:
    """0 dataset, 1 student (on-policy), 2 teacher (seq_kd): the step's single seeded draw."""
    on_policy = jax.random.uniform(jax.random.fold_in(rng, 0)) < policy.lmbda
    return jnp.where(on_policy, 1, 2 if policy.seq_kd else 0).astype(jnp.int32)


def completions_view(batch, source, student_params, teacher_params, s_cfg, t_cfg, policy: PolicyConfig, key):
    """The training view (input_ids, attention_mask, labels) of the chosen source, for prompts in
    batch["prompt_ids"/"prompt_mask"] (left-padded [B, P]); dataset rows are batch's own view ([B, P+N])."""
    sampler = sampling.Sampler(policy.temperature, policy.top_k, policy.top_p)

    def generated(params, cfg):
        out = sampling.sample(jax.lax.stop_gradient(params), cfg, batch["prompt_ids"], batch["prompt_mask"], key,
                              max_new_tokens=policy.max_new_tokens, sampler=sampler, eos_ids=policy.eos_ids,
                              pad_id=policy.pad_id)
        labels = jnp.where(out.completion_mask_BxL > 0, out.sequence_BxL, IGNORE)
        return {"input_ids": out.sequence_BxL, "attention_mask": out.sequence_mask_BxL, "labels": labels}

    def dataset():
        return {k: batch[k].astype(jnp.int32) for k in ("input_ids", "attention_mask", "labels")}

    branches = [dataset, lambda: generated(student_params, s_cfg)]
    if policy.seq_kd:
        branches.append(lambda: generated(teacher_params, t_cfg))
    return jax.lax.switch(jnp.minimum(source, len(branches) - 1), branches)


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


def count_targets(labels, safety_labels=None, safety_class_weights=(1.0, 3.0, 5.0)) -> dict[str, jax.Array]:
    """Denominators of the token-, triple- and sequence-level means over the whole (local) batch: valid
    next-token targets (labels[..., 1:] != -100), valid consecutive triples (PET), sequences with a target
    (relational loss), and with safety_labels the summed class weights of the labelled rows (safety loss).
    Works with an accumulation axis; pmap sums them over devices."""
    valid = labels[..., 1:] != IGNORE
    triples = valid[..., 2:] & valid[..., 1:-1] & valid[..., :-2]
    counts = {"targets": jnp.sum(valid).astype(jnp.float32), "triples": jnp.sum(triples).astype(jnp.float32),
              "sequences": jnp.sum(jnp.any(valid, axis=-1)).astype(jnp.float32)}
    if safety_labels is not None:
        counts["safety"] = losses.safety_weight_sum(safety_labels, safety_class_weights)
    return counts


def batch_counts(batch, lc: "LossConfig") -> dict[str, jax.Array]:
    """count_targets of a batch dict, with the safety weights when the safety term is on."""
    if lc.safety_weight > 0 and "safety_label" not in batch:
        raise KeyError("loss.safety_weight > 0 needs batch['safety_label'] ([B] ints, -1 unlabelled)")
    return count_targets(batch["labels"], batch["safety_label"] if lc.safety_weight > 0 else None,
                         lc.safety_class_weights)


def loss_terms(trainable, teacher_params, batch, counts, s_cfg: ModelConfig, t_cfg: ModelConfig,
               lc: LossConfig) -> dict[str, jax.Array]:
    """Every objective with a non-zero weight (unweighted) and their weighted 'loss' total.

    counts: global denominators from `count_targets`, so the terms add up exactly across devices and
    micro-batches."""
    num_valid = counts["targets"]
    tokens, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target_mask = labels[:, 1:] != IGNORE
    need_hidden = lc.hidden_weight > 0 or lc.so8t_weight > 0
    verify = lc.verification_weight > 0
    need_logits = lc.chunk_size == 0 and (lc.kd_weight > 0 or lc.ce_weight > 0 or verify)
    student = trainable["student"]
    if lc.needs_heads and not so8t.has_heads(student):
        raise KeyError("loss.safety_weight / loss.verification_weight > 0 need the student's SO8T heads "
                       "(so8t.init_heads)")
    s_out = model_lib.forward(student, s_cfg, tokens, mask_BxT=attn, output_hidden=need_hidden, logits=need_logits)
    t_out = None
    if lc.kd_weight > 0 or need_hidden or verify:
        t_out = jax.lax.stop_gradient(model_lib.forward(
            teacher_params, t_cfg, tokens, mask_BxT=attn, output_hidden=need_hidden,
            logits=need_logits and (lc.kd_weight > 0 or verify)))
    terms = {}
    agree = None  # [B, L-1] argmax agreement, the verifier's target
    if lc.kd_weight > 0 or (verify and lc.chunk_size):
        kw = dict(kind=lc.divergence, beta=lc.jsd_beta, temperature=lc.temperature, num_valid=num_valid)
        if lc.chunk_size:
            kd = losses.chunked_divergence(
                s_out.hidden[:, :-1], model_lib.lm_head(student, s_cfg), t_out.hidden[:, :-1],
                model_lib.lm_head(teacher_params, t_cfg), target_mask, chunk_size=lc.chunk_size,
                return_agreement=verify, **kw)
            kd, agree = kd if verify else (kd, None)
        else:
            kd = losses.divergence(s_out.logits[:, :-1], t_out.logits[:, :-1], target_mask, **kw)
        if lc.kd_weight > 0:
            terms["kd"] = kd
    if verify:
        if agree is None:
            agree = losses.argmax_agreement(s_out.logits[:, :-1], t_out.logits[:, :-1])
        terms["verification"] = losses.verification_bce(so8t.verifier_logits(student, s_out.hidden[:, :-1]),
                                                        agree.astype(jnp.float32), target_mask, num_valid)
    if lc.safety_weight > 0:
        prompt_mask = batch["prompt_mask"]
        logits_Bx3 = so8t.safety_logits(student, s_out.hidden[:, :prompt_mask.shape[-1]], prompt_mask)
        terms["safety"] = losses.safety_loss(logits_Bx3, batch["safety_label"], lc.safety_class_weights,
                                             total_weight=counts["safety"])
    if lc.ce_weight > 0:
        if lc.chunk_size:
            terms["ce"] = losses.chunked_cross_entropy(s_out.hidden[:, :-1], model_lib.lm_head(student, s_cfg),
                                                       labels[:, 1:], lc.chunk_size, num_valid=num_valid)
        else:
            terms["ce"] = losses.cross_entropy(s_out.logits[:, :-1], labels[:, 1:], num_valid=num_valid)
    if need_hidden:
        layer_map = lc.layer_map or losses.default_layer_map(s_cfg.n_layers, t_cfg.n_layers)
        hs, ht = s_out.hiddens[:, :, :-1], t_out.hiddens[:, :, :-1]
        if lc.hidden_weight > 0:
            terms["hidden"] = losses.hidden_matching(hs, ht, trainable["proj"], target_mask, layer_map, num_valid)
        if lc.so8t_weight > 0:
            terms["so8t"] = losses.relational_gram_loss(hs, ht, target_mask, layer_map,
                                                        num_sequences=counts["sequences"])
    if lc.pet_weight > 0:
        terms["pet"] = losses.pet_loss(s_out.hidden[:, :-1], target_mask, num_valid=counts["triples"])
    weights = {"kd": lc.kd_weight, "ce": lc.ce_weight, "hidden": lc.hidden_weight, "so8t": lc.so8t_weight,
               "pet": lc.pet_weight, "safety": lc.safety_weight, "verification": lc.verification_weight}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms


def _tree_norm(tree):
    return optax.tree_utils.tree_norm(tree)


def _with_alpha(params, alpha):
    return dict(params, student=dict(params["student"], so8t_alpha=alpha))


def gate_metrics(student_params, alpha) -> dict[str, jax.Array]:
    """The gate's alpha, sigmoid(alpha) (how much of the rotation acts) and the mean rotation angle."""
    layers = student_params["layers"]
    angles = [so8t.mean_rotation_angle(layers[k]) for k in ("attn_gate", "mlp_gate") if k in layers]
    return {"so8t/alpha": alpha, "so8t/gate": jax.nn.sigmoid(alpha),
            "so8t/rotation_angle": sum(angles) / len(angles)}


def make_step(s_cfg: ModelConfig, t_cfg: ModelConfig, loss_cfg: LossConfig, optim_cfg: OptimConfig,
              axis_name: str | None = None, policy: PolicyConfig | None = None,
              gate_cfg: so8t.GateConfig | None = None):
    """The per-device step body. With axis_name (pmap), counts and gradients are summed across devices.
    With a generating policy the batch must also carry prompt_ids / prompt_mask (see data.Batcher).
    With gate_cfg.gates the student carries SO(8) gates: each step sets params["student"]["so8t_alpha"] to
    gate_cfg.alpha(step, total_steps) before the forward pass and keeps that value after the update."""
    gated = gate_cfg is not None and gate_cfg.gates
    head_scale = optim_cfg.head_learning_rate / optim_cfg.learning_rate if optim_cfg.learning_rate > 0 else 0.0
    optimizer = make_optimizer(optim_cfg)
    schedule = make_schedule(optim_cfg)
    accum = optim_cfg.grad_accum_steps

    def reduce(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    def grads_of(trainable, teacher_params, batch, counts):
        def f(p):
            terms = loss_terms(p, teacher_params, batch, counts, s_cfg, t_cfg, loss_cfg)
            return terms["loss"], terms
        (_, terms), grads = jax.value_and_grad(f, has_aux=True)(trainable)
        return grads, terms

    def mix(state, teacher_params, batch, rng):
        source = choose_source(rng, policy)
        key = jax.random.fold_in(rng, 1)
        if axis_name is not None:  # each device samples its own shard of prompts
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        lead = batch["prompt_ids"].shape[:-1]  # [B] or [A, B] with accumulation

        def flat(x):
            return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x
        view = completions_view(jax.tree_util.tree_map(flat, batch), source, state.params["student"],
                                teacher_params, s_cfg, t_cfg, policy, key)
        view = jax.tree_util.tree_map(lambda x: x.reshape(*lead, x.shape[-1]), view)
        return {**batch, **view}, source

    def step(state: TrainState, teacher_params, batch, rng):
        batch = dict(batch)
        poison = batch.pop("poison", None)  # tests: a NaN added to every gradient exercises the rollback path
        alpha = None
        if gated:
            alpha = gate_cfg.alpha(state.step, optim_cfg.total_steps)
            state = state.replace(params=_with_alpha(state.params, alpha))
        source = jnp.zeros((), jnp.int32)
        if policy is not None and policy.generates:
            batch, source = mix(state, teacher_params, batch, rng)
        counts = reduce(batch_counts(batch, loss_cfg))
        if accum == 1:
            grads, terms = grads_of(state.params, teacher_params, batch, counts)
        else:  # micro-batches on the leading axis; each term is already divided by the global count
            def body(carry, micro):
                g, t = grads_of(state.params, teacher_params, micro, counts)
                return jax.tree_util.tree_map(jnp.add, carry, (g, t)), None
            zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
                grads_of, state.params, teacher_params, jax.tree_util.tree_map(lambda x: x[0], batch), counts))
            (grads, terms), _ = jax.lax.scan(body, zeros, batch)
        # Each device's loss is its share of the global mean, so the global gradient is the SUM over devices.
        grads, terms = reduce(grads), reduce(terms)
        if poison is not None:
            grads = jax.tree_util.tree_map(lambda g: g + poison.astype(g.dtype), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, value=terms["loss"])
        updates = jax.tree_util.tree_map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
        if head_scale != 1.0 and so8t.has_heads(updates["student"]):  # adamw's update is linear in its lr
            updates = dict(updates, student={k: jax.tree_util.tree_map(lambda u: u * head_scale, v)
                                             if k in so8t.HEADS else v for k, v in updates["student"].items()})
        params = optax.apply_updates(state.params, updates)
        if gated:  # alpha is scheduled, not learned: undo weight decay's pull on it
            params = _with_alpha(params, alpha)
        grad_norm = _tree_norm(grads)
        lr = schedule(state.step) * state.lr_scale
        if optim_cfg.plateau:
            lr = lr * optax.tree_utils.tree_get(opt_state, "scale")
        metrics = {**{f"loss/{k}" if k != "loss" else "loss": v for k, v in terms.items()},
                   "grad_norm": grad_norm, "param_norm": _tree_norm(params), "update_norm": _tree_norm(updates),
                   "clipped": (grad_norm > optim_cfg.max_grad_norm).astype(jnp.float32)
                   if optim_cfg.max_grad_norm > 0 else jnp.zeros(()),
                   "lr": lr, "num_targets": counts["targets"], "source": source.astype(jnp.float32),
                   "on_policy": (source == 1).astype(jnp.float32)}
        if gated:
            metrics.update(gate_metrics(params["student"], alpha))
        new_state = TrainState(state.step + 1, params, opt_state, state.lr_scale)
        return new_state, metrics

    return step, optimizer


# ------------------------------------------------------------------------------------------ wrappers


def jit_step(step):
    """Single device (or whatever jit's default placement is): donated state."""
    return jax.jit(step, donate_argnums=(0,))


def pmap_step(s_cfg, t_cfg, loss_cfg, optim_cfg, axis_name="data", policy: PolicyConfig | None = None,
              gate_cfg: so8t.GateConfig | None = None):
    """jax.pmap over local devices: state replicated, teacher broadcast, batch split on a leading device
    axis ([n_dev, B/n_dev, ...], see `shard_for_pmap`), gradients summed with lax.psum."""
    step, optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, axis_name=axis_name, policy=policy,
                                gate_cfg=gate_cfg)
    return jax.pmap(step, axis_name=axis_name, in_axes=(0, None, 0, None), donate_argnums=(0,)), optimizer


def replicate(tree, n_devices: int):
    """A copy per device on a new leading axis: the state layout pmap expects."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n_devices, *x.shape)), tree)


def shard_for_pmap(batch, n_devices: int):
    """[B, ...] (or [A, B, ...] with accumulation) -> [n_dev, B/n_dev, ...] (or [n_dev, A, B/n_dev, ...])."""
    def one(x, batch_axis):
        b = x.shape[batch_axis]
        if b % n_devices:
            raise ValueError(f"batch of {b} rows does not split over {n_devices} devices")
        shape = x.shape[:batch_axis] + (n_devices, b // n_devices) + x.shape[batch_axis + 1:]
        return jnp.moveaxis(x.reshape(shape), batch_axis, 0)

    accum = batch["input_ids"].ndim == 3
    return jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(x, (n_devices,)) if x.ndim == 0 else one(x, 1 if accum else 0), batch)


def make_mesh(devices=None, axis_name="data") -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(-1), (axis_name,))


def _teacher_spec(x, n: int, axis_name: str):
    """Shard a teacher array's largest axis divisible by the device count (FSDP-style), else replicate."""
    dims = sorted(range(x.ndim), key=lambda i: -x.shape[i])
    for i in dims:
        if x.shape[i] % n == 0 and x.shape[i] >= n:
            spec = [None] * x.ndim
            spec[i] = axis_name
            return P(*spec)
    return P()


def mesh_step(s_cfg, t_cfg, loss_cfg, optim_cfg, mesh: Mesh, shard_teacher: bool = True, axis_name="data",
              policy: PolicyConfig | None = None, gate_cfg: so8t.GateConfig | None = None):
    """jax.jit over a Mesh: state replicated, batch split on the data axis, teacher params optionally sharded
    across devices (XLA gathers them layer by layer) so a teacher larger than one device fits.
    Returns (step, optimizer, place) where place(state, teacher, batch) puts arrays on their shardings."""
    step, optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, policy=policy, gate_cfg=gate_cfg)
    n = mesh.devices.size
    replicated = NamedSharding(mesh, P())

    def batch_sharding(x):
        if x.ndim == 0:
            return replicated
        return NamedSharding(mesh, P(None, axis_name) if x.ndim == 3 else P(axis_name))

    def teacher_sharding(teacher):
        return jax.tree_util.tree_map(
            lambda x: NamedSharding(mesh, _teacher_spec(x, n, axis_name)) if shard_teacher else replicated, teacher)

    def place(state, teacher, batch):
        """Put each given tree on its sharding (None passes through)."""
        if state is not None:
            state = jax.device_put(state, replicated)
        if teacher is not None:
            teacher = jax.device_put(teacher, teacher_sharding(teacher))
        if batch is not None:
            batch = jax.device_put(batch, jax.tree_util.tree_map(batch_sharding, batch))
        return state, teacher, batch

    jitted = jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))
    return jitted, optimizer, place
