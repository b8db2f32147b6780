"""Where each step's completions come from (on-policy GKD): the dataset's own, the student's samples
(probability lmbda) or the teacher's (seq_kd), chosen by one seeded draw inside the compiled step."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from so8t_jax import sampling
from so8t_jax.conventions import IGNORE_INDEX
from so8t_jax.defaults import DEFAULTS

_D = DEFAULTS.policy


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Where each step's completions come from (GKD). One uniform draw per step from the step's rng, the same
    on every device and host: < lmbda -> the student samples them; else with seq_kd the teacher generates
    them; else the dataset's own completions. Sampled completions end at the first EOS (labels -100 after)."""
    lmbda: float = _D.lmbda
    lmbda_schedule: str = _D.lmbda_schedule  # constant | linear | cosine: lmbda_start -> lmbda over lmbda_ramp
    lmbda_start: float = _D.lmbda_start
    lmbda_ramp: float = _D.lmbda_ramp        # fraction of the run's steps the ramp takes
    seq_kd: bool = _D.seq_kd
    temperature: float = _D.temperature
    top_k: int = _D.top_k
    top_p: float = _D.top_p
    max_new_tokens: int = _D.max_new_tokens
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        for name in ("lmbda", "lmbda_start", "lmbda_ramp"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"policy.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lmbda_schedule not in LMBDA_SCHEDULES:
            raise ValueError(f"policy.lmbda_schedule must be one of {LMBDA_SCHEDULES}, got {self.lmbda_schedule!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"policy.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        sampling.Sampler(self.temperature, self.top_k, self.top_p)  # validates the sampling values

    @property
    def generates(self) -> bool:
        return self.lmbda > 0 or (self.lmbda_schedule != "constant" and self.lmbda_start > 0) or self.seq_kd

    @property
    def offline_steps(self) -> bool:
        """Whether some steps train on the dataset's completions (the on-policy share is below 1 at some step)."""
        return self.lmbda < 1 or (self.lmbda_schedule != "constant" and self.lmbda_start < 1)

    def lmbda_at(self, step, total_steps: int):
        """The on-policy probability at `step` (traceable): GKD from a weak start, offline KD first (the student's
        own samples are noise until it imitates the teacher), then the on-policy share rising to lmbda."""
        if self.lmbda_schedule == "constant":
            return jnp.float32(self.lmbda)
        ramp = max(self.lmbda_ramp * total_steps, 1.0)
        t = jnp.clip(jnp.asarray(step, jnp.float32) / ramp, 0.0, 1.0)
        shape = t if self.lmbda_schedule == "linear" else 0.5 - 0.5 * jnp.cos(jnp.pi * t)
        return jnp.float32(self.lmbda_start) + (self.lmbda - self.lmbda_start) * shape


LMBDA_SCHEDULES = ("constant", "linear", "cosine")
SOURCES = ("dataset", "student", "teacher")


def choose_source(rng, policy: PolicyConfig, lmbda=None) -> jax.Array:
    """0 dataset, 1 student (on-policy), 2 teacher (seq_kd): the step's single seeded draw; lmbda: this step's
    on-policy probability (policy.lmbda_at), default policy.lmbda."""
    lmbda = policy.lmbda if lmbda is None else lmbda
    on_policy = jax.random.uniform(jax.random.fold_in(rng, 0)) < lmbda
    return jnp.where(on_policy, 1, 2 if policy.seq_kd else 0).astype(jnp.int32)


def completions_view(batch, source, student_params, teacher_params, s_cfg, t_cfg, policy: PolicyConfig, key,
                     row_ids_B=None):
    """The training view (input_ids, attention_mask, labels) of the chosen source, for prompts in
    batch["prompt_ids"/"prompt_mask"] (left-padded [B, P]); dataset rows are batch's own view ([B, P+N]).
    row_ids_B: the rows' global ids, which seed their samples (sampling.sample)."""
    sampler = sampling.Sampler(policy.temperature, policy.top_k, policy.top_p)

    def generated(params, cfg):
        out = sampling.sample(jax.lax.stop_gradient(params), cfg, batch["prompt_ids"], batch["prompt_mask"], key,
                              max_new_tokens=policy.max_new_tokens, sampler=sampler, eos_ids=policy.eos_ids,
                              pad_id=policy.pad_id, row_ids_B=row_ids_B)
        labels = jnp.where(out.completion_mask_BxL > 0, out.sequence_BxL, IGNORE_INDEX)
        return {"input_ids": out.sequence_BxL, "attention_mask": out.sequence_mask_BxL, "labels": labels}

    def dataset():
        return {k: batch[k].astype(jnp.int32) for k in ("input_ids", "attention_mask", "labels")}

    branches = [dataset, lambda: generated(student_params, s_cfg)]
    if policy.seq_kd:
        branches.append(lambda: generated(teacher_params, t_cfg))
    return jax.lax.switch(jnp.minimum(source, len(branches) - 1), branches)


def mix_completions(batch, rng, student_params, teacher_params, s_cfg, t_cfg, policy: PolicyConfig,
                    axis_name: str | None = None, lmbda=None):
    """(batch with the chosen source's input_ids / attention_mask / labels, source). An accumulation axis
    ([A, B, ...]) is flattened for sampling and restored after. Each row samples with its global id, so one
    device, a batch split over axis_name's devices and accumulation all draw the same completions."""
    source = choose_source(rng, policy, lmbda)
    key = jax.random.fold_in(rng, 1)
    lead = batch["prompt_ids"].shape[:-1]  # [B] or [A, B] with accumulation (B: this device's rows)

    def flat(x):
        return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x
    view = completions_view(jax.tree_util.tree_map(flat, batch), source, student_params, teacher_params,
                            s_cfg, t_cfg, policy, key, global_row_ids(lead, axis_name).reshape(-1))
    view = jax.tree_util.tree_map(lambda x: x.reshape(*lead, x.shape[-1]), view)
    return {**batch, **view}, source


def global_row_ids(lead: tuple[int, ...], axis_name: str | None = None) -> jax.Array:
    """Ids of a (local) [B] or [A, B] batch's rows in the global batch, row-major as one device holds it:
    with axis_name, this device's B rows are columns d*B .. d*B+B-1 of A rows of n*B (n devices)."""
    b = lead[-1]
    cols = jnp.arange(b, dtype=jnp.int32)
    width = b
    if axis_name is not None:
        cols = cols + jax.lax.axis_index(axis_name).astype(jnp.int32) * b
        width = b * jax.lax.axis_size(axis_name)
    if len(lead) == 1:
        return cols
    return jnp.arange(lead[0], dtype=jnp.int32)[:, None] * width + cols[None, :]
