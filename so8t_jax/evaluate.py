"""Evaluation of a distillation run (DESIGN.md section 8): teacher, student before and student after.

    metrics = evaluate_run("checkpoints/smoke")          # writes checkpoints/smoke/evaluation/metrics.json
    print(format_table(metrics))

`evaluate_models` puts the same held-out rows through every model (metrics.py scores them);
`evaluate_run` rebuilds a run's three models (build.py, as the trainer built them) and its exact held-out
rows from distillation_results.json. None in the JSON where a metric had nothing to score.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from so8t_jax import build, data, quant, so8t
from so8t_jax import model as model_lib
from so8t_jax.conventions import IGNORE_INDEX
from so8t_jax.loading import Model, load
from so8t_jax.metrics import (
    answer_accuracy,
    expected_calibration_error,
    extract_answer,
    greedy_match_length,
    per_token_agreement,
    per_token_kl,
    per_token_nll,
    safety_accuracy,
)
from so8t_jax.runs import write_json
from so8t_jax.sampling import GREEDY, make_sample_fn


@functools.lru_cache(maxsize=32)
def _score_fn(cfg, n_completion: int):
    """jit: (params, input_ids_BxL, mask_BxL) -> logits [B, M, V] (M = N + 1) of the positions that predict the
    last M tokens (position P-1, the last prompt token, predicts the first completion token), plus the safety
    head's [B, 3] on the last prompt token and the verifier's [B, M] when the params carry them."""
    def fn(params, input_ids_BxL, mask_BxL):
        hidden_BxLxD = model_lib.forward(params, cfg, input_ids_BxL, mask_BxT=mask_BxL, logits=False).hidden
        h_BxMxD = hidden_BxLxD[:, hidden_BxLxD.shape[1] - n_completion - 1:]
        logits = quant.project(h_BxMxD, model_lib.lm_head(params, cfg))  # [B, M, V] float32
        n_prompt = hidden_BxLxD.shape[1] - n_completion
        safety = so8t.safety_logits(params, hidden_BxLxD[:, :n_prompt], mask_BxL[:, :n_prompt]) \
            if "safety_head" in params else None
        verifier = so8t.verifier_logits(params, h_BxMxD) if "verifier" in params else None
        return logits, safety, verifier
    return jax.jit(fn)


@jax.jit
def _token_stats(teacher_logits_BxMxV, student_logits_BxMxV, labels_BxM):
    t, s = teacher_logits_BxMxV[:, :-1], student_logits_BxMxV[:, :-1]
    return per_token_kl(t, s), per_token_agreement(t, s), per_token_nll(student_logits_BxMxV, labels_BxM)


def _prompt_text(row: data.Row) -> str:
    if row.prompt is None or isinstance(row.prompt, str):
        return row.prompt or ""
    return "\n".join(f"{m['role']}: {m['content']}" for m in row.prompt)


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


@dataclasses.dataclass
class _Tally:
    """One model's running sums over the batches: teacher-forced sums (float64), greedy continuations by row,
    and the heads' outputs with their targets."""
    kl: float = 0.0
    top1: float = 0.0
    nll: float = 0.0
    tokens: float = 0.0
    greedy: dict = dataclasses.field(default_factory=dict)        # row index -> generated ids (EOS included)
    safety: tuple = dataclasses.field(default_factory=lambda: ([], []))    # (logits [B, 3], labels [B])
    verifier: tuple = dataclasses.field(default_factory=lambda: ([], []))  # (confidence, argmax agreement)


def _batches(enc, batch_size: int, prompt_buckets, n: int, pad_id: int):
    """(start, order, batch, real) per batch of rows, batched as the trainer does; the last batch is filled with
    copies that count for nothing (real is False), so shapes repeat."""
    for start in range(0, len(enc), batch_size):
        chunk = enc[start:start + batch_size]
        batcher = data.Batcher(chunk + [chunk[0]] * (batch_size - len(chunk)), batch_size, 0,
                               tuple(prompt_buckets), n, int(pad_id))
        order = batcher.indices(0)
        yield start, order, batcher.batch(0), order < len(chunk)


