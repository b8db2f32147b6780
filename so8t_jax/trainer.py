"""The training loop: data, lmbda mixing (inside the compiled step), checkpoints and exact resume, stability
rollback, audit log, TensorBoard, progress bar, results JSON and model card. `train(config)` is the whole job.

Everything a step depends on is a function of (seed, data position): the batch (data.Batcher) and the step's
rng (fold_in(seed, position)). With the state restored bitwise from Orbax, a resumed run therefore ends with
the same parameters as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from so8t_jax import audit, data, so8t, stability, train_step
from so8t_jax import model as model_lib
from so8t_jax.checkpoint import Checkpointer
from so8t_jax.loading import Model, load, save_converted, smollm2_gguf
from so8t_jax.progress import ProgressLogger
from so8t_jax.runs import check_config, model_card, student_from_teacher, write_json, write_results, write_text


def resolve_teacher_path(path: str) -> pathlib.Path:
    if path in ("smollm2", "", None):
        return smollm2_gguf()
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"teacher.path: {path} does not exist")
    return p


def make_student(config, teacher: Model) -> Model:
    """The student before training, a pure function of (config, teacher): evaluation rebuilds it the same way."""
    s = config.student
    dtype = s.dtype
    if s.init == "from_teacher":
        student = student_from_teacher(teacher, s.layers, dtype)
    elif s.init == "random":
        cfg = (model_lib.ModelConfig.preset(s.preset) if s.preset
               else teacher.config.replace(n_layers=s.layers, sliding_layers=teacher.config.sliding_layers and
                                           teacher.config.sliding_layers[:s.layers]))
        params = model_lib.init_params(cfg, jax.random.key(config.seed), jnp.dtype(dtype))
        student = Model(cfg, params, pathlib.Path("random"), _tokenizer=teacher.tokenizer)
    else:
        student = load(s.path, dtype)
    return add_so8t_structure(config, student)


def add_so8t_structure(config, student: Model) -> Model:
    """Zero SO(8) gates (the identity) when so8t.gates, and fresh safety / verifier heads when their losses
    are on and the student has none (a student loaded from a path keeps its own)."""
    params = student.params
    if config.so8t.gates and not so8t.has_gates(params):
        params = so8t.with_gates(student.config, params, alpha=config.so8t.alpha_start)
    if train_step.needs_heads(config.loss) and not so8t.has_heads(params):
        params = {**params, **so8t.init_heads(student.config.d_model, jax.random.fold_in(
            jax.random.key(config.seed), 8))}
    return student if params is student.params else dataclasses.replace(student, params=params)


def reconcile_vocab(teacher: Model, student: Model) -> tuple[Model, Model, str | None]:
    """Vocab sizes that differ only by padding rows are cut to the shorter one; real mismatches are errors."""
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if student.tokenizer is not None and teacher.tokenizer is not None \
            and student.tokenizer is not teacher.tokenizer \
            and student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise ValueError("teacher and student tokenizers differ: distillation needs a shared vocabulary")
    if vt == vs:
        return teacher, student, None
    n = min(vt, vs)
    if teacher.tokenizer is not None and len(teacher.tokenizer) > n:
        raise ValueError(f"vocab sizes {vt} (teacher) and {vs} (student) differ beyond padding "
                         f"(the tokenizer has {len(teacher.tokenizer)} tokens)")

    def cut(m: Model) -> Model:
        p = dict(m.params, embed=m.params["embed"][:n])
        if "lm_head" in p:
            p["lm_head"] = p["lm_head"][:, :n]
        return dataclasses.replace(m, config=m.config.replace(vocab_size=n), params=p)
    return cut(teacher), cut(student), f"vocab sizes {vt} (teacher) and {vs} (student) reconciled to {n}"


def run_configs(config, t_cfg, tokenizer):
    """(LossConfig, PolicyConfig) of a run config; eos and pad ids from the teacher (evaluation uses it too)."""
    c = config
    loss_cfg = train_step.LossConfig(**c.loss.to_dict())
    eos = tuple(sorted(set(t_cfg.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None
                                                   else set())))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    policy = train_step.PolicyConfig(lmbda=c.policy.lmbda, seq_kd=c.policy.seq_kd, temperature=c.policy.temperature,
                                     top_k=c.policy.top_k, top_p=c.policy.top_p,
                                     max_new_tokens=c.policy.max_new_tokens, eos_ids=eos, pad_id=pad)
    return loss_cfg, policy


class _Runner:
    """Places state/batches for the chosen parallel mode and runs the compiled step."""

    def __init__(self, config, s_cfg, t_cfg, loss_cfg, optim_cfg, policy):
        self.mode = config.parallel.mode
        n = jax.local_device_count()
        kw = dict(policy=policy, gate_cfg=so8t.GateConfig(**config.so8t.to_dict()))
        if self.mode == "pmap":
            self.step, self.optimizer = train_step.pmap_step(s_cfg, t_cfg, loss_cfg, optim_cfg, **kw)
            self.n = n
        elif self.mode == "mesh":
            mesh = train_step.make_mesh()
            self.step, self.optimizer, self.place = train_step.mesh_step(
                s_cfg, t_cfg, loss_cfg, optim_cfg, mesh, shard_teacher=config.parallel.shard_teacher, **kw)
        else:
            step, self.optimizer = train_step.make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, **kw)
            self.step = jax.jit(step, donate_argnums=(0,))

    def to_device(self, state, teacher):
        if self.mode == "pmap":
            return train_step.replicate(state, self.n), teacher
        if self.mode == "mesh":
            state, teacher, _ = self.place(state, teacher, None)
        return state, teacher

    def host_state(self, state):
        """The single (unreplicated) state, for checkpoints."""
        return jax.tree_util.tree_map(lambda x: x[0], state) if self.mode == "pmap" else state

    def run(self, state, teacher, batch, rng):
        if self.mode == "pmap":
            state, metrics = self.step(state, teacher, train_step.shard_for_pmap(batch, self.n), rng)
            return state, jax.tree_util.tree_map(lambda x: x[0], metrics)
        if self.mode == "mesh":
            _, _, batch = self.place(None, None, batch)
        return self.step(state, teacher, batch, rng)


def train(config: ml_collections.ConfigDict) -> dict:
    """Run the job described by `config` (configs/base.py); returns distillation_results.json's content."""
    check_config(config)
    start_time = time.time()
    run_dir = pathlib.Path(config.output_dir) / config.run_name
    teacher_path = resolve_teacher_path(config.teacher.path)
    teacher = load(teacher_path, config.teacher.dtype)
    tokenizer = teacher.tokenizer
    student = make_student(config, teacher)
    teacher, student, vocab_note = reconcile_vocab(teacher, student)
    loss_cfg, policy = run_configs(config, teacher.config, tokenizer)

    rows = data.load_rows(config.data.source)
    data_fingerprint = data.fingerprint(rows)
    train_rows, heldout_rows = data.split_heldout(rows, config.data.heldout_fraction, config.seed)
    encode = dict(tokenizer=tokenizer, max_prompt_len=config.data.max_prompt_len,
                  max_completion_len=policy.max_new_tokens, eos_id=policy.eos_ids[0] if policy.eos_ids else None,
                  chat=config.data.chat)
    train_enc = data.encode_rows(train_rows, **encode)
    heldout_enc = data.encode_rows(heldout_rows, **encode) if heldout_rows else []
    batch_size, accum = config.train.batch_size, config.optim.grad_accum_steps
    batcher = data.Batcher(train_enc, batch_size * accum, config.seed, tuple(config.data.prompt_buckets),
                           policy.max_new_tokens, policy.pad_id)
    steps = config.train.steps if config.train.epochs <= 0 else \
        config.train.epochs * math.ceil(len(train_enc) / (batch_size * accum))
    optim_cfg = train_step.OptimConfig(total_steps=steps, **config.optim.to_dict())
    runner = _Runner(config, student.config, teacher.config, loss_cfg, optim_cfg, policy)
    state = train_step.init_state(student.params, runner.optimizer, jax.random.key(config.seed),
                                  teacher.config.d_model, loss_cfg)

    stab_cfg = stability.StabilityConfig(**config.stability.to_dict())
    monitor = stability.Monitor(stab_cfg, jax.device_get(stability.group_norms(state.params)))
    policy_rb = stability.RollbackPolicy(stab_cfg)
    ckpt = Checkpointer(run_dir / "orbax", keep=config.train.keep_checkpoints)
    snapshots = stability.SnapshotKeeper(run_dir / "snapshots", stab_cfg.keep_snapshots)
    log = audit.AuditLog(run_dir)
    host = {"position": 0, "history": [], "eval": [], "tokens": 0, "elapsed": 0.0}

    def meta():
        return {"position": host["position"], "monitor": monitor.state_dict(), "rollback": policy_rb.state_dict(),
                "history": host["history"], "eval": host["eval"], "tokens": host["tokens"],
                "elapsed": host["elapsed"] + time.time() - start_time, "seed": config.seed}

    resumed_from = None
    if config.train.resume and ckpt.latest_step() is not None:
        state, m = ckpt.restore(target=state)
        resumed_from = int(state.step)
        host.update({k: m[k] for k in ("position", "history", "eval", "tokens", "elapsed")})
        monitor.load_state_dict(m["monitor"])
        policy_rb.load_state_dict(m["rollback"])
        log.append("resume", step=resumed_from, position=host["position"])
    else:
        log.append(audit.RUN_START, config=config.to_dict(), teacher=str(teacher_path),
                   teacher_sha256=audit.file_sha256(teacher_path) if teacher_path.is_file() else None,
                   dataset=config.data.source, dataset_fingerprint=data_fingerprint,
                   packages=audit.package_versions(), vocab_note=vocab_note)
        snapshots.save(0, state, meta())

    logger = ProgressLogger(run_dir / "tensorboard", total=steps, initial=int(state.step))
    base_key = jax.random.key(config.seed)
    teacher_params = teacher.params
    state, teacher_params = runner.to_device(state, teacher_params)
    eval_fn = jax.jit(lambda p, t, b: train_step.loss_terms(
        p, t, b, train_step.batch_counts(b, loss_cfg), student.config, teacher.config, loss_cfg))

    def evaluate(st) -> float | None:
        if not heldout_enc:
            return None
        hb = data.Batcher(heldout_enc, batch_size, config.seed, tuple(config.data.prompt_buckets),
                          policy.max_new_tokens, policy.pad_id)
        vals = []
        for i in range(config.train.eval_batches):
            b = hb.batch(i)
            view = {k: jnp.asarray(b[k]) for k in ("input_ids", "attention_mask", "labels", "prompt_mask",
                                                   "safety_label")}
            vals.append(float(eval_fn(runner.host_state(st).params, teacher.params, view)["loss"]))
        return float(np.mean(vals))

    while int(runner.host_state(state).step) < steps:
        step = int(runner.host_state(state).step)
        pos = host["position"]
        host["position"] += 1
        if policy_rb.should_skip(pos):
            continue
        batch = batcher.batch(pos)
        if accum > 1:
            batch = {k: v.reshape(accum, batch_size, *v.shape[1:]) for k, v in batch.items()}
        dev_batch = {k: jnp.asarray(v) for k, v in batch.items()}
        if pos == config.debug.inject_nan_at_step:
            dev_batch["poison"] = jnp.asarray(np.nan, jnp.float32)
        state, metrics = runner.run(state, teacher_params, dev_batch, jax.random.fold_in(base_key, pos))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        norms = None
        if monitor.wants_norms(step + 1):
            norms = jax.device_get(stability.group_norms(runner.host_state(state).params))
        anomalies = monitor.check(step + 1, metrics, norms)
        if anomalies:
            decision = policy_rb.on_anomaly(anomalies, step + 1, batch_id=pos)
            for a in anomalies:
                log.append(audit.ANOMALY, anomaly=a.to_dict(), position=pos)
            if decision.action == "stop":
                log.append(audit.RUN_END, status="stopped", message=decision.message, step=step + 1)
                logger.close()
                raise RuntimeError(decision.message)
            snap_step, snap_state, snap_meta = snapshots.latest(target=runner.host_state(state))
            state = snap_state.replace(lr_scale=jnp.asarray(decision.lr_scale, jnp.float32))
            state, _ = runner.to_device(state, None)
            host["position"] = snap_meta["position"]
            host["history"] = snap_meta["history"]
            monitor.load_state_dict(snap_meta["monitor"])
            log.append(audit.ROLLBACK, step=step + 1, to_step=snap_step, lr_scale=decision.lr_scale,
                       skipped_position=pos, message=decision.message)
            logger.message(decision.message)
            continue
        step += 1
        tokens = int(np.sum(batch["attention_mask"]))
        host["tokens"] += tokens
        host["history"].append({"step": step, "loss": metrics["loss"]})
        host["last_metrics"] = metrics
        logger.step(step, metrics, tokens)
        host_state = runner.host_state(state)
        if step % stab_cfg.snapshot_every == 0:
            snapshots.save(step, host_state, meta())
        if config.train.eval_every and step % config.train.eval_every == 0:
            value = evaluate(state)
            if value is not None:
                host["eval"].append({"step": step, "heldout_loss": value})
                logger.scalars(step, {"eval/heldout_loss": value})
                log.append(audit.EVAL, step=step, heldout_loss=value)
                ckpt.save_best(step, host_state, meta(), value)
        if step % config.train.checkpoint_every == 0 or step == steps:
            ckpt.save(step, host_state, meta())
            ckpt.wait()
            log.append(audit.CHECKPOINT, step=step, digest=audit.tree_digest(host_state.params))
        if config.train.sample_every and step % config.train.sample_every == 0 and heldout_rows:
            logger.samples(step, _samples(student.config, host_state.params["student"], tokenizer,
                                          heldout_rows[:2], policy))

    final = runner.host_state(state)
    ckpt.save_final(final, meta())
    ckpt.close()
    snapshots.close()
    # the gates fold into o / down at their last alpha: student/ is a plain model of its family (+ heads)
    save_converted(student.config, so8t.fold_gates(student.config, final.params["student"]), tokenizer,
                   run_dir / "student", source=str(teacher_path))
    heldout_after = evaluate(state)
    results = write_results(run_dir, config, teacher, student, final, host, meta(), heldout_after, resumed_from,
                            policy_rb, vocab_note)
    write_json(run_dir / "distillation_results.json", results)  # evaluate_run reads the run's config from it
    logger.close()
    results = _finish(config, run_dir, results, log)
    log.append(audit.RUN_END, status="finished", step=int(final.step),
               digest=audit.tree_digest(final.params), heldout_loss=heldout_after)
    log.close()
    return results


