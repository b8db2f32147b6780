"""Distillation quality metrics, pure functions (arrays in, numbers out): per-token terms in float32 (jit-able),
their means in float64 on the host; teacher-forced KL / top-1 / perplexity, greedy-match length, final-answer
extraction and accuracy, safety-head accuracy, expected calibration error. evaluate.py applies them to models.

Teacher-forced metrics score the reference completions only: the logits at position t are compared where
labels[:, t + 1] != -100 (the trainer's shift). An empty selection gives NaN.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax.conventions import IGNORE_INDEX

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


def _host_mean(values, mask) -> float:
    """float64 mean of values where mask (on the host; losses.py has the in-graph, globally counted one)."""
    values, mask = np.asarray(values, np.float64), np.asarray(mask) != 0
    n = int(mask.sum())
    return float(np.where(mask, values, 0.0).sum() / n) if n else float("nan")


# ---------------------------------------------------------------------------------- metrics


def token_kl(teacher_logits_BxLxV, student_logits_BxLxV, mask_BxL) -> float:
    """Mean over valid tokens of KL(p_T || p_S) (nats per token)."""
    return _host_mean(per_token_kl(teacher_logits_BxLxV, student_logits_BxLxV), mask_BxL)


def top1_agreement(teacher_logits_BxLxV, student_logits_BxLxV, mask_BxL) -> float:
    """Fraction of valid tokens where the teacher's and the student's argmax agree."""
    return _host_mean(per_token_agreement(teacher_logits_BxLxV, student_logits_BxLxV), mask_BxL)


def perplexity(logits_BxLxV, labels_BxL) -> float:
    """exp(mean NLL) of labels[:, 1:] under logits[:, :-1]; -100 labels are ignored."""
    labels_BxL = np.asarray(labels_BxL)
    return math.exp(_host_mean(per_token_nll(logits_BxLxV, labels_BxL), labels_BxL[:, 1:] != IGNORE_INDEX))


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
    return _host_mean(np.argmax(np.asarray(logits_Bx3), axis=-1) == labels_B, labels_B >= 0)
