"""FLOP counts of a distillation step: the model FLOPs that utilisation divides by (from the shapes alone) and
the program FLOPs of a traced function (the matmuls of its jaxpr, every loop body times its trip count).

Why by hand: XLA's `compiled.cost_analysis()` counts a while loop's body once, so for a decoder whose layers are
scanned it reports one layer's work (tests/test_flops.py shows it), and jax has no counter of its own that
multiplies loop bodies. Both counts here take only matmuls (dot_general, 2 FLOPs per multiply-add): the
elementwise work (norms, softmax, rope) is under 1% at the shapes benchmarked and is not what a GPU's peak
measures.

Model FLOPs (`forward_flops`, `step_flops`), the convention MFU uses (PaLM's appendix B; MaxText's calculator):
the weights' matmuls at every token, attention's two products over the keys each query can see (causal, sliding
windows), the output layer at the positions whose logits are used; a backward pass is twice its forward; nothing
recomputed (rematerialisation) counts, nor padding. The program count includes all of that.
"""
from __future__ import annotations

import math

import jax

from so8t_jax.config import ModelConfig


def layer_weights(cfg: ModelConfig) -> int:
    """Weights one decoder layer multiplies each token by: q, k, v, o and the gated MLP's three matrices."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return cfg.d_model * (2 * q + 2 * kv) + 3 * cfg.d_model * cfg.ffn_dim


def _visible_keys(length: int, past: int, window: int | None) -> int:
    """Query-key pairs of one row and head: query i (0-based, after `past` cached tokens) sees keys 0..past+i,
    the last `window` of them on a sliding layer."""
    total = 0
    for i in range(length):
        seen = past + i + 1
        total += min(seen, window) if window else seen
    return total


def forward_flops(cfg: ModelConfig, batch: int, length: int, head_positions: int, *, past: int = 0,
                  keys: int | None = None) -> int:
    """Matmul FLOPs of one forward of `length` new tokens per row after `past` cached ones, with the output layer
    at `head_positions` of them. keys=None counts attention over the keys each query sees (model FLOPs); keys=S
    counts every query against S keys, as dense attention kernels compute it (program FLOPs)."""
    weights = 2 * batch * length * cfg.n_layers * layer_weights(cfg)
    pairs = 0
    for sliding in cfg.is_sliding:
        window = cfg.sliding_window if sliding else None
        pairs += length * keys if keys is not None else _visible_keys(length, past, window)
    attention = 4 * batch * cfg.n_heads * cfg.head_dim * pairs
    return weights + attention + 2 * batch * head_positions * cfg.d_model * cfg.vocab_size


def sample_flops(cfg: ModelConfig, batch: int, prompt_len: int, new: int) -> int:
    """Model FLOPs of sampling `new` tokens after `prompt_len`-token prompts with a KV cache: the prefill (logits
    at the last prompt position) and new - 1 decode steps (the first token comes from the prefill)."""
    decode = sum(forward_flops(cfg, batch, 1, 1, past=prompt_len + i) for i in range(new - 1))
    return forward_flops(cfg, batch, prompt_len, 1) + decode


def step_flops(s_cfg: ModelConfig, t_cfg: ModelConfig, batch: int, prompt_len: int, new: int, *,
               on_policy: bool = False) -> dict[str, int]:
    """Model FLOPs of one distillation step on [prompt | completion] rows: the teacher's forward, the student's
    forward and backward (3x its forward), the output layers at the completion's positions (the chunked losses
    start at the last prompt position), and with on_policy the student sampling the completion first."""
    length = prompt_len + new
    teacher = forward_flops(t_cfg, batch, length, new)
    student = 3 * forward_flops(s_cfg, batch, length, new)
    sample = sample_flops(s_cfg, batch, prompt_len, new) if on_policy else 0
    return {"teacher": teacher, "student": student, "sample": sample, "total": teacher + student + sample}


# --------------------------------------------------------------------------------- the traced program's count

def _dot_flops(eqn) -> int:
    """2 x (product of the left operand's dims) x (the right operand's dims that are neither contracted nor batch)."""
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    return 2 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch))


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr, while_trips: int | None = None) -> int:
    """Matmul FLOPs of a jaxpr: scan bodies times their length, while bodies times while_trips (an error if one
    is met without it), the costlier branch of a cond, every other sub-jaxpr (jit, checkpoint, custom rules) once."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr, while_trips)
        elif name == "while":
            if while_trips is None:
                raise ValueError("the program has a while loop: pass while_trips, its trip count")
            body = jaxpr_flops(eqn.params["body_jaxpr"].jaxpr, while_trips)
            total += while_trips * (body + jaxpr_flops(eqn.params["cond_jaxpr"].jaxpr, while_trips))
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr, while_trips) for b in eqn.params["branches"])
        else:
            for value in eqn.params.values():
                total += sum(jaxpr_flops(sub, while_trips) for sub in _sub_jaxprs(value))
    return total


def program_flops(fn, *args, while_trips: int | None = None) -> int:
    """Matmul FLOPs fn(*args) performs, traced (not compiled), recomputation included."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr, while_trips)
