"""Distillation objectives (DESIGN.md section 3): pure functions, fp32 math whatever the input dtype.

Conventions shared by the token-level losses:
- `mask_BxL` marks valid target tokens (nonzero = valid). Masked entries are replaced by zeros before any
  math, so their contents (even inf/NaN) reach neither the value nor the gradient.
- Masked means divide by the number of valid tokens, or by `num_valid` when given (the global count over
  devices / accumulation steps). A zero count gives 0, never NaN.
Axis letters: so8t_jax/conventions.py.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from so8t_jax import fused_head
from so8t_jax.conventions import IGNORE_INDEX

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd")
_F32 = jnp.float32


# ---------------------------------------------------------------------------------------------- helpers


def _valid(mask):
    return jnp.asarray(mask) != 0


def _safe_div(total, count):
    return total / jnp.where(count > 0, count, 1.0)


def _count(valid, num_valid):
    return jnp.sum(valid, dtype=_F32) if num_valid is None else jnp.asarray(num_valid, _F32)


def _masked_mean(values, valid, num_valid=None):
    """sum(values[valid]) / (num_valid or valid.sum()); 0 when the count is 0."""
    return _safe_div(jnp.sum(jnp.where(valid, values, 0.0)), _count(valid, num_valid))


def _zero_invalid(x, valid):
    """Zeroes the entries of invalid tokens; valid's axes are x's leading axes."""
    valid = valid.reshape(valid.shape + (1,) * (x.ndim - valid.ndim))
    return jnp.where(valid, x, jnp.zeros((), x.dtype))


def _kl(logp, logq):
    """KL(p || q) over the last axis, from log-probabilities."""
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _check_beta(beta):
    try:
        beta = float(beta)
    except TypeError as e:  # includes jax's ConcretizationTypeError for traced values
        raise TypeError("beta must be a static Python float (its endpoints are special-cased)") from e
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return beta


def _per_token_divergence(student_logits, teacher_logits, kind, beta, temperature):
    """Logits [..., V] -> per-token divergence [...] of the given kind (see forward_kl, reverse_kl,
    generalized_jsd)."""
    logp_s = jax.nn.log_softmax(student_logits.astype(_F32) / temperature, axis=-1)
    logp_t = jax.nn.log_softmax(teacher_logits.astype(_F32) / temperature, axis=-1)
    if kind == "forward_kl":
        return temperature**2 * _kl(logp_t, logp_s)
    if kind == "reverse_kl":
        return temperature**2 * _kl(logp_s, logp_t)
    if kind != "jsd":
        raise ValueError(f"kind must be one of {DIVERGENCE_KINDS}, got {kind!r}")
    beta = _check_beta(beta)
    if beta == 0.0:  # TRL: F.kl_div(student_log_probs, teacher_log_probs) = KL(p_T || p_S)
        return _kl(logp_t, logp_s)
    if beta == 1.0:  # TRL: F.kl_div(teacher_log_probs, student_log_probs) = KL(p_S || p_T)
        return _kl(logp_s, logp_t)
    log_m = jnp.logaddexp(logp_s + jnp.log1p(jnp.asarray(-beta, _F32)), logp_t + jnp.log(jnp.asarray(beta, _F32)))
    return beta * _kl(logp_t, log_m) + (1.0 - beta) * _kl(logp_s, log_m)


def _token_nll(logits, labels):
    """-log softmax(logits)[label] in fp32: logits [..., V] (or [..., 3] classes), labels [...] in range."""
    logits = logits.astype(_F32)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return logsumexp(logits, axis=-1) - label_logit


def _ce_validity(labels_BxL, mask_BxL):
    valid_BxL = labels_BxL != IGNORE_INDEX
    if mask_BxL is not None:
        valid_BxL = valid_BxL & _valid(mask_BxL)
    return valid_BxL, jnp.where(valid_BxL, labels_BxL, 0)


# ----------------------------------------------------------------------------------- logit divergences


def divergence(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL, kind, beta=0.5, temperature=1.0,
               num_valid=None):
    """forward_kl / reverse_kl / generalized_jsd selected by `kind` (beta is used by "jsd" only)."""
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"kind must be one of {DIVERGENCE_KINDS}, got {kind!r}")
    valid_BxL = _valid(mask_BxL)
    per_token_BxL = _per_token_divergence(_zero_invalid(student_logits_BxLxV, valid_BxL),
                                          _zero_invalid(teacher_logits_BxLxV, valid_BxL),
                                          kind, beta, temperature)
    return _masked_mean(per_token_BxL, valid_BxL, num_valid)


def forward_kl(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL, temperature=1.0, num_valid=None):
    """Hinton KD: tau^2 * KL(p_T^tau || p_S^tau), masked mean over tokens."""
    return divergence(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL, "forward_kl",
                      temperature=temperature, num_valid=num_valid)


def reverse_kl(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL, temperature=1.0, num_valid=None):
    """tau^2 * KL(p_S^tau || p_T^tau), masked mean over tokens."""
    return divergence(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL, "reverse_kl",
                      temperature=temperature, num_valid=num_valid)


def generalized_jsd(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL, beta, temperature=1.0,
                    num_valid=None):
    """TRL's GKDTrainer.generalized_jsd_loss(labels=-100 where mask is 0, reduction="batchmean").

    Logits / tau, log_softmax; M = beta p_T + (1 - beta) p_S in log space;
    JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M), summed over V, mean over valid tokens.
    Like TRL there is NO tau^2 factor (unlike forward_kl / reverse_kl). `beta` must be a static Python
    float: beta = 0 is special-cased to KL(p_T || p_S) and beta = 1 to KL(p_S || p_T). Endpoint jump: as
    beta -> 0 the mixture form -> 0 (M -> p_S), while beta = 0 is the full forward KL; same at beta -> 1.
    `num_valid` plays the role of TRL's `num_items_in_batch`.
    """
    return divergence(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL, "jsd", beta, temperature,
                      num_valid)


def cross_entropy(student_logits_BxLxV, labels_BxL, mask_BxL=None, num_valid=None):
    """Hard CE on labels; labels == -100 are always ignored, `mask_BxL` (optional) restricts further."""
    valid_BxL, labels_BxL = _ce_validity(labels_BxL, mask_BxL)
    nll_BxL = _token_nll(_zero_invalid(student_logits_BxLxV, valid_BxL), labels_BxL)
    return _masked_mean(nll_BxL, valid_BxL, num_valid)


# ------------------------------------------------------------------------------ chunked (no [B, L, V])


def _chunk_plan(shape_BxL, chunk_size):
    n_tokens = shape_BxL[0] * shape_BxL[1]
    chunk_size = max(1, min(int(chunk_size), n_tokens))
    return chunk_size, -n_tokens % chunk_size


def _to_chunks(x_BxLx_, chunk_size, n_pad):
    """[B, L, ...] -> [W, C, ...] (C = chunk_size): flattened tokens plus n_pad zero rows (masked out)."""
    flat = x_BxLx_.reshape((-1,) + x_BxLx_.shape[2:])  # [B * L, ...]
    flat = jnp.pad(flat, [(0, n_pad)] + [(0, 0)] * (flat.ndim - 1))  # [W * C, ...]
    return flat.reshape((-1, chunk_size) + flat.shape[1:])


def chunked_divergence(student_hidden_BxLxDs, student_head_DsxV, teacher_hidden_BxLxDt, teacher_head_DtxV,
                       mask_BxL, kind="forward_kl", beta=0.5, temperature=1.0, chunk_size=1024,
                       num_valid=None, return_agreement=False):
    """`divergence` of the logits hidden @ head, computed chunk_size tokens at a time.

    A lax.scan over token chunks whose gradient is formed in the same pass (_head_chunks): memory is
    O(chunk_size * V), never O(B * L * V), and no logits are recomputed. With return_agreement=True, returns
    (loss, agree_BxL), agree = [argmax student == argmax teacher] (no gradient; the verification target;
    meaningless at masked tokens).
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"kind must be one of {DIVERGENCE_KINDS}, got {kind!r}")
    beta = _check_beta(beta) if kind == "jsd" else 0.0
    valid_BxL = _valid(mask_BxL)
    chunk, n_pad = _chunk_plan(valid_BxL.shape, chunk_size)
    hs_WxCxDs = _to_chunks(_zero_invalid(student_hidden_BxLxDs, valid_BxL), chunk, n_pad)
    ht_WxCxDt = _to_chunks(_zero_invalid(teacher_hidden_BxLxDt, valid_BxL), chunk, n_pad)
    valid_WxC = _to_chunks(valid_BxL, chunk, n_pad)

    def chunk_sum(logits, valid_C):
        logits_s_CxV, logits_t_CxV = logits
        per_token_C = _per_token_divergence(logits_s_CxV, logits_t_CxV, kind, beta, temperature)
        part = jnp.sum(jnp.where(valid_C, per_token_C, 0.0))
        if not return_agreement:
            return part, None
        return part, jax.lax.stop_gradient(jnp.argmax(logits_s_CxV, -1) == jnp.argmax(logits_t_CxV, -1))

    total, agree_WxC = fused_head.head_chunks(chunk_sum, (hs_WxCxDs, ht_WxCxDt), (student_head_DsxV, teacher_head_DtxV),
                                    valid_WxC)
    loss = _safe_div(total, _count(valid_BxL, num_valid))
    if not return_agreement:
        return loss
    return loss, agree_WxC.reshape(-1)[: valid_BxL.size].reshape(valid_BxL.shape)


