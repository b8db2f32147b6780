"""The distillation objective of one batch: which terms are on (LossConfig), their global denominators
(count_targets) and their values (loss_terms). Pure functions; the step differentiates loss_terms.

Batch (TRL's convention): input_ids [B, L], attention_mask [B, L], labels [B, L] with -100 on the prompt,
padding and everything after the first EOS. Position t predicts token t+1, so every token-level term is
masked by labels[:, 1:] != -100 and divided by the GLOBAL count of such targets (over all devices and
accumulation micro-batches), which makes 1 device, pmap, mesh and accumulation give the same update.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from so8t_jax import losses, so8t
from so8t_jax import model as model_lib
from so8t_jax.model import REMAT_MODES
from so8t_jax.config import ModelConfig
from so8t_jax.conventions import IGNORE_INDEX
from so8t_jax.defaults import DEFAULTS

_D = DEFAULTS.loss
COMPUTE_DTYPES = ("float32", "bfloat16")


def in_compute_dtype(params, dtype: str):
    """Floating leaves cast to the compute dtype (a no-op for float32 masters in float32). The cast is inside
    the differentiated function, so gradients arrive in the master dtype and updates below the compute
    dtype's resolution still move the master weights."""
    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map(
        lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt else x, params)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the objectives (DESIGN.md section 3); a weight of 0 costs no compute.

    Seed names: kd_weight is the SO8T seed's alpha, ce_weight its beta (NOT the JSD beta), hidden_weight its
    gamma; jsd_beta is the GKD seed's beta (0 forward KL ... 1 reverse KL, TRL's convention).
    """
    divergence: str = _D.divergence      # forward_kl | reverse_kl | jsd
    jsd_beta: float = _D.jsd_beta
    temperature: float = _D.temperature  # loss temperature tau (forward/reverse KL carry tau^2; JSD, like TRL, not)
    kd_weight: float = _D.kd_weight
    ce_weight: float = _D.ce_weight
    hidden_weight: float = _D.hidden_weight
    so8t_weight: float = _D.so8t_weight  # relational Gram loss (lambda_so8t)
    pet_weight: float = _D.pet_weight
    safety_weight: float = _D.safety_weight  # lambda_safety: the safety head on the last prompt token (needs heads)
    verification_weight: float = _D.verification_weight  # lambda_verification: the per-token verifier head
    safety_class_weights: tuple[float, float, float] = tuple(_D.safety_class_weights)  # allow, escalate, deny
    chunk_size: int = _D.chunk_size      # > 0: chunked losses from hidden states, never [B, L, V] logits
    layer_map: tuple[tuple[int, int], ...] | None = None  # student -> teacher layer pairs for hidden terms
    compute_dtype: str = DEFAULTS.train.compute_dtype  # the student's forward / backward dtype (train.compute_dtype)
    remat: str = DEFAULTS.train.remat      # the student's layer-scan rematerialisation (train.remat)

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
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"train.compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.remat not in REMAT_MODES:
            raise ValueError(f"train.remat must be one of {REMAT_MODES}, got {self.remat!r}")

    @property
    def needs_heads(self) -> bool:
        return needs_heads(self)

    @property
    def weights(self) -> dict[str, float]:
        """The weight of each term's name in loss_terms."""
        return {"kd": self.kd_weight, "ce": self.ce_weight, "hidden": self.hidden_weight, "so8t": self.so8t_weight,
                "pet": self.pet_weight, "safety": self.safety_weight, "verification": self.verification_weight}


def needs_heads(loss) -> bool:
    """Whether the safety / verification terms are on (a LossConfig or a run config's `loss` block)."""
    return loss.safety_weight > 0 or loss.verification_weight > 0