def _teacher_references(teacher: Model, enc, sample_fn, batch_size: int, prompt_buckets, n: int, pad_id: int):
    """(enc with each prompt-only row's completion_ids set to the teacher's greedy continuation, how many): what
    KL, top-1 and perplexity are scored on for a row that brings no reference (e.g. data.source teacher:N)."""
    missing = [i for i, e in enumerate(enc) if not e.completion_ids and e.prompt_ids]
    out = list(enc)
    for start, order, b, real in _batches([enc[i] for i in missing], batch_size, prompt_buckets, n, pad_id):
        res = jax.device_get(sample_fn(teacher.params, jnp.asarray(b["prompt_ids"]), jnp.asarray(b["prompt_mask"]),
                                       None))
        for slot in np.flatnonzero(real):
            i = missing[start + int(order[slot])]
            out[i] = dataclasses.replace(enc[i], completion_ids=tuple(int(t) for t in
                                                                      res.tokens_BxN[slot, :res.lengths_B[slot]]))
    return out, len(missing)


def _score_batch(models: dict[str, Model], tallies: dict[str, _Tally], sample_fns, start, order, b, real, n: int):
    """Every model on one batch: teacher-forced sums against the teacher's logits, heads, greedy continuations."""
    labels = np.where(real[:, None], b["labels"], IGNORE_INDEX)
    labels_BxM = jnp.asarray(labels[:, labels.shape[1] - n - 1:])
    target_BxN = np.asarray(labels_BxM[:, 1:] != IGNORE_INDEX)
    has_prompt_B = real & (b["prompt_mask"].sum(1) > 0)
    safety_labels_B = np.where(real, b["safety_label"], -1)
    ids, mask = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    teacher_logits = None
    for name, m in models.items():
        logits, s_logits, v_logits = _score_fn(m.config, n)(m.params, ids, mask)
        teacher_logits = logits if teacher_logits is None else teacher_logits
        kl, agree, nll = jax.device_get(_token_stats(teacher_logits, logits, labels_BxM))
        t = tallies[name]
        t.kl += float(np.where(target_BxN, kl, 0.0).astype(np.float64).sum())
        t.top1 += float(np.where(target_BxN, agree, 0.0).astype(np.float64).sum())
        t.nll += float(np.where(target_BxN, nll, 0.0).astype(np.float64).sum())
        t.tokens += float(target_BxN.sum())
        if s_logits is not None:
            t.safety[0].append(np.asarray(s_logits))
            t.safety[1].append(safety_labels_B)
        if v_logits is not None:
            t.verifier[0].append(np.asarray(jax.nn.sigmoid(v_logits[:, :-1]))[target_BxN])
            t.verifier[1].append(np.asarray(agree)[target_BxN])
        if has_prompt_B.any():
            out = jax.device_get(sample_fns[name](m.params, jnp.asarray(b["prompt_ids"]),
                                                  jnp.asarray(b["prompt_mask"]), None))
            for slot in np.flatnonzero(has_prompt_B):
                t.greedy[start + int(order[slot])] = out.tokens_BxN[slot, :out.lengths_B[slot]].tolist()


def _summary(m: Model, t: _Tally, teacher_seqs, generated, answered, enc, eos_ids, text) -> dict:
    """One model's metrics from its tally (None where nothing was scored)."""
    seqs = [t.greedy[i] for i in generated]
    teacher_len = np.asarray([len(s) for s in teacher_seqs], np.float64)
    # sequences are already cut at their lengths: no pad rule (a pad id may be a real token)
    match = greedy_match_length(teacher_seqs, seqs, eos_ids, None).astype(np.float64)
    mean_nll = t.nll / t.tokens if t.tokens else float("nan")
    out = {
        "params": int(m.num_params),
        "kl": t.kl / t.tokens if t.tokens else float("nan"),
        "top1": t.top1 / t.tokens if t.tokens else float("nan"),
        "nll": mean_nll,
        "ppl": math.exp(mean_nll) if math.isfinite(mean_nll) else float("nan"),
        "greedy_match": float(match.mean()) if generated else float("nan"),
        "greedy_match_fraction": float(np.mean(match / np.maximum(teacher_len, 1))) if generated else float("nan"),
        "greedy_length": float(np.mean([len(s) for s in seqs])) if generated else float("nan"),
        "accuracy": answer_accuracy([extract_answer(text(t.greedy[i])) for i in answered],
                                    [enc[i].answer for i in answered]),
        "safety_accuracy": safety_accuracy(np.concatenate(t.safety[0]), np.concatenate(t.safety[1]))
        if t.safety[0] else None,
        "verifier_ece": expected_calibration_error(np.concatenate(t.verifier[0]), np.concatenate(t.verifier[1]))
        if t.verifier[0] else None,
    }
    return {k: _nan_to_none(v) for k, v in out.items()}


