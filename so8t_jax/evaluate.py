"""Evaluation of a distillation run (DESIGN.md section 8): teacher, student before and student after.

    metrics = evaluate_run("checkpoints/smoke")          # writes checkpoints/smoke/evaluation/metrics.json
    print(format_table(metrics))

Pure metrics first (arrays in, numbers out; per-token terms in float32 on the device, means in float64 on
the host), then `evaluate_models` (the same held-out rows through every model) and `evaluate_run` (rebuilds a
run's three models and its exact held-out rows from distillation_results.json).

Conventions: teacher-forced metrics score the reference completions only: the logits at position t are
compared where labels[:, t + 1] != -100 (the trainer's shift), so prompts, padding and everything after the
first EOS are ignored. An empty selection gives NaN from the metric functions and None in the JSON.
"""
from __future__ import annotations

import functools
import math
import pathlib
import re
import time
import unicodedata
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax import data, so8t
from so8t_jax import model as model_lib
from so8t_jax.loading import Model
from so8t_jax.sampling import GREEDY, make_sample_fn

IGNORE_INDEX = -100
_F32 = jnp.float32


# ---------------------------------------------------------------------------------- per-token (jit-able)


def per_token_kl(teacher_logits_BxLxV, student_logits_BxLxV):
    """KL(p_T || p_S) at every position, [B, L] float32 (terms with p_T = 0 count 0, even against -inf)."""
    logp_t = jax.nn.log_softmax(jnp.asarray(teacher_logits_BxLxV, _F32), axis=-1)
    logp_s = jax.nn.log_softmax(jnp.asarray(student_logits_BxLxV, _F32), axis=-1)
    p_t = jnp.exp(logp_t)
    return jnp.sum(jnp.where(p_t > 0, p_t * (logp_t - logp_s), 0.0), axis=-1)


def per_token_agreement(teacher_logits_BxLxV, student_logits_BxLxV):
    """1.0 where the two argmaxes agree, [B, L] float32."""
    return (jnp.argmax(jnp.asarray(teacher_logits_BxLxV), -1)
            == jnp.argmax(jnp.asarray(student_logits_BxLxV), -1)).astype(_F32)