def _finish(config, run_dir: pathlib.Path, results: dict, log: audit.AuditLog) -> dict:
    """Export (HF + GGUF) and the teacher / before / after evaluation, recorded in the results, model card
    and audit log. A failure here is recorded and reported, never allowed to lose the trained student."""
    from so8t_jax.evaluate import evaluate_run, format_table
    from so8t_jax.weights.export import export

    formats = [f for f in config.export.formats if f]
    if formats:
        try:
            paths = export(run_dir / "student", run_dir / "export", formats, config.export.gguf_type)
            results["export"] = {k: str(v) for k, v in paths.items()}
            log.append(audit.EXPORT, **results["export"])
        except (NotImplementedError, ValueError, OSError) as e:
            results["export"] = {"error": f"{type(e).__name__}: {e}"}
            log.append(audit.EXPORT, error=results["export"]["error"])
    if config.eval.at_end and config.data.heldout_fraction > 0:
        ev = evaluate_run(run_dir, n_rows=config.eval.rows or None)
        results["evaluation"].update(models=ev["models"], samples=ev["samples"], table=format_table(ev))
        log.append(audit.EVAL, **{name: {k: m[k] for k in ("kl", "top1", "ppl", "greedy_match")}
                                  for name, m in ev["models"].items()})
    write_json(run_dir / "distillation_results.json", results)
    write_text(run_dir / "README.md", model_card(results, config))
    return results


def _samples(cfg, params, tokenizer, rows, policy) -> list[tuple[str, str]]:
    from so8t_jax.loading import encode_prompt
    from so8t_jax.sampling import GREEDY, bucket_length, left_pad, make_sample_fn
    prompts = [encode_prompt(tokenizer, data.messages_for(r)) for r in rows]
    ids, mask = left_pad(prompts, bucket_length(max(len(p) for p in prompts)), policy.pad_id)
    fn = make_sample_fn(cfg, min(policy.max_new_tokens, 48), GREEDY, policy.eos_ids, policy.pad_id)
    out = jax.device_get(fn(params, jnp.asarray(ids), jnp.asarray(mask), None))
    texts = [tokenizer.decode(t[: n], skip_special_tokens=True) for t, n in zip(out.tokens_BxN, out.lengths_B)]
    return [(json.dumps(data.messages_for(r), ensure_ascii=False), t) for r, t in zip(rows, texts)]
