"""The training loop. `train(config)` is the whole job, in named phases:

    run = setup(config)                      # config check, teacher + student + data, placement, resume
    while steps remain:
        pending = dispatch(run, position)    # the compiled step on the position's batch, not waited for
        resolve(run, previous)               # the step before: observe (stability: on an anomaly roll back
                                             # and skip its batch), record, periodic (snapshots, held-out
                                             # loss, checkpoints, samples)
    finish(run)                              # final checkpoint, student/, results, export, evaluation

The loop is asynchronous: step N+1 is dispatched before step N's metrics are read, batches are built on a
background thread (prefetch.py), and periodic checkpoints are written by Orbax in the background. Steps that
need their own state on the host (snapshots, checkpoints, held-out loss, samples, weight norms, the last step)
are resolved before the next dispatch. A non-finite step leaves the weights unchanged inside the compiled
step, so the step dispatched after it computes on healthy weights until the monitor rolls both back.

Everything a step depends on is a function of (seed, data position): the batch (data.Batcher) and the step's
rng (fold_in(seed, position)). With the state restored bitwise from Orbax, a resumed run therefore ends with
the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from so8t_jax import audit, build, data, distributed, evaluate, outputs, seqkd, so8t, stability, teacher_prompts
from so8t_jax.checkpoint import Checkpointer
from so8t_jax.completions import PolicyConfig
from so8t_jax.loading import Model
from so8t_jax.objective import LossConfig, batch_counts, loss_terms
from so8t_jax.optim import OptimConfig
from so8t_jax.placement import ParallelConfig, Placement
from so8t_jax.prefetch import Prefetcher
from so8t_jax.progress import ProgressLogger
from so8t_jax.runs import check_config, write_results
from so8t_jax.train_step import TrainState, init_state


class TrainingStopped(RuntimeError):
    """The stability monitor gave up (stability.max_rollbacks reached); the message says what to change."""


@dataclasses.dataclass
class Hooks:
    """Seams a caller (the tests) installs; never a config key. before_step(position, state) -> state runs on
    the host before the step at a data position is dispatched (e.g. to inject a fault)."""
    before_step: Callable[[int, TrainState], TrainState] | None = None


@dataclasses.dataclass
class Run:
    """Everything one run holds between phases."""
    config: ml_collections.ConfigDict
    run_dir: pathlib.Path
    teacher_path: pathlib.Path
    teacher: Model
    student: Model                  # before training (its config is the student's)
    loss_cfg: LossConfig
    policy: PolicyConfig
    steps: int
    batcher: data.Batcher
    heldout_rows: list
    heldout_enc: list
    placement: Placement
    state: TrainState               # on the placement's devices
    teacher_params: Any             # on the placement's devices
    monitor: stability.Monitor
    rollback: stability.RollbackPolicy
    ckpt: Checkpointer
    snapshots: stability.SnapshotKeeper
    log: audit.AuditLog
    hooks: Hooks
    start_time: float
    vocab_note: str | None = None
    resumed_from: int | None = None
    logger: ProgressLogger | None = None
    eval_fn: Callable | None = None
    prefetch: Prefetcher | None = None
    dispatched: int = 0             # steps dispatched (state.step once they finish), counted on the host
    unlogged_checkpoint: dict | None = None  # the last periodic save, audited once Orbax has committed it
    host: dict = dataclasses.field(default_factory=lambda: {"position": 0, "history": [], "eval": [], "tokens": 0,
                                                            "elapsed": 0.0})

    @property
    def step(self) -> int:
        """Steps dispatched so far (the host's count: reading state.step would wait for the device)."""
        return self.dispatched

    def meta(self) -> dict:
        """The host-side state saved beside every checkpoint and snapshot."""
        h = self.host
        return {"position": h["position"], "monitor": self.monitor.state_dict(), "rollback": self.rollback.state_dict(),
                "history": h["history"], "eval": h["eval"], "tokens": h["tokens"],
                "elapsed": h["elapsed"] + time.time() - self.start_time, "seed": self.config.seed,
                "last_metrics": h.get("last_metrics")}


@dataclasses.dataclass
class Pending:
    """A dispatched step: its data position, the step number its update makes, its metrics (still on the
    device; metrics["tokens"]: the tokens it trained on)."""
    pos: int
    step: int
    metrics: dict


def train(config: ml_collections.ConfigDict, hooks: Hooks | None = None) -> dict:
    """Run the job described by `config` (so8t_jax/defaults.py); returns distillation_results.json's content."""
    run = setup(config, hooks)
    try:
        pending = None
        while pending is not None or run.dispatched < run.steps:
            if pending is not None and (pending.step >= run.steps or sync_point(run, pending.step)):
                resolve(run, pending)  # this step's own state is needed on the host: nothing dispatched after it
                pending = None
                continue
            new = dispatch(run, next_position(run))
            if pending is not None and not resolve(run, pending):
                new = None  # rolled back: the step dispatched after the bad one goes with it
            pending = new
        return finish(run)
    except BaseException:
        close(run)  # no checkpoint or prefetch thread, no open file outlives a failed run
        raise


def close(run: Run) -> None:
    """Finish pending asynchronous saves and close every writer of the run (safe to call twice)."""
    def audit_saved():
        _log_saved_checkpoint(run)

    for closer in (run.prefetch.close if run.prefetch is not None else None, run.ckpt.close, audit_saved,
                   run.snapshots.close, run.log.close, run.logger.close if run.logger is not None else None):
        if closer is not None:
            try:
                closer()
            except Exception:  # noqa: BLE001 - closing after a failure must not hide the failure
                pass


# ------------------------------------------------------------------------------------------------ setup


def setup(config: ml_collections.ConfigDict, hooks: Hooks | None = None) -> Run:
    """Check the config, build teacher, student and data, compile the step for the parallel mode, and either
    resume from the latest checkpoint or record the run's start (with a step-0 snapshot)."""
    check_config(config)
    start_time = time.time()
    written = teacher_prompts.is_source(config.data.source)  # teacher:N: the teacher writes the prompts
    rows, data_report = (None, None) if written else data.run_rows(config)  # a bad row fails before any load
    teacher_path, teacher = build.load_teacher(config)
    rows, data_report = data.run_rows(config, teacher) if written else (rows, data_report)
    kept = build.kept_layers(config, teacher, rows)  # student.select: kl measures which layers to keep
    teacher, student, vocab_note = build.reconcile_vocab(teacher, build.make_student(config, teacher, kept))
    loss_cfg, policy = build.step_configs(config, teacher, kept)
    seq_kd: dict = {}  # the teacher's completions made once and cached (seqkd.py), then trained on as data
    relabel = (lambda enc: seqkd.relabel(enc, teacher.params, teacher.config, policy, config.seed, pathlib.Path(
        config.output_dir) / ".seq_kd_cache", seq_kd)) if policy.seq_kd else None
    batcher, heldout_rows, heldout_enc = data.prepare(config, rows, teacher.tokenizer, policy.max_new_tokens,
                                                      policy.eos_ids, policy.pad_id, relabel)
    policy = seqkd.step_policy(policy) if policy.seq_kd else policy
    steps = config.train.steps if config.train.epochs <= 0 else \
        config.train.epochs * math.ceil(len(batcher) / (config.train.batch_size * config.optim.grad_accum_steps))
    optim_cfg = OptimConfig(total_steps=steps, **config.optim.to_dict())
    placement = Placement(config.parallel.mode, student.config, teacher.config, loss_cfg, optim_cfg, policy,
                          so8t.GateConfig(**config.so8t.to_dict()), ParallelConfig.of(config.parallel))
    state = init_state(student.params, placement.optimizer, jax.random.key(config.seed), teacher.config.d_model,
                       loss_cfg)
    stab_cfg = stability.StabilityConfig(**config.stability.to_dict())
    run_dir = pathlib.Path(config.output_dir) / config.run_name
    run = Run(config, run_dir, teacher_path, teacher, student, loss_cfg, policy, steps, batcher, heldout_rows,
              heldout_enc, placement, state, teacher.params,
              stability.Monitor(stab_cfg, jax.device_get(stability.group_norms(state.params))),
              stability.RollbackPolicy(stab_cfg), Checkpointer(run_dir / "orbax", keep=config.train.keep_checkpoints),
              stability.SnapshotKeeper(run_dir / "snapshots", stab_cfg.keep_snapshots),
              distributed.writer(audit.AuditLog, run_dir), hooks or Hooks(), start_time, vocab_note)
    run.host.update(data=data_report, student_layers=list(kept) if kept else None, seq_kd_cache=seq_kd or None)
    try:  # placed first: a resume restores straight into the placement's shardings (any device count)
        run.state, run.teacher_params = placement.to_device(run.state, run.teacher_params)
        _resume_or_start(run, data.fingerprint(rows))
        run.logger = distributed.writer(ProgressLogger, run_dir / "tensorboard", steps, int(run.state.step))
        run.dispatched = int(run.state.step)
        run.prefetch = Prefetcher(lambda pos: step_batch(run, pos), lambda pos: _following(run, pos))
    except BaseException:
        close(run)
        raise
    run.eval_fn = jax.jit(lambda p, t, b: loss_terms(p, t, b, batch_counts(b, loss_cfg), student.config,
                                                     teacher.config, loss_cfg))
    return run


def _resume_or_start(run: Run, data_fingerprint: str) -> None:
    config = run.config
    run.ckpt.discard_uncommitted()  # what a killed run's saves left (this process owns the run: the audit lock)
    run.snapshots.discard_uncommitted()
    if config.train.resume and run.ckpt.latest_step() is not None:
        run.state, m = run.ckpt.restore(target=run.state)
        run.resumed_from = int(run.state.step)
        run.host.update({k: m[k] for k in ("position", "history", "eval", "tokens", "elapsed", "last_metrics")
                         if k in m})
        run.monitor.load_state_dict(m["monitor"])
        run.rollback.load_state_dict(m["rollback"])
        run.snapshots.resume_at(run.resumed_from, run.state, m)  # none newer than the checkpoint
        run.log.append("resume", step=run.resumed_from, position=run.host["position"],
                       digest=audit.tree_digest(run.state.params))
        return
    path = run.teacher_path
    run.log.append(audit.RUN_START, config=config.to_dict(), teacher=str(path),
                   teacher_sha256=audit.file_sha256(path) if path.is_file() else None,
                   dataset=config.data.source, dataset_fingerprint=data_fingerprint, data=run.host["data"],
                   packages=audit.package_versions(), vocab_note=run.vocab_note,
                   student_layers=run.host["student_layers"], seq_kd_cache=run.host["seq_kd_cache"])
    run.snapshots.save(0, run.state, run.meta())


# ------------------------------------------------------------------------------------------------ one step


def step_batch(run: Run, pos: int) -> dict[str, np.ndarray]:
    """The batch (this process's rows) of a data position, with the axis [A, B, ...] when grad_accum_steps > 1."""
    accum, b = run.config.optim.grad_accum_steps, run.config.train.batch_size
    batch = run.batcher.batch(pos, run.placement.local_rows(b, accum))
    if accum > 1:
        batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
    return batch


def next_position(run: Run) -> int:
    """The next data position to train on (positions a rollback skipped are passed over)."""
    pos = _following(run, run.host["position"] - 1)
    run.host["position"] = pos + 1
    return pos


def _following(run: Run, pos: int) -> int:
    pos += 1
    while run.rollback.should_skip(pos):
        pos += 1
    return pos


def dispatch(run: Run, pos: int) -> Pending:
    """Start the compiled step on position `pos`'s batch; returns without waiting for the device."""
    batch = run.prefetch.get(pos) if run.prefetch is not None else step_batch(run, pos)
    if run.hooks.before_step is not None:
        run.state = run.hooks.before_step(pos, run.state)
    run.state, metrics = run.placement.run(run.state, run.teacher_params, batch,  # numpy: placed by run
                                           jax.random.fold_in(jax.random.key(run.config.seed), pos))
    run.dispatched += 1
    return Pending(pos, run.dispatched, metrics)


def one_step(run: Run, pos: int) -> tuple[dict[str, float], int]:
    """dispatch, then wait: (metrics as floats, tokens trained on)."""
    metrics = {k: float(v) for k, v in jax.device_get(dispatch(run, pos).metrics).items()}
    return metrics, int(metrics["tokens"])


def sync_point(run: Run, step: int) -> bool:
    """Whether step `step`'s own state must reach the host (periodic work or weight norms are due)."""
    c = run.config
    return any(every and step % every == 0 for every in (
        c.stability.snapshot_every, c.train.eval_every, c.train.checkpoint_every, c.train.sample_every,
        c.stability.every_n))


def resolve(run: Run, pending: Pending) -> bool:
    """Read a dispatched step's metrics and act on them: observe, then record and periodic when healthy.
    False when the step was rolled back."""
    metrics = {k: float(v) for k, v in jax.device_get(pending.metrics).items()}
    if not observe(run, pending.pos, metrics, pending.step):
        return False
    record(run, metrics, int(metrics["tokens"]), pending.step)
    periodic(run, pending.step)
    return True


def observe(run: Run, pos: int, metrics: dict[str, float], step: int | None = None) -> bool:
    """The stability check of step `step` (default: the last dispatched). True when healthy; otherwise the run
    is rolled back to its last snapshot with a lower lr scale and False is returned, or, past max_rollbacks,
    stopped with TrainingStopped. Weight norms are read from run.state: `step` must be the latest step then
    (sync_point makes it so)."""
    step = run.dispatched if step is None else step
    norms = None
    if run.monitor.wants_norms(step):
        norms = jax.device_get(stability.group_norms(run.state.params))
    anomalies = run.monitor.check(step, metrics, norms)
    if not anomalies:
        return True
    decision = run.rollback.on_anomaly(anomalies, step, batch_id=pos)
    for a in anomalies:
        run.log.append(audit.ANOMALY, anomaly=a.to_dict(), position=pos)
    if decision.action == "stop":
        run.log.append(audit.RUN_END, status="stopped", message=decision.message, step=step)
        raise TrainingStopped(decision.message)
    snap_step, snap_state, snap_meta = run.snapshots.latest(target=run.state)
    state = snap_state.replace(lr_scale=jnp.asarray(decision.lr_scale, jnp.float32))
    run.state, _ = run.placement.to_device(state, None)
    run.dispatched = snap_step
    run.host["position"] = snap_meta["position"]
    run.host["history"] = snap_meta["history"]
    run.monitor.load_state_dict(snap_meta["monitor"])
    run.log.append(audit.ROLLBACK, step=step, to_step=snap_step, lr_scale=decision.lr_scale, skipped_position=pos,
                   message=decision.message)
    _save_checkpoint(run, snap_step, run.state)  # the rollback is durable: a run killed from here resumes after it
    run.logger.message(decision.message)
    return False


def record(run: Run, metrics: dict[str, float], tokens: int, step: int | None = None) -> None:
    """A healthy step's history, token count, last metrics and progress / TensorBoard line."""
    step = run.dispatched if step is None else step
    run.host["tokens"] += tokens
    run.host["history"].append({"step": step, "loss": metrics["loss"], "time": round(time.time(), 3)})
    run.host["last_metrics"] = metrics
    run.logger.step(step, metrics, tokens)


# ------------------------------------------------------------------------------------------------ periodic


def heldout_loss(run: Run) -> float | None:
    """Mean objective over train.eval_batches held-out batches (dataset completions), or None without any."""
    return evaluate.heldout_loss(run.eval_fn, run.state.params, run.teacher.params, run.heldout_enc, run.config,
                                 run.policy.max_new_tokens, run.policy.pad_id)


def periodic(run: Run, step: int | None = None) -> None:
    """What falls due after a healthy step (run.state must be that step's): stability snapshot, held-out loss
    (and best checkpoint), periodic checkpoint (Orbax writes it in the background; the audit log records it
    once committed), sample completions."""
    c, step, state = run.config, run.dispatched if step is None else step, run.state
    if step % c.stability.snapshot_every == 0:
        run.snapshots.save(step, state, run.meta())
    if c.train.eval_every and step % c.train.eval_every == 0:
        value = heldout_loss(run)
        if value is not None:
            run.host["eval"].append({"step": step, "heldout_loss": value})
            run.logger.scalars(step, {"eval/heldout_loss": value})
            run.log.append(audit.EVAL, step=step, heldout_loss=value)
            run.ckpt.save_best(step, state, run.meta(), value)
    if step % c.train.checkpoint_every == 0 or step == run.steps:
        _save_checkpoint(run, step, state)
    if c.train.sample_every and step % c.train.sample_every == 0 and run.heldout_rows:
        run.logger.samples(step, outputs.samples(run.student.config, state.params["student"], run.teacher.tokenizer,
                                         run.heldout_rows[:2], run.policy))


def _save_checkpoint(run: Run, step: int, state: TrainState) -> None:
    """Start the periodic save of `state` as `step` (Orbax writes it in the background; audited once committed)."""
    _log_saved_checkpoint(run)  # waits for the previous save
    run.ckpt.save(step, state, run.meta())
    run.unlogged_checkpoint = {"step": step, "digest": audit.tree_digest(state.params)}


def _log_saved_checkpoint(run: Run) -> None:
    """Wait for the pending periodic save and record it in the audit log (only committed checkpoints are)."""
    if run.unlogged_checkpoint is not None:
        run.ckpt.wait()
        run.log.append(audit.CHECKPOINT, **run.unlogged_checkpoint)
        run.unlogged_checkpoint = None


# ------------------------------------------------------------------------------------------------ finish


def finish(run: Run) -> dict:
    """Final checkpoint, the folded student in student/, held-out loss, results JSON and model card, then
    export and evaluation (_outputs); the audit log's run_end."""
    final = run.state
    run.prefetch.close()
    _log_saved_checkpoint(run)
    run.ckpt.save_final(final, run.meta())
    run.ckpt.close()
    run.snapshots.close()
    s_cfg = run.student.config
    # the gates fold into o / down at their last alpha: student/ is a plain model of its family (+ heads)
    outputs.save_student(s_cfg, so8t.fold_gates(s_cfg, final.params["student"]), run.teacher.tokenizer,
                         run.run_dir / "student", source=str(run.teacher_path))
    heldout_after = heldout_loss(run)
    results = write_results(run.run_dir, run.config, run.teacher, run.student, final, run.host, run.meta(),
                            heldout_after, run.resumed_from, run.rollback, run.vocab_note)
    run.logger.close()
    results = outputs.export_and_evaluate(run.config, run.run_dir, results, run.log)
    run.log.append(audit.RUN_END, status="finished", step=int(final.step), digest=audit.tree_digest(final.params),
                   heldout_loss=heldout_after)
    run.log.close()
    return results