def evaluate_models(teacher: Model, students: dict[str, Model], rows: Sequence[data.Row], *, max_prompt_len: int,
                    max_new_tokens: int, prompt_buckets: Sequence[int], batch_size: int, eos_ids: Sequence[int],
                    pad_id: int, n_samples: int = 3, chat: bool = True) -> dict:
    """The teacher and each student on the same rows, encoded and batched as the trainer does (data.encode_rows,
    data.Batcher buckets).

    Per model ("teacher" first, then the students in order): kl / top1 against the teacher and ppl, on the
    reference completions (teacher-forced; a row without one: on the teacher's greedy continuation);
    greedy_match (mean tokens before the greedy continuation leaves the teacher's), greedy_match_fraction (the
    same over the teacher's greedy length) and greedy_length; accuracy (extract_answer of the greedy text vs the
    rows' answers); safety_accuracy / verifier_ece when the params carry "safety_head" / "verifier" (else None).
    Plus `samples`: n_samples prompts with every model's greedy text. The teacher's own kl / top1 / greedy_match
    are computed like the others'."""
    tokenizer = teacher.tokenizer
    if tokenizer is None:
        raise ValueError(f"{teacher.source}: the teacher has no tokenizer")
    models = {"teacher": teacher, **students}
    if len(models) != len(students) + 1:
        raise ValueError("a student may not be called 'teacher'")
    rows = list(rows)
    if not rows:
        raise ValueError("no rows to evaluate")
    eos_ids = tuple(int(e) for e in eos_ids)
    n = int(max_new_tokens)
    enc = data.encode_rows(rows, tokenizer, max_prompt_len, n, eos_id=eos_ids[0] if eos_ids else None, chat=chat)
    start_time = time.time()
    tallies = {name: _Tally() for name in models}
    sample_fns = {name: make_sample_fn(m.config, n, GREEDY, eos_ids, int(pad_id)) for name, m in models.items()}
    with_reference = sum(bool(e.completion_ids) for e in enc)
    enc, teacher_refs = _teacher_references(teacher, enc, sample_fns["teacher"], batch_size, prompt_buckets, n, pad_id)
    for start, order, b, real in _batches(enc, batch_size, prompt_buckets, n, pad_id):
        _score_batch(models, tallies, sample_fns, start, order, b, real, n)

    def text(ids: list[int]) -> str:
        if ids and ids[-1] in eos_ids:
            ids = ids[:-1]
        return tokenizer.decode(ids, skip_special_tokens=True)

    generated = sorted(tallies["teacher"].greedy)
    answered = [i for i in generated if enc[i].answer is not None]
    teacher_seqs = [tallies["teacher"].greedy[i] for i in generated]
    per_model = {name: _summary(m, tallies[name], teacher_seqs, generated, answered, enc, eos_ids, text)
                 for name, m in models.items()}
    samples = [{"prompt": _prompt_text(rows[i]), "reference": rows[i].completion, "answer": rows[i].answer,
                **{name: text(tallies[name].greedy[i]) for name in models}} for i in generated[:n_samples]]
    return {
        "models": per_model, "samples": samples,
        "counts": {"rows": len(rows), "reference_tokens": int(tallies["teacher"].tokens),
                   "rows_with_reference": with_reference, "rows_with_teacher_reference": teacher_refs,
                   "rows_generated": len(generated),
                   "rows_with_answer": len(answered), "rows_with_safety_label": sum(e.safety_label >= 0 for e in enc)},
        "settings": {"max_prompt_len": max_prompt_len, "max_new_tokens": n, "prompt_buckets": list(prompt_buckets),
                     "batch_size": batch_size, "eos_ids": list(eos_ids), "pad_id": int(pad_id), "chat": chat},
        "wall_time_s": round(time.time() - start_time, 2),
    }