def chunked_cross_entropy(hidden_BxLxD, head_DxV, labels_BxL, chunk_size=1024, mask_BxL=None,
                          num_valid=None):
    """`cross_entropy` of the logits hidden @ head, chunk_size tokens at a time (fused_head.head_chunks: the gradient
    formed in the same pass)."""
    valid_BxL, labels_BxL = _ce_validity(labels_BxL, mask_BxL)
    chunk, n_pad = _chunk_plan(valid_BxL.shape, chunk_size)
    h_WxCxD = _to_chunks(_zero_invalid(hidden_BxLxD, valid_BxL), chunk, n_pad)
    labels_WxC = _to_chunks(labels_BxL, chunk, n_pad)
    valid_WxC = _to_chunks(valid_BxL, chunk, n_pad)

    def chunk_sum(logits, x):
        labels_C, valid_C = x
        return jnp.sum(jnp.where(valid_C, _token_nll(logits[0], labels_C), 0.0)), None

    total, _ = fused_head.head_chunks(chunk_sum, (h_WxCxD,), (head_DxV,), (labels_WxC, valid_WxC))
    return _safe_div(total, _count(valid_BxL, num_valid))


# --------------------------------------------------------------------------------- hidden-state losses


def default_layer_map(n_student, n_teacher):
    """Evenly spaced pairs (i, j), j = round_half_up((i + 1) * n_teacher / n_student) - 1 (clipped at 0).

    Student layer i stands for the first (i + 1) / n_student of the depth: the last student layer maps to
    the last teacher layer, and equal depths give the identity.
    """
    if n_student < 1 or n_teacher < 1:
        raise ValueError(f"need at least one layer on each side, got {n_student=}, {n_teacher=}")
    # Integer round-half-up: Python's round() rounds half to even.
    return tuple((i, max(0, (2 * (i + 1) * n_teacher + n_student) // (2 * n_student) - 1))
                 for i in range(n_student))


def _gather_pairs(student_hiddens_YsxBxLxDs, teacher_hiddens_YtxBxLxDt, layer_map):
    """The mapped layers' hiddens: student [Y, B, L, Ds], teacher [Y, B, L, Dt], Y = len(layer_map)."""
    layer_map = tuple((int(i), int(j)) for i, j in layer_map)
    if not layer_map:
        raise ValueError("layer_map is empty")
    idx_s_Y = jnp.asarray([i for i, _ in layer_map])
    idx_t_Y = jnp.asarray([j for _, j in layer_map])
    return student_hiddens_YsxBxLxDs[idx_s_Y], teacher_hiddens_YtxBxLxDt[idx_t_Y]


def hidden_matching(student_hiddens_YsxBxLxDs, teacher_hiddens_YtxBxLxDt, projection_DsxDt, mask_BxL,
                    layer_map, num_valid=None):
    """Mean over mapped pairs (i, j) and valid tokens of ||h_S[i] W - h_T[j]||^2 / Dt.

    Hiddens are stacked per layer on axis 0 and layer_map's indices index that axis.
    """
    valid_BxL = _valid(mask_BxL)
    hs_YxBxLxDs, ht_YxBxLxDt = _gather_pairs(student_hiddens_YsxBxLxDs, teacher_hiddens_YtxBxLxDt, layer_map)
    hs_YxBxLxDs = _zero_invalid(hs_YxBxLxDs.astype(_F32), valid_BxL[None])
    ht_YxBxLxDt = _zero_invalid(ht_YxBxLxDt.astype(_F32), valid_BxL[None])
    proj_YxBxLxDt = jnp.einsum("YBLs,st->YBLt", hs_YxBxLxDs, projection_DsxDt.astype(_F32))  # s, t: Ds, Dt
    err_BxL = jnp.mean(jnp.square(proj_YxBxLxDt - ht_YxBxLxDt), axis=(0, 3))
    return _masked_mean(err_BxL, valid_BxL, num_valid)


def _normalized_rows(h_BxLxD, valid_BxL, eps=1e-12):
    h_BxLxD = _zero_invalid(h_BxLxD.astype(_F32), valid_BxL)
    sq_BxLx1 = jnp.sum(jnp.square(h_BxLxD), axis=-1, keepdims=True)
    return h_BxLxD * jax.lax.rsqrt(jnp.maximum(sq_BxLx1, eps))


@jax.checkpoint  # backward keeps the inputs, not one pair of [B, L, L] Grams per mapped layer pair
def _gram_sq_error(hs_BxLxDs, ht_BxLxDt, valid_BxL):
    ns_BxLxDs, nt_BxLxDt = _normalized_rows(hs_BxLxDs, valid_BxL), _normalized_rows(ht_BxLxDt, valid_BxL)
    gram_s_BxLxL = jnp.einsum("BLD,BlD->BLl", ns_BxLxDs, ns_BxLxDs)  # l: the second token axis
    gram_t_BxLxL = jnp.einsum("BLD,BlD->BLl", nt_BxLxDt, nt_BxLxDt)
    return jnp.sum(jnp.square(gram_s_BxLxL - gram_t_BxLxL), axis=(1, 2))


def relational_gram_loss(student_hiddens_YsxBxLxDs, teacher_hiddens_YtxBxLxDt, mask_BxL, layer_map,
                         num_sequences=None):
    """SO8T relational loss: ||G_S - G_T||_F^2 / n_valid^2 per sequence, G = H^ H^T over valid tokens.

    Rows of H^ are L2-normalised, so the loss is invariant to orthogonal maps of either feature space and
    works across widths. Mean over the sequences that have a valid token, then over mapped pairs;
    `num_sequences`, if given, overrides the (global) count of such sequences.
    """
    valid_BxL = _valid(mask_BxL)
    hs_YxBxLxDs, ht_YxBxLxDt = _gather_pairs(student_hiddens_YsxBxLxDs, teacher_hiddens_YtxBxLxDt, layer_map)
    n_pairs = hs_YxBxLxDs.shape[0]
    sq_err_B = sum(_gram_sq_error(hs_YxBxLxDs[y], ht_YxBxLxDt[y], valid_BxL) for y in range(n_pairs))
    n_B = jnp.sum(valid_BxL, axis=-1, dtype=_F32)
    per_seq_B = _safe_div(sq_err_B / n_pairs, jnp.square(n_B))
    return _masked_mean(per_seq_B, n_B > 0, num_sequences)


def pet_loss(hidden_BxLxD, mask_BxL, num_valid=None):
    """Mean over valid triples (t, t+1, t+2 all valid) of ||h_{t+2} - 2 h_{t+1} + h_t||^2 / D.

    0 when no triple is valid (e.g. L < 3). `num_valid`, if given, overrides the (global) triple count.
    """
    valid_BxL = _valid(mask_BxL)
    h_BxLxD = _zero_invalid(hidden_BxLxD.astype(_F32), valid_BxL)
    # one entry per triple start t: L - 2 of them
    accel_BxLxD = h_BxLxD[:, 2:] - 2.0 * h_BxLxD[:, 1:-1] + h_BxLxD[:, :-2]
    triple_valid_BxL = valid_BxL[:, 2:] & valid_BxL[:, 1:-1] & valid_BxL[:, :-2]
    return _masked_mean(jnp.mean(jnp.square(accel_BxLxD), axis=-1), triple_valid_BxL, num_valid)


# ------------------------------------------------------------------------------------------- aux heads


def _safety_row_weights(labels_B, class_weights):
    """[B] class weight of each labelled row (label >= 0), 0 for unlabelled rows (-1)."""
    weights_3 = jnp.asarray(class_weights, _F32)
    labelled_B = labels_B >= 0
    return jnp.where(labelled_B, weights_3[jnp.where(labelled_B, labels_B, 0)], 0.0)


def safety_weight_sum(labels_B, class_weights: Sequence[float] = (1.0, 3.0, 5.0)):
    """The safety loss's denominator: the summed class weights of the labelled rows (label >= 0)."""
    return jnp.sum(_safety_row_weights(labels_B, class_weights))


def safety_loss(safety_logits_Bx3, labels_B, class_weights: Sequence[float] = (1.0, 3.0, 5.0),
                total_weight=None):
    """Class-weighted CE normalised by the summed weights of the labelled rows (label -1: unlabelled).

    Equals torch CrossEntropyLoss(weight=class_weights, ignore_index=-1, reduction="mean"), except that no
    labelled row gives 0 instead of NaN. total_weight: the global denominator (`safety_weight_sum` over every
    device and micro-batch) so that shards add up to the full batch's loss.
    """
    if safety_logits_Bx3.shape[-1] != len(class_weights):
        raise ValueError(f"{safety_logits_Bx3.shape[-1]} classes but {len(class_weights)} class weights")
    labelled_B = labels_B >= 0
    nll_B = _token_nll(_zero_invalid(safety_logits_Bx3, labelled_B), jnp.where(labelled_B, labels_B, 0))
    weight_B = _safety_row_weights(labels_B, class_weights)
    return _masked_mean(weight_B * nll_B, labelled_B, jnp.sum(weight_B) if total_weight is None else total_weight)


def argmax_agreement(student_logits_BxLxV, teacher_logits_BxLxV):
    """[argmax p_S == argmax p_T] per token, under stop_gradient: the verification target."""
    agree_BxL = jnp.argmax(student_logits_BxLxV, -1) == jnp.argmax(teacher_logits_BxLxV, -1)
    return jax.lax.stop_gradient(agree_BxL)


def verification_bce(verifier_logits_BxL, target_BxL, mask_BxL, num_valid=None):
    """BCE-with-logits of the verifier against a 0/1 target (stop_gradient), masked mean over tokens."""
    valid_BxL = _valid(mask_BxL)
    x_BxL = jnp.where(valid_BxL, verifier_logits_BxL.astype(_F32), 0.0)
    z_BxL = jax.lax.stop_gradient(jnp.where(valid_BxL, jnp.asarray(target_BxL).astype(_F32), 0.0))
    return _masked_mean(jax.nn.softplus(x_BxL) - x_BxL * z_BxL, valid_BxL, num_valid)


def verification_loss(verifier_logits_BxL, student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL,
                      num_valid=None):
    """verification_bce against z = [argmax p_S == argmax p_T]."""
    target_BxL = argmax_agreement(student_logits_BxLxV, teacher_logits_BxLxV)
    return verification_bce(verifier_logits_BxL, target_BxL, mask_BxL, num_valid)