def count_targets(labels, safety_labels=None, safety_class_weights=(1.0, 3.0, 5.0)) -> dict[str, jax.Array]:
    """Denominators of the token-, triple- and sequence-level means over the whole (local) batch: valid
    next-token targets (labels[..., 1:] != -100), valid consecutive triples (PET), sequences with a target
    (relational loss), and with safety_labels the summed class weights of the labelled rows (safety loss).
    Works with an accumulation axis; pmap sums them over devices."""
    valid = labels[..., 1:] != IGNORE_INDEX
    triples = valid[..., 2:] & valid[..., 1:-1] & valid[..., :-2]
    counts = {"targets": jnp.sum(valid).astype(jnp.float32), "triples": jnp.sum(triples).astype(jnp.float32),
              "sequences": jnp.sum(jnp.any(valid, axis=-1)).astype(jnp.float32)}
    if safety_labels is not None:
        counts["safety"] = losses.safety_weight_sum(safety_labels, safety_class_weights)
    return counts


def batch_counts(batch, lc: LossConfig) -> dict[str, jax.Array]:
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
    student = trainable["student"]
    if lc.needs_heads and not so8t.has_heads(student):
        raise KeyError("loss.safety_weight / loss.verification_weight > 0 need the student's SO8T heads "
                       "(so8t.init_heads)")
    student = in_compute_dtype(student, lc.compute_dtype)
    s_out, t_out = _forwards(student, teacher_params, batch, s_cfg, t_cfg, lc)
    target_mask_BxL = batch["labels"][:, 1:] != IGNORE_INDEX
    terms, agree_BxL = _token_terms(student, teacher_params, s_out, t_out, batch, counts, s_cfg, t_cfg, lc)
    terms.update(_head_terms(student, s_out, t_out, batch, counts, agree_BxL, lc))
    if lc.hidden_weight > 0 or lc.so8t_weight > 0:
        terms.update(_hidden_terms(trainable, s_out, t_out, target_mask_BxL, counts, s_cfg, t_cfg, lc))
    if lc.pet_weight > 0:
        terms["pet"] = losses.pet_loss(s_out.hidden[:, :-1], target_mask_BxL, num_valid=counts["triples"])
    terms["loss"] = sum(w * terms[k] for k, w in lc.weights.items() if k in terms)
    return terms


def _forwards(student, teacher_params, batch, s_cfg, t_cfg, lc: LossConfig):
    """The student's forward pass (in the compute dtype, rematerialised as lc.remat says) and, under
    stop_gradient and only when a term needs it, the teacher's (in the dtype it is stored in); [B, L, V] logits
    only without chunking, hidden states of every layer only for the hidden terms."""
    tokens, attn = batch["input_ids"], batch["attention_mask"]
    context = tokens.shape[1]  # LongRoPE's rule as in sampling: the [prompt P, completion N] capacity
    need_hidden = lc.hidden_weight > 0 or lc.so8t_weight > 0
    verify = lc.verification_weight > 0
    need_logits = lc.chunk_size == 0 and (lc.kd_weight > 0 or lc.ce_weight > 0 or verify)
    s_out = model_lib.forward(student, s_cfg, tokens, mask_BxT=attn, output_hidden=need_hidden, logits=need_logits,
                              remat=lc.remat, context_len=context)
    t_out = None
    if lc.kd_weight > 0 or need_hidden or verify:
        t_out = jax.lax.stop_gradient(model_lib.forward(
            teacher_params, t_cfg, tokens, mask_BxT=attn, output_hidden=need_hidden,
            logits=need_logits and (lc.kd_weight > 0 or verify), context_len=context))
    return s_out, t_out


