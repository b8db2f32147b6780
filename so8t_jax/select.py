"""Which teacher layers a cut student keeps (`student.select`): evenly spaced, or by measurement.

"kl" drops the blocks whose removal changes the teacher's output distribution least (ShortGPT's block
influence, measured directly as the KL divergence KL(teacher || teacher without those layers) per token on a
few batches of the run's own rows). With few enough subsets (C(Y, n) <= EXHAUSTIVE) every subset is scored
and the best kept; otherwise layers are removed one at a time: the first round scores removing each layer, later
rounds re-score only the BEAM layers whose latest removal scores are lowest, and the best of them goes.

Every subset is scored by one compiled forward pass (model.forward's keep_Y: a dropped layer passes its input
through), so the search compiles once whatever it tries.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax import model as model_lib
from so8t_jax.config import ModelConfig

EXHAUSTIVE = 256   # score every subset up to this many
BEAM = 4           # candidates re-scored per greedy round (the lowest latest removal scores)


def even_layers(n_teacher: int, n_layers: int) -> tuple[int, ...]:
    """`n_layers` evenly spaced teacher layer indices, first and last included."""
    return tuple(int(i) for i in np.unique(np.round(np.linspace(0, n_teacher - 1, n_layers)).astype(int)))


def keep_mask(n_teacher: int, kept) -> np.ndarray:
    """bool [n_teacher]: True at the kept layer indices (model.forward's keep_Y)."""
    mask = np.zeros(n_teacher, bool)
    mask[list(kept)] = True
    return mask


def make_scorer(params, cfg: ModelConfig, batches: Sequence[tuple[np.ndarray, ...]]):
    """score(keep: bool [Y]) -> mean KL(teacher || pruned teacher) per scored token over the batches
    (input_ids [B, L], attention_mask [B, L][, scored [B, L]: the tokens that count, default the valid ones);
    the teacher's log-probabilities are computed once. score.tokens: the tokens it averages over."""
    # params go in as jit arguments: closed over, they would be constants of the executable, copied into it and
    # constant-folded (a quantized teacher's dequantization done at compile time, for minutes)
    def log_probs(params, keep, tokens, mask):
        logits = model_lib.forward(params, cfg, tokens, mask_BxT=mask, keep_Y=keep).logits
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    @jax.jit
    def kl_sum(params, keep, tokens, mask, scored, ref_logp):
        logp = log_probs(params, keep, tokens, mask)
        kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
        return jnp.sum(jnp.where(scored > 0, kl, 0.0))

    full = jnp.ones((cfg.n_layers,), bool)
    data = [(jnp.asarray(b[0]), jnp.asarray(b[1]), jnp.asarray(b[2] if len(b) > 2 else b[1])) for b in batches]
    refs = [jax.jit(log_probs)(params, full, t, m) for t, m, _ in data]
    count = float(sum(np.asarray(w).sum() for _, _, w in data))

    def score(keep) -> float:
        keep = jnp.asarray(keep, bool)
        return float(sum(kl_sum(params, keep, t, m, w, r) for (t, m, w), r in zip(data, refs))) / count
    score.tokens = int(count)
    return score


def kl_layers(score, n_teacher: int, n_layers: int) -> tuple[tuple[int, ...], float]:
    """(kept layer indices, their KL): the subset of n_layers with the lowest score (exhaustive when small,
    else greedy removal with a beam of re-scored candidates)."""
    if not 1 <= n_layers <= n_teacher:
        raise ValueError(f"cannot keep {n_layers} of {n_teacher} layers")

    if math.comb(n_teacher, n_layers) <= EXHAUSTIVE:
        scored = [(score(keep_mask(n_teacher, kept)), kept)
                  for kept in itertools.combinations(range(n_teacher), n_layers)]
        best, kept = min(scored)
        return tuple(kept), best
    kept = list(range(n_teacher))
    last = {k: 0.0 for k in kept}  # each layer's latest removal score: the beam is the lowest BEAM of them
    best = 0.0
    while len(kept) > n_layers:
        beam = kept if len(kept) == n_teacher else sorted(kept, key=lambda k: (last[k], k))[:BEAM]
        for c in beam:
            last[c] = score(keep_mask(n_teacher, [k for k in kept if k != c]))
        best, drop = min((last[c], c) for c in beam)
        kept.remove(drop)
    return tuple(kept), best