def per_token_nll(logits_BxLxV, labels_BxL):
    """Next-token NLL: -log p(labels[:, t + 1] | logits[:, t]), [B, L - 1] float32 (0 where the label is -100)."""
    labels_BxL = jnp.asarray(labels_BxL)
    targets = labels_BxL[:, 1:]
    logp = jax.nn.log_softmax(jnp.asarray(logits_BxLxV, _F32)[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets != IGNORE_INDEX, -picked, 0.0)


def _masked_mean(values, mask) -> float:
    values, mask = np.asarray(values, np.float64), np.asarray(mask) != 0
    n = int(mask.sum())
    return float(np.where(mask, values, 0.0).sum() / n) if n else float("nan")


# ---------------------------------------------------------------------------------- metrics


def token_kl(teacher_logits_BxLxV, student_logits_BxLxV, mask_BxL) -> float:
    """Mean over valid tokens of KL(p_T || p_S) (nats per token)."""
    return _masked_mean(per_token_kl(teacher_logits_BxLxV, student_logits_BxLxV), mask_BxL)


def top1_agreement(teacher_logits_BxLxV, student_logits_BxLxV, mask_BxL) -> float:
    """Fraction of valid tokens where the teacher's and the student's argmax agree."""
    return _masked_mean(per_token_agreement(teacher_logits_BxLxV, student_logits_BxLxV), mask_BxL)


def perplexity(logits_BxLxV, labels_BxL) -> float:
    """exp(mean NLL) of labels[:, 1:] under logits[:, :-1]; -100 labels are ignored."""
    labels_BxL = np.asarray(labels_BxL)
    return math.exp(_masked_mean(per_token_nll(logits_BxLxV, labels_BxL), labels_BxL[:, 1:] != IGNORE_INDEX))


def _valid_length(tokens: Sequence[int], eos_ids, pad_id) -> int:
    """Tokens up to and including the first EOS; without one, all but the trailing padding."""
    tokens = [int(t) for t in tokens]
    eos = set(int(e) for e in eos_ids)
    for i, t in enumerate(tokens):
        if t in eos:
            return i + 1
    n = len(tokens)
    while pad_id is not None and n and tokens[n - 1] == pad_id:
        n -= 1
    return n


def greedy_match_length(teacher_tokens, student_tokens, eos_ids: Sequence[int] = (),
                        pad_id: int | None = None) -> np.ndarray:
    """Per row, how many tokens the student's continuation shares with the teacher's before they first differ.

    Rows are arrays [B, N] or ragged lists. Each sequence ends at its first EOS (the EOS counts: two equal
    sequences match over their whole length, EOS included) or, without one, before its trailing pad_id run.
    A sequence that ends while the other goes on stops the match there."""
    out = []
    for t_row, s_row in zip(teacher_tokens, student_tokens):
        t_row, s_row = list(t_row), list(s_row)
        n = min(_valid_length(t_row, eos_ids, pad_id), _valid_length(s_row, eos_ids, pad_id))
        k = 0
        while k < n and int(t_row[k]) == int(s_row[k]):
            k += 1
        out.append(k)
    return np.asarray(out, np.int64)


_NUMBER = re.compile(r"(?<!\d)-?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_answer(text: str | None) -> str | None:
    """The final answer of a completion: the rest of the line after "####" when present (GSM8K style), else
    the last number in the text ("1,234" -> "1234", "3.5." -> "3.5", "-7"), else None. Full-width digits
    are folded to ASCII (NFKC) first."""
    if text is None:
        return None
    text = unicodedata.normalize("NFKC", text)
    if "####" in text:
        rest = text.split("####", 1)[1].strip()
        rest = rest.splitlines()[0].strip() if rest else ""
        if rest:
            return rest
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def normalize_answer(answer: str | None) -> str | None:
    """strip, drop commas and a final period, casefold, and "42.0" -> "42", "3.50" -> "3.5"."""
    if answer is None:
        return None
    s = unicodedata.normalize("NFKC", str(answer)).strip().replace(",", "").rstrip("。.").strip().casefold()
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def answer_accuracy(predictions: Sequence[str | None], answers: Sequence[str | None]) -> float:
    """Exact-match fraction after normalize_answer (a None prediction is wrong); NaN for no rows."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return float("nan")
    hits = [p is not None and normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)]
    return float(np.mean(hits))


def expected_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """Equal-width-bin ECE: sum over bins (lo, hi] (the first also takes 0) of |bin| / n * |accuracy - mean
    confidence|. NaN for no samples."""
    conf = np.asarray(confidences, np.float64).ravel()
    hit = np.asarray(correct, np.float64).ravel()
    if conf.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.sum() / conf.size * abs(hit[sel].mean() - conf[sel].mean())
    return float(ece)


def safety_accuracy(logits_Bx3, labels_B) -> float:
    """Fraction of labelled rows (label >= 0; -1 = unlabelled) whose argmax is the label; NaN for none."""
    labels_B = np.asarray(labels_B)
    return _masked_mean(np.argmax(np.asarray(logits_Bx3), axis=-1) == labels_B, labels_B >= 0)


# ---------------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=32)
def _score_fn(cfg, n_completion: int):
    """jit: (params, input_ids_BxT, mask_BxT) -> logits [B, N+1, V] of the positions that predict the last
    N+1 tokens (position P-1, the last prompt token, predicts the first completion token), plus the safety
    head's [B, 3] on the last prompt token and the verifier's [B, N+1] when the params carry them."""
    def fn(params, input_ids_BxT, mask_BxT):
        hidden = model_lib.forward(params, cfg, input_ids_BxT, mask_BxT=mask_BxT, logits=False).hidden
        h_BxMxD = hidden[:, hidden.shape[1] - n_completion - 1:]
        logits = jnp.einsum("BMD,DV->BMV", h_BxMxD, model_lib.lm_head(params, cfg), preferred_element_type=_F32)
        n_prompt = hidden.shape[1] - n_completion
        safety = so8t.safety_logits(params, hidden[:, :n_prompt], mask_BxT[:, :n_prompt]) \
            if "safety_head" in params else None
        verifier = so8t.verifier_logits(params, h_BxMxD) if "verifier" in params else None
        return logits, safety, verifier
    return jax.jit(fn)


@jax.jit
def _token_stats(teacher_logits, student_logits, labels_BxM):
    t, s = teacher_logits[:, :-1], student_logits[:, :-1]
    return per_token_kl(t, s), per_token_agreement(t, s), per_token_nll(student_logits, labels_BxM)


def _prompt_text(row: data.Row) -> str:
    if row.prompt is None or isinstance(row.prompt, str):
        return row.prompt or ""
    return "\n".join(f"{m['role']}: {m['content']}" for m in row.prompt)


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def evaluate_models(teacher: Model, students: dict[str, Model], rows: Sequence[data.Row], *, max_prompt_len: int,
                    max_new_tokens: int, prompt_buckets: Sequence[int], batch_size: int, eos_ids: Sequence[int],
                    pad_id: int, n_samples: int = 3, chat: bool = True) -> dict:
    """The teacher and each student on the same rows, encoded and batched as the trainer does (data.encode_rows,
    data.Batcher buckets; the last batch is filled with copies that count for nothing, so shapes repeat).

    Per model ("teacher" first, then the students in order): kl / top1 against the teacher and ppl, on the
    reference completions (teacher-forced); greedy_match (mean tokens before the greedy continuation leaves
    the teacher's), greedy_match_fraction (the same over the teacher's greedy length) and greedy_length;
    accuracy (extract_answer of the greedy text vs the rows' answers); safety_accuracy / verifier_ece when
    the params carry "safety_head" / "verifier" (else None). Plus `samples`: n_samples prompts with every
    model's greedy text. The teacher's own kl / top1 / greedy_match are computed like the others'."""
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
    sums = {name: dict.fromkeys(("kl", "top1", "nll", "tokens"), 0.0) for name in models}
    greedy: dict[str, dict[int, list[int]]] = {name: {} for name in models}
    safety = {name: ([], []) for name in models}
    verifier = {name: ([], []) for name in models}
    sample_fns = {name: make_sample_fn(m.config, n, GREEDY, eos_ids, int(pad_id)) for name, m in models.items()}

    for start in range(0, len(enc), batch_size):
        chunk = enc[start:start + batch_size]
        batcher = data.Batcher(chunk + [chunk[0]] * (batch_size - len(chunk)), batch_size, 0,
                               tuple(prompt_buckets), n, int(pad_id))
        order, b = batcher.indices(0), batcher.batch(0)
        real = order < len(chunk)
        labels = np.where(real[:, None], b["labels"], IGNORE_INDEX)
        labels_BxM = jnp.asarray(labels[:, labels.shape[1] - n - 1:])
        target = np.asarray(labels_BxM[:, 1:] != IGNORE_INDEX)
        has_prompt = real & (b["prompt_mask"].sum(1) > 0)
        safety_labels = np.where(real, b["safety_label"], -1)
        ids, mask = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
        teacher_logits = None
        for name, m in models.items():
            logits, s_logits, v_logits = _score_fn(m.config, n)(m.params, ids, mask)
            if teacher_logits is None:
                teacher_logits = logits
            kl, agree, nll = jax.device_get(_token_stats(teacher_logits, logits, labels_BxM))
            acc = sums[name]
            acc["kl"] += float(np.where(target, kl, 0.0).astype(np.float64).sum())
            acc["top1"] += float(np.where(target, agree, 0.0).astype(np.float64).sum())
            acc["nll"] += float(np.where(target, nll, 0.0).astype(np.float64).sum())
            acc["tokens"] += float(target.sum())
            if s_logits is not None:
                safety[name][0].append(np.asarray(s_logits))
                safety[name][1].append(safety_labels)
            if v_logits is not None:
                conf = np.asarray(jax.nn.sigmoid(v_logits[:, :-1]))
                verifier[name][0].append(conf[target])
                verifier[name][1].append(np.asarray(agree)[target])
            if has_prompt.any():
                out = jax.device_get(sample_fns[name](m.params, jnp.asarray(b["prompt_ids"]),
                                                      jnp.asarray(b["prompt_mask"]), None))
                for slot in np.flatnonzero(has_prompt):
                    greedy[name][start + int(order[slot])] = out.tokens_BxN[slot, :out.lengths_B[slot]].tolist()

    def text(ids: list[int]) -> str:
        if ids and ids[-1] in eos_ids:
            ids = ids[:-1]
        return tokenizer.decode(ids, skip_special_tokens=True)

    generated = sorted(greedy["teacher"])
    answered = [i for i in generated if enc[i].answer is not None]
    teacher_seqs = [greedy["teacher"][i] for i in generated]
    teacher_len = np.asarray([len(s) for s in teacher_seqs], np.float64)
    per_model = {}
    for name, m in models.items():
        acc = sums[name]
        tokens = acc["tokens"]
        seqs = [greedy[name][i] for i in generated]
        # sequences are already cut at their lengths: no pad rule (a pad id may be a real token)
        match = greedy_match_length(teacher_seqs, seqs, eos_ids, None).astype(np.float64)
        mean_nll = acc["nll"] / tokens if tokens else float("nan")
        s_logits, s_labels = safety[name]
        v_conf, v_hit = verifier[name]
        per_model[name] = {
            "params": int(m.num_params),
            "kl": acc["kl"] / tokens if tokens else float("nan"),
            "top1": acc["top1"] / tokens if tokens else float("nan"),
            "nll": mean_nll,
            "ppl": math.exp(mean_nll) if math.isfinite(mean_nll) else float("nan"),
            "greedy_match": float(match.mean()) if generated else float("nan"),
            "greedy_match_fraction": float(np.mean(match / np.maximum(teacher_len, 1))) if generated
            else float("nan"),
            "greedy_length": float(np.mean([len(s) for s in seqs])) if generated else float("nan"),
            "accuracy": answer_accuracy([extract_answer(text(greedy[name][i])) for i in answered],
                                        [enc[i].answer for i in answered]),
            "safety_accuracy": safety_accuracy(np.concatenate(s_logits), np.concatenate(s_labels))
            if s_logits else None,
            "verifier_ece": expected_calibration_error(np.concatenate(v_conf), np.concatenate(v_hit))
            if v_conf else None,
        }
        per_model[name] = {k: _nan_to_none(v) for k, v in per_model[name].items()}
    samples = [{"prompt": _prompt_text(rows[i]), "reference": rows[i].completion, "answer": rows[i].answer,
                **{name: text(greedy[name][i]) for name in models}} for i in generated[:n_samples]]
    return {
        "models": per_model, "samples": samples,
        "counts": {"rows": len(rows), "reference_tokens": int(sums["teacher"]["tokens"]),
                   "rows_with_reference": sum(bool(e.completion_ids) for e in enc), "rows_generated": len(generated),
                   "rows_with_answer": len(answered), "rows_with_safety_label": sum(e.safety_label >= 0 for e in enc)},
        "settings": {"max_prompt_len": max_prompt_len, "max_new_tokens": n, "prompt_buckets": list(prompt_buckets),
                     "batch_size": batch_size, "eos_ids": list(eos_ids), "pad_id": int(pad_id), "chat": chat},
        "wall_time_s": round(time.time() - start_time, 2),
    }


# ---------------------------------------------------------------------------------- a run


def evaluate_run(run_dir, n_rows: int | None = None, out_dir=None) -> dict:
    """Evaluate a finished run: its teacher, its student before distillation (rebuilt as the trainer builds it)
    and after (run_dir/student), on the rows the trainer held out (the first n_rows of them when given).
    Writes <out_dir or run_dir/evaluation>/metrics.json atomically and returns its content."""
    import json

    import ml_collections

    from so8t_jax.loading import load
    from so8t_jax.runs import write_json
    from so8t_jax.trainer import make_student, reconcile_vocab, resolve_teacher_path, run_configs

    run_dir = pathlib.Path(run_dir)
    results_path = run_dir / "distillation_results.json"
    if not results_path.exists():
        raise FileNotFoundError(f"{run_dir}: no distillation_results.json (is it a finished run folder?)")
    config = ml_collections.ConfigDict(json.loads(results_path.read_text())["config"])
    teacher_path = resolve_teacher_path(config.teacher.path)
    teacher = load(teacher_path, config.teacher.dtype)
    teacher, before, _ = reconcile_vocab(teacher, make_student(config, teacher))
    after = load(run_dir / "student", config.student.dtype)
    _, policy = run_configs(config, teacher.config, teacher.tokenizer)

    rows = data.load_rows(config.data.source)
    _, heldout = data.split_heldout(rows, config.data.heldout_fraction, config.seed)
    if not heldout:
        raise ValueError(f"{run_dir}: the run held out no rows (data.heldout_fraction = "
                         f"{config.data.heldout_fraction}); nothing to evaluate on")
    heldout = heldout[:n_rows] if n_rows else heldout
    metrics = evaluate_models(teacher, {"before": before, "after": after}, heldout,
                              max_prompt_len=config.data.max_prompt_len, max_new_tokens=policy.max_new_tokens,
                              prompt_buckets=tuple(config.data.prompt_buckets), batch_size=config.train.batch_size,
                              eos_ids=policy.eos_ids, pad_id=policy.pad_id, chat=config.data.chat)
    metrics = {"run": config.run_name, "run_dir": str(run_dir), "teacher": str(teacher_path),
               "data": {"source": config.data.source, "heldout_fraction": config.data.heldout_fraction,
                        "seed": config.seed, "heldout_rows": len(heldout)}, **metrics}
    write_json(pathlib.Path(out_dir or run_dir / "evaluation") / "metrics.json", metrics)
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