def evaluate_run(run_dir, n_rows: int | None = None, out_dir=None, data_source: str | None = None) -> dict:
    """Evaluate a finished run: its teacher, its student before distillation (rebuilt as the trainer builds it)
    and after (run_dir/student), on the rows the trainer held out, or on every row of `data_source` (any
    dataset file load_rows reads: prompts nobody trained on); the first n_rows of them when given. Writes
    <out_dir or run_dir/evaluation (/<data file stem> with data_source)>/metrics.json atomically and returns
    its content."""
    rows = None
    if data_source is not None:  # read (and check) before any model loads
        rows = data.load_rows(data_source)[:n_rows] if n_rows else data.load_rows(data_source)
    run_dir = pathlib.Path(run_dir)
    results_path = run_dir / "distillation_results.json"
    if not results_path.exists():
        raise FileNotFoundError(f"{run_dir}: no distillation_results.json (is it a finished run folder?)")
    results = json.loads(results_path.read_text())
    config = ml_collections.ConfigDict(results["config"])
    kept = results["student"].get("teacher_layers")  # the layers the run's student was cut from
    kept = tuple(kept) if kept else None
    if jax.process_count() > 1:  # several hosts: the writer evaluates alone, the teacher whole on its own device
        config.parallel.mode = "single"
    teacher_path, loaded = build.load_teacher(config)
    teacher, before, _ = build.reconcile_vocab(loaded, build.make_student(config, loaded, kept))
    after = load(run_dir / "student", config.student.dtype)
    _, policy = build.step_configs(config, teacher, kept)

    if rows is None:
        rows, _ = data.run_rows(config, loaded)  # the rows the trainer split (bad ones skipped as it did)
        _, heldout = data.split_heldout(rows, config.data.heldout_fraction, config.seed)
        if not heldout:
            raise ValueError(f"{run_dir}: the run held out no rows (data.heldout_fraction = "
                             f"{config.data.heldout_fraction}); nothing to evaluate on")
        heldout = heldout[:n_rows] if n_rows else heldout
    else:
        heldout = rows
    metrics = evaluate_models(teacher, {"before": before, "after": after}, heldout,
                              max_prompt_len=config.data.max_prompt_len, max_new_tokens=policy.max_new_tokens,
                              prompt_buckets=tuple(config.data.prompt_buckets), batch_size=config.train.batch_size,
                              eos_ids=policy.eos_ids, pad_id=policy.pad_id, chat=config.data.chat)
    metrics = {"run": config.run_name, "run_dir": str(run_dir), "teacher": str(teacher_path),
               "data": {"source": data_source or config.data.source, "heldout_fraction":
                        None if data_source else config.data.heldout_fraction,
                        "seed": config.seed, "heldout_rows": len(heldout)}, **metrics}
    default_dir = run_dir / "evaluation" / (pathlib.Path(data_source).stem if data_source else "")
    write_json(pathlib.Path(out_dir or default_dir) / "metrics.json", metrics)
    return metrics


def format_table(metrics: dict) -> str:
    """A plain-text table: one line per model (teacher, before, after), columns KL, top-1, ppl, greedy-match,
    accuracy ("-" where not measured)."""
    cols = (("KL", "kl", "{:.4f}"), ("top-1", "top1", "{:.3f}"), ("ppl", "ppl", "{:.2f}"),
            ("greedy-match", "greedy_match", "{:.2f}"), ("accuracy", "accuracy", "{:.3f}"))
    extra = [(h, k, f) for h, k, f in (("safety", "safety_accuracy", "{:.3f}"), ("ECE", "verifier_ece", "{:.3f}"))
             if any(m.get(k) is not None for m in metrics["models"].values())]
    cols = cols + tuple(extra)
    lines = [["model", *(h for h, _, _ in cols)]]
    for name, m in metrics["models"].items():
        lines.append([name, *("-" if m.get(k) is None else f.format(m[k]) for _, k, f in cols)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def heldout_loss(eval_fn, params, teacher_params, heldout_enc, config, max_new_tokens: int,
                 pad_id: int) -> float | None:
    """Mean objective over config.train.eval_batches held-out batches (dataset completions); None without any
    (no held-out row, or none with a completion: prompt-only rows and neither seq_kd nor references)."""
    if not any(e.completion_ids for e in heldout_enc):
        return None
    c = config
    hb = data.Batcher(heldout_enc, c.train.batch_size, c.seed, tuple(c.data.prompt_buckets), max_new_tokens, pad_id)
    vals = []
    for i in range(c.train.eval_batches):
        b = hb.batch(i)
        view = {k: jnp.asarray(b[k]) for k in ("input_ids", "attention_mask", "labels", "prompt_mask", "safety_label")}
        vals.append(float(eval_fn(params, teacher_params, view)["loss"]))
    return float(np.mean(vals))