def _token_terms(student, teacher_params, s_out, t_out, batch, counts, s_cfg, t_cfg, lc: LossConfig):
    """kd (the divergence) and ce, plus the [B, L-1] argmax agreement when the verifier needs it (from the
    chunked divergence when chunking, so no [B, L, V] logits)."""
    labels = batch["labels"]
    target_mask_BxL = labels[:, 1:] != IGNORE_INDEX
    num_valid = counts["targets"]
    verify = lc.verification_weight > 0
    terms, agree_BxL = {}, None
    s0 = _first_target(batch)  # the chunked losses' first position
    if lc.kd_weight > 0 or (verify and lc.chunk_size):
        kw = dict(kind=lc.divergence, beta=lc.jsd_beta, temperature=lc.temperature, num_valid=num_valid)
        if lc.chunk_size:
            kd = losses.chunked_divergence(
                s_out.hidden[:, s0:-1], model_lib.lm_head(student, s_cfg), t_out.hidden[:, s0:-1],
                model_lib.lm_head(teacher_params, t_cfg), target_mask_BxL[:, s0:], chunk_size=lc.chunk_size,
                return_agreement=verify, **kw)
            kd, agree_BxL = kd if verify else (kd, None)
            if verify:  # back to [B, L-1]: no prompt position is a target
                agree_BxL = jnp.pad(agree_BxL, ((0, 0), (s0, 0)))
        else:
            kd = losses.divergence(s_out.logits[:, :-1], t_out.logits[:, :-1], target_mask_BxL, **kw)
        if lc.kd_weight > 0:
            terms["kd"] = kd
    if verify and agree_BxL is None:
        agree_BxL = losses.argmax_agreement(s_out.logits[:, :-1], t_out.logits[:, :-1])
    if lc.ce_weight > 0:
        if lc.chunk_size:
            terms["ce"] = losses.chunked_cross_entropy(s_out.hidden[:, s0:-1], model_lib.lm_head(student, s_cfg),
                                                       labels[:, 1 + s0:], lc.chunk_size, num_valid=num_valid)
        else:
            terms["ce"] = losses.cross_entropy(s_out.logits[:, :-1], labels[:, 1:], num_valid=num_valid)
    return terms, agree_BxL


def _first_target(batch) -> int:
    """The first position (of the shifted [B, L-1] view) that can be a target: a batch [prompt P | completion N]
    (data.Batcher's rows and every sampled sequence; a {"text"} row is an empty prompt) has labels only in its
    completion, so the chunked losses skip the P - 1 prompt positions' lm_head matmuls (a third to two thirds of
    each model's vocabulary projection at the usual prompt buckets). 0 for a batch without prompt_ids."""
    return batch["prompt_ids"].shape[-1] - 1 if "prompt_ids" in batch else 0


def _head_terms(student, s_out, t_out, batch, counts, agree_BxL, lc: LossConfig):
    """The SO8T heads' terms: the verifier against the argmax agreement, the safety head on the last prompt
    token."""
    terms = {}
    if lc.verification_weight > 0:
        target_mask_BxL = batch["labels"][:, 1:] != IGNORE_INDEX
        terms["verification"] = losses.verification_bce(
            so8t.verifier_logits(student, s_out.hidden[:, :-1]), agree_BxL.astype(jnp.float32), target_mask_BxL,
            counts["targets"])
    if lc.safety_weight > 0:
        prompt_mask_BxP = batch["prompt_mask"]
        logits_Bx3 = so8t.safety_logits(student, s_out.hidden[:, :prompt_mask_BxP.shape[-1]], prompt_mask_BxP)
        terms["safety"] = losses.safety_loss(logits_Bx3, batch["safety_label"], lc.safety_class_weights,
                                             total_weight=counts["safety"])
    return terms


def _hidden_terms(trainable, s_out, t_out, target_mask_BxL, counts, s_cfg, t_cfg, lc: LossConfig):
    """Hidden-state matching through the learned projection and the relational Gram loss, over the layer map."""
    layer_map = lc.layer_map or losses.default_layer_map(s_cfg.n_layers, t_cfg.n_layers)
    hs_YxBxLxD, ht_YxBxLxD = s_out.hiddens[:, :, :-1], t_out.hiddens[:, :, :-1]
    terms = {}
    if lc.hidden_weight > 0:
        terms["hidden"] = losses.hidden_matching(hs_YxBxLxD, ht_YxBxLxD, trainable["proj"], target_mask_BxL,
                                                 layer_map, counts["targets"])
    if lc.so8t_weight > 0:
        terms["so8t"] = losses.relational_gram_loss(hs_YxBxLxD, ht_YxBxLxD, target_mask_BxL, layer_map,
                                                    num_sequences=counts["sequences"])
    return terms
