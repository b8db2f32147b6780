"""Losses on an output layer's logits, chunk_size tokens at a time, with their gradient formed in the same pass
(losses.chunked_divergence and chunked_cross_entropy are built on `head_chunks`).

Why by hand: a jax.checkpoint-ed chunk under lax.scan keeps memory at O(chunk * V) but its backward pass recomputes
every chunk's logits (two output-layer matmuls more per chunk for a teacher / student pair, the largest matmuls of a
small student); jax's autodiff cannot form the gradient inside the forward scan itself, and no maintained JAX
library does (Liger's and Apple's cut cross-entropy are PyTorch / Triton kernels). Axis letters:
so8t_jax/conventions.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from so8t_jax import quant

_F32 = jnp.float32


def _value(chunk_fn, h_chunks, heads, xs):
    """(sum of the chunks' parts, their aux stacked). h_chunks: K hidden states [W, C, D_k]; heads: K output
    layers [D_k, V]; xs: per-chunk leaves [W, C, ...]. chunk_fn(logits, x) -> (part, aux) takes one chunk's K
    fp32 logits [C, V] (quant.project: inputs in their dtype, fp32 accumulation; a quantized teacher head is
    dequantized a slice of the vocabulary at a time) and its x. A lax.scan: one chunk's logits at a time."""
    def step(total, inp):
        h_k, x = inp
        part, aux = chunk_fn(tuple(quant.project(h, w) for h, w in zip(h_k, heads)), x)
        return total + part, aux
    return jax.lax.scan(step, jnp.zeros((), _F32), (h_chunks, xs))


# Each chunk's logit cotangents become, in the forward scan, the hidden states' cotangent and the output layer's
# accumulated one. Only what is differentiated is computed (symbolic zeros: a frozen head, or the teacher's side
# under stop_gradient, costs nothing).
head_chunks = jax.custom_vjp(_value, nondiff_argnums=(0,))


def _fwd(chunk_fn, h_chunks, heads, xs):
    def value(tree):
        return jax.tree.map(lambda p: p.value, tree, is_leaf=lambda p: hasattr(p, "perturbed"))

    def perturbed(tree):
        return any(p.perturbed for p in jax.tree.leaves(tree, is_leaf=lambda p: hasattr(p, "perturbed")))
    need_h, need_w = tuple(perturbed(h) for h in h_chunks), tuple(perturbed(w) for w in heads)
    h_chunks, heads, xs = value(h_chunks), value(heads), value(xs)
    need = [k for k in range(len(heads)) if need_h[k] or need_w[k]]

    def step(carry, inp):
        total, d_heads = carry
        h_k, x = inp
        logits = [quant.project(h, w) for h, w in zip(h_k, heads)]

        def part_of(*needed):  # the chunk's part as a function of the differentiated pairs' logits
            return chunk_fn(tuple(needed[need.index(k)] if k in need else lg for k, lg in enumerate(logits)), x)
        part, vjp, aux = jax.vjp(part_of, *(logits[k] for k in need), has_aux=True)
        d_logits = vjp(jnp.ones((), _F32))
        d_h, d_heads = [None] * len(heads), list(d_heads)
        for d_lg, k in zip(d_logits, need):
            h, w = h_k[k], heads[k]
            d_lg = d_lg.astype(jnp.result_type(h, w))  # bf16 compute: bf16 operands, fp32 accumulation
            if need_h[k]:
                d_h[k] = jnp.einsum("CV,DV->CD", d_lg, w, preferred_element_type=_F32).astype(h.dtype)
            if need_w[k]:
                d_heads[k] = d_heads[k] + jnp.einsum("CD,CV->DV", h, d_lg, preferred_element_type=_F32)
        return (total + part, tuple(d_heads)), (aux, tuple(d_h))

    d_heads0 = tuple(jnp.zeros(w.shape, _F32) if need_w[k] else None for k, w in enumerate(heads))
    (total, d_heads), (aux, d_h) = jax.lax.scan(step, (jnp.zeros((), _F32), d_heads0), (h_chunks, xs))
    d_heads = tuple(None if d is None else d.astype(w.dtype) for d, w in zip(d_heads, heads))
    return (total, aux), (d_h, d_heads)


def _bwd(chunk_fn, residuals, cotangents):
    d_h, d_heads = residuals
    g = cotangents[0]  # the aux (argmax agreement) has no gradient
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None

    def scale(d):
        return None if d is None else (d * g).astype(d.dtype)
    return tuple(scale(d) for d in d_h), tuple(scale(d) for d in d_heads), None


head_chunks.defvjp(_fwd, _bwd, symbolic_zeros=True)
