"""One decoder for every family (llama, qwen2, phi3, gemma3): a pure function of (params, config, tokens).

Axis letters: so8t_jax/conventions.py

Parameters are a nested dict (a Flax-style parameter tree that Orbax saves and jit takes as an argument);
the layers are stacked on a leading Y axis and scanned, so compile time does not grow with depth:

    embed [V, D]   final_norm [D]   lm_head [D, V] (absent when tied)
    layers: attn_norm [Y, D]  q [Y, D, Q, H]  k, v [Y, D, K, H]  o [Y, Q, H, D]
            mlp_norm [Y, D]  gate, up [Y, D, F]  down [Y, F, D]
            q_bias [Y, Q, H], k_bias, v_bias [Y, K, H]        (attn_bias: qwen2)
            q_norm, k_norm [Y, H]                             (qk_norm: gemma3)
            post_attn_norm, post_mlp_norm [Y, D]              (post_norms: gemma3)
            attn_gate, mlp_gate [Y, Z, 28]  + so8t_alpha [] at the top level     (SO(8) gates, so8t.py)

Norm weights are stored as the effective multiplier (gemma's 1 + w is folded in at import).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax import so8t
from so8t_jax.config import ModelConfig, set_path

Params = dict[str, Any]
_NEG = -1e30  # finite, so a fully masked (padding) row gives a uniform softmax instead of NaN


class KVCache(NamedTuple):
    k_YxBxSxKxH: jax.Array
    v_YxBxSxKxH: jax.Array
    pos_BxS: jax.Array      # position of the token held in each slot, -1 when empty
    index: jax.Array        # next slot to write (scalar int32, shared by the batch)


class Output(NamedTuple):
    logits: jax.Array | None        # [B, T, V] float32 (None when logits=False)
    hidden: jax.Array               # [B, T, D] final hidden state after the final norm
    hiddens: jax.Array | None       # [Y, B, T, D] residual stream after each layer (output_hidden=True)
    cache: KVCache | None


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.full((batch, max_len), -1, jnp.int32), jnp.zeros((), jnp.int32))


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def _activation(cfg: ModelConfig, x):
    if cfg.activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def rope_tables(cfg: ModelConfig, positions_BxT, local: bool = False, context_len: int | None = None):
    """cos, sin [B, T, 2R] (2R = rotary_dim) in float32, HF's non-interleaved (rotate_half) layout.

    LongRoPE picks its long factors when the context outgrows rope_original_max: the context is
    `context_len` when given (a KV cache's capacity, as llama.cpp decides by n_ctx, so every cached key is
    rotated alike), else the longest position in the batch (as transformers decides for a full forward).
    """
    rd = cfg.rotary_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    attn_factor = 1.0
    if not local:
        attn_factor = cfg.rope_attn_factor
        if cfg.rope_factors_short is not None:
            short = jnp.asarray(inv_freq / np.asarray(cfg.rope_factors_short), jnp.float32)
            if cfg.rope_factors_long is not None and cfg.rope_original_max:
                long = jnp.asarray(inv_freq / np.asarray(cfg.rope_factors_long), jnp.float32)
                # LongRoPE: the long factors apply once the sequence outgrows the original context.
                use_long = (context_len if context_len is not None else jnp.max(positions_BxT) + 1) \
                    > cfg.rope_original_max
                inv_freq = jnp.where(use_long, long, short)
            else:
                inv_freq = short
    inv_freq_R = jnp.asarray(inv_freq, jnp.float32)
    angles_BxTxR = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_R
    angles_BxTx2R = jnp.concatenate([angles_BxTxR, angles_BxTxR], axis=-1)
    return jnp.cos(angles_BxTx2R) * attn_factor, jnp.sin(angles_BxTx2R) * attn_factor


def apply_rope(x_BxTx_xH, cos_BxTx2R, sin_BxTx2R):
    """Rotate the first 2R dims of queries [B, T, Q, H] or keys [B, T, K, H]; the rest pass through."""
    rd = cos_BxTx2R.shape[-1]
    x_rot, x_pass = x_BxTx_xH[..., :rd], x_BxTx_xH[..., rd:]
    x1, x2 = jnp.split(x_rot.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxTx2R[:, :, None, :], sin_BxTx2R[:, :, None, :]
    out = (x_rot.astype(jnp.float32) * cos + rotated * sin).astype(x_BxTx_xH.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if rd < x_BxTx_xH.shape[-1] else out


def _attend(cfg, q_BxTxQxH, k_BxSxKxH, v_BxSxKxH, bias_BxTxS):
    b, t, q_heads, h = q_BxTxQxH.shape
    k_heads = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxQxH.reshape(b, t, k_heads, q_heads // k_heads, h)
    scores_BxKxGxTxS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_BxSxKxH,
                                  preferred_element_type=jnp.float32) * cfg.scale
    scores_BxKxGxTxS = scores_BxKxGxTxS + bias_BxTxS[:, None, None]
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, q_heads, h)


def _layer(cfg: ModelConfig, x_BxTxD, p, rope_global, rope_local, is_sliding, biases, cache_kv, alpha=None):
    """One decoder block. cache_kv: (k, v, index) for this layer or None. Returns (x, (k, v)).

    SO(8) gates (when p holds them) act on the o / down projection's output, before any post-norm, so
    so8t.fold_gates can fold them into o and down exactly.
    """
    h = rms_norm(x_BxTxD, p["attn_norm"], cfg.norm_eps)
    q = jnp.einsum("BTD,DQH->BTQH", h, p["q"])
    k = jnp.einsum("BTD,DKH->BTKH", h, p["k"])
    v = jnp.einsum("BTD,DKH->BTKH", h, p["v"])
    if cfg.attn_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.norm_eps)
    cos, sin = rope_global
    if rope_local is not None:
        cos = jnp.where(is_sliding, rope_local[0], cos)
        sin = jnp.where(is_sliding, rope_local[1], sin)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache_kv is not None:
        k_cache, v_cache, index = cache_kv
        k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
    bias = jnp.where(is_sliding, biases[1], biases[0]) if biases[1] is not None else biases[0]
    attn = _attend(cfg, q, k.astype(q.dtype), v.astype(q.dtype), bias)
    attn_BxTxD = jnp.einsum("BTQH,QHD->BTD", attn, p["o"])
    if "attn_gate" in p:
        attn_BxTxD = so8t.apply_gate(attn_BxTxD, p["attn_gate"], alpha)
    if cfg.post_norms:
        attn_BxTxD = rms_norm(attn_BxTxD, p["post_attn_norm"], cfg.norm_eps)
    x_BxTxD = x_BxTxD + attn_BxTxD
    h = rms_norm(x_BxTxD, p["mlp_norm"], cfg.norm_eps)
    gate_BxTxF = _activation(cfg, jnp.einsum("BTD,DF->BTF", h, p["gate"]))
    up_BxTxF = jnp.einsum("BTD,DF->BTF", h, p["up"])
    mlp_BxTxD = jnp.einsum("BTF,FD->BTD", gate_BxTxF * up_BxTxF, p["down"])
    if "mlp_gate" in p:
        mlp_BxTxD = so8t.apply_gate(mlp_BxTxD, p["mlp_gate"], alpha)
    if cfg.post_norms:
        mlp_BxTxD = rms_norm(mlp_BxTxD, p["post_mlp_norm"], cfg.norm_eps)
    return x_BxTxD + mlp_BxTxD, (k, v)


def _mask_biases(cfg, q_pos_BxT, k_pos_BxS, k_valid_BxS):
    """Additive attention biases [B, T, S]: (full, sliding or None)."""
    visible = (k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]) & k_valid_BxS[:, None, :]
    full = jnp.where(visible, 0.0, _NEG).astype(jnp.float32)
    if not any(cfg.is_sliding) or cfg.sliding_window is None:
        return full, None
    near = (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < cfg.sliding_window
    return full, jnp.where(visible & near, 0.0, _NEG).astype(jnp.float32)


def embed(params: Params, cfg: ModelConfig, tokens_BxT):
    x = jnp.take(params["embed"], tokens_BxT, axis=0)
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
    return x


def lm_head(params: Params, cfg: ModelConfig):
    """The output projection [D, V] (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def forward(params: Params, cfg: ModelConfig, tokens_BxT, *, positions_BxT=None, mask_BxT=None,
            cache: KVCache | None = None, output_hidden: bool = False, logits: bool = True,
            remat: bool = False) -> Output:
    """Run the decoder.

    positions_BxT: token positions (default 0..T-1, or cumsum(mask)-1 when a mask is given, which suits
    left padding). mask_BxT: valid tokens (padding keys are never attended to). With a cache the new tokens
    are written at cache.index and attend to everything cached before them.
    """
    b, t = tokens_BxT.shape
    valid_BxT = jnp.ones((b, t), bool) if mask_BxT is None else mask_BxT.astype(bool)
    if positions_BxT is None:
        start = 0 if cache is None else cache.index
        positions_BxT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t)) if mask_BxT is None \
            else jnp.maximum(jnp.cumsum(valid_BxT, axis=1, dtype=jnp.int32) - 1, 0)
    positions_BxT = positions_BxT.astype(jnp.int32)
    if cache is not None:
        slot_pos = jnp.where(valid_BxT, positions_BxT, -1)
        pos_BxS = jax.lax.dynamic_update_slice_in_dim(cache.pos_BxS, slot_pos, cache.index, axis=1)
        k_pos, k_valid = pos_BxS, pos_BxS >= 0
    else:
        k_pos, k_valid = positions_BxT, valid_BxT
    biases = _mask_biases(cfg, positions_BxT, k_pos, k_valid)
    context_len = None if cache is None else cache.pos_BxS.shape[1]
    rope_global = rope_tables(cfg, positions_BxT, context_len=context_len)
    rope_local = rope_tables(cfg, positions_BxT, local=True) if cfg.rope_local_theta is not None else None
    sliding_Y = jnp.asarray(cfg.is_sliding)
    # the gates' alpha is set by the trainer from its schedule, never trained: no gradient flows to it
    alpha = jax.lax.stop_gradient(params["so8t_alpha"]) if so8t.has_gates(params) else None

    def body(x, xs):
        p, is_sliding, layer_cache = xs
        cache_kv = None if layer_cache is None else (*layer_cache, cache.index)
        x, kv = _layer(cfg, x, p, rope_global, rope_local, is_sliding, biases, cache_kv, alpha)
        return x, (x if output_hidden else None, kv if cache is not None else None)

    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    layer_caches = None if cache is None else (cache.k_YxBxSxKxH, cache.v_YxBxSxKxH)
    x = embed(params, cfg, tokens_BxT)
    x, (hiddens, kvs) = jax.lax.scan(body, x, (params["layers"], sliding_Y, layer_caches))
    hidden = rms_norm(x, params["final_norm"], cfg.norm_eps)
    out_logits = None
    if logits:
        out_logits = jnp.einsum("BTD,DV->BTV", hidden, lm_head(params, cfg),
                                preferred_element_type=jnp.float32)
    new_cache = None
    if cache is not None:
        new_cache = KVCache(kvs[0], kvs[1], pos_BxS, cache.index + t)
    return Output(out_logits, hidden, hiddens, new_cache)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat name -> shape of every parameter the config calls for ("layers/q" style keys)."""
    y, d, q, k, h, f = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    shapes = {"embed": (cfg.vocab_size, d), "final_norm": (d,),
              "layers/attn_norm": (y, d), "layers/q": (y, d, q, h), "layers/k": (y, d, k, h),
              "layers/v": (y, d, k, h), "layers/o": (y, q, h, d), "layers/mlp_norm": (y, d),
              "layers/gate": (y, d, f), "layers/up": (y, d, f), "layers/down": (y, f, d)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    if cfg.attn_bias:
        shapes.update({"layers/q_bias": (y, q, h), "layers/k_bias": (y, k, h), "layers/v_bias": (y, k, h)})
    if cfg.qk_norm:
        shapes.update({"layers/q_norm": (y, h), "layers/k_norm": (y, h)})
    if cfg.post_norms:
        shapes.update({"layers/post_attn_norm": (y, d), "layers/post_mlp_norm": (y, d)})
    return shapes


def init_params(cfg: ModelConfig, key, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) matrices, unit norms, zero biases) for a student from scratch."""
    params: Params = {}
    shapes = sorted(param_shapes(cfg).items())
    keys = jax.random.split(key, len(shapes))
    for (name, shape), sub in zip(shapes, keys):
        leaf = name.split("/")[-1]
        if leaf.endswith("norm"):
            value = jnp.ones(shape, dtype)
        elif leaf.endswith("bias"):
            value = jnp.zeros(shape, dtype)
        else:
            value = (std * jax.random.normal(sub, shape, jnp.float32)).astype(dtype)
        set_path(params, name, value, sep="/")
    return params


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
