"""One decoder for every family (llama, mistral, qwen2, qwen3, phi3, gemma3): a pure function of
(params, config, tokens).

Axis letters: so8t_jax/conventions.py

Parameters are a nested dict (a Flax-style parameter tree that Orbax saves and jit takes as an argument);
the layers are stacked on a leading Y axis and scanned, so compile time does not grow with depth:

    embed [V, D]   final_norm [D]   lm_head [D, V] (absent when tied)
    layers: attn_norm [Y, D]  q [Y, D, Q, H]  k, v [Y, D, K, H]  o [Y, Q, H, D]
            mlp_norm [Y, D]  gate, up [Y, D, F]  down [Y, F, D]
            q_bias [Y, Q, H], k_bias, v_bias [Y, K, H]        (attn_bias: qwen2)
            q_norm, k_norm [Y, H]                             (qk_norm: gemma3, qwen3)
            post_attn_norm, post_mlp_norm [Y, D]              (post_norms: gemma3)
            attn_gate, mlp_gate [Y, Z, 28]  + so8t_alpha [] at the top level     (SO(8) gates, so8t.py)

Norm weights are stored as the effective multiplier (gemma's 1 + w is folded in at import). A quantized teacher's
matrices and embeddings are quant.QuantizedWeight leaves: quant.einsum / quant.take / quant.project dequantize them
in the trace (the output layer a slice of the vocabulary at a time).

Attention: a forward without a cache (training, scoring) and a prefill into a cache go through
jax.nn.dot_product_attention with a boolean mask (causal by position, padding keys out, gemma3's sliding window on
its sliding layers), cuDNN flash attention where it applies (attention_implementation), XLA elsewhere. A decode step
(one new token against a cache) reads the layer's cached keys / values in place plus its own (_attend_decode), and
only its slot of the cache is written, once, after the layer scan.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax import quant, so8t
from so8t_jax.config import ModelConfig, set_path

Params = dict[str, Any]
_NEG = -1e30  # a masked score in the decode attention (finite: no inf arithmetic; every row sees a key)
REMAT_MODES = ("none", "dots", "full")  # train.remat
# "dots": keep the outputs of matmuls without batch dimensions (the q / k / v / o and MLP projections), recompute
# the rest, attention scores [B, K, G, T, S] included: the projections are where the FLOPs are, the scores are
# where the memory is (jax.checkpoint_dots would keep those too). "full": keep only each layer's input.
_REMAT_POLICIES = {"none": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                   "full": jax.checkpoint_policies.nothing_saveable}


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


def _cudnn_head_dim_max() -> int:
    """The largest head dim cuDNN flash attention takes on this machine's first device: 0 off CUDA GPUs, 128
    before Hopper, 256 from Hopper on (jax's check_is_flash_attention)."""
    device = jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in getattr(device.client, "platform_version", "").lower():
        return 0
    major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
    return 256 if major >= 9 else 128


def attention_implementation(q_BxTxQxH, k_BxSxKxH) -> str:
    """"cudnn" (cuDNN flash attention) where it applies: a CUDA GPU, bf16 / fp16, head dim a multiple of 8 up
    to the device's limit, even query and key lengths (cuDNN's condition for a mask in training); else "xla"
    (jax's einsum-softmax-einsum, every dtype and device)."""
    h, t, s = q_BxTxQxH.shape[-1], q_BxTxQxH.shape[1], k_BxSxKxH.shape[1]
    if (q_BxTxQxH.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and t % 2 == 0 and s % 2 == 0
            and h <= _cudnn_head_dim_max()):
        return "cudnn"
    return "xla"


def _open_unseen(q_BxTxQxH, mask_BxTxS):
    """A query row that sees no key (a row of padding only) attends uniformly to every key, as it did under the
    former additive -1e30 bias: its mask row is opened and its query zeroed, so all its scores are 0. No
    implementation then meets a fully masked row (no NaN)."""
    seen_BxT = jnp.any(mask_BxTxS, axis=-1)
    return (jnp.where(seen_BxT[:, :, None, None], q_BxTxQxH, jnp.zeros((), q_BxTxQxH.dtype)),
            mask_BxTxS | ~seen_BxT[:, :, None])


def attend(cfg: ModelConfig, q_BxTxQxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, *, causal: bool = False,
           implementation: str | None = None):
    """Masked attention [B, T, Q, H] through jax.nn.dot_product_attention (GQA: K divides Q; softmax scale
    cfg.scale; softmax in float32). mask_BxTxS: True where a query sees a key. causal=True promises that no
    valid query slot sees a key slot past its own (a forward without a cache): cuDNN then skips the blocks above
    the diagonal (padding query rows can then differ from XLA's, which keeps the mask alone; valid rows never
    read them). implementation: None picks attention_implementation()."""
    k_BxSxKxH, v_BxSxKxH = k_BxSxKxH.astype(q_BxTxQxH.dtype), v_BxSxKxH.astype(q_BxTxQxH.dtype)
    implementation = implementation or attention_implementation(q_BxTxQxH, k_BxSxKxH)
    q_BxTxQxH, mask_BxTxS = _open_unseen(q_BxTxQxH, mask_BxTxS)
    return jax.nn.dot_product_attention(q_BxTxQxH, k_BxSxKxH, v_BxSxKxH, mask=mask_BxTxS[:, None],
                                        scale=cfg.scale, is_causal=causal and implementation == "cudnn",
                                        implementation=implementation)


def _attend_decode(cfg: ModelConfig, q_BxTxQxH, k_cache_BxSxKxH, v_cache_BxSxKxH, k_BxTxKxH, v_BxTxKxH,
                   mask_BxTx_):
    """Attention of new queries to the cache's slots then to the new tokens themselves (mask_BxTx_: [B, T,
    S + T], the slots the new tokens will overwrite already masked out), without writing the new keys into a
    copy of the cache: a decode step reads each layer's cache in place, once. The same einsums and float32
    softmax as attend's XLA path."""
    b, t, q_heads, h = q_BxTxQxH.shape
    k_heads, s = k_cache_BxSxKxH.shape[2], k_cache_BxSxKxH.shape[1]
    q_BxTxQxH, mask_BxTx_ = _open_unseen(q_BxTxQxH, mask_BxTx_)
    q_BxTxKxGxH = q_BxTxQxH.reshape(b, t, k_heads, q_heads // k_heads, h)
    scores_BxKxGxTxS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_cache_BxSxKxH.astype(q_BxTxQxH.dtype),
                                  preferred_element_type=jnp.float32)
    # lowercase t: the new tokens as keys
    new_scores_BxKxGxTxT = jnp.einsum("BTKGH,BtKH->BKGTt", q_BxTxKxGxH, k_BxTxKxH.astype(q_BxTxQxH.dtype),
                                      preferred_element_type=jnp.float32)
    scores = jnp.concatenate([scores_BxKxGxTxS, new_scores_BxKxGxTxT], axis=-1) * cfg.scale
    scores = jnp.where(mask_BxTx_[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxQxH.dtype)
    out_BxTxKxGxH = (jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., :s], v_cache_BxSxKxH.astype(q_BxTxQxH.dtype))
                     + jnp.einsum("BKGTt,BtKH->BTKGH", probs[..., s:], v_BxTxKxH.astype(q_BxTxQxH.dtype)))
    return out_BxTxKxGxH.reshape(b, t, q_heads, h)


def _layer(cfg: ModelConfig, x_BxTxD, p, rope_global, rope_local, is_sliding, masks, layer_cache, index,
           alpha=None):
    """One decoder block. layer_cache: this layer's (k, v) [B, S, K, H] cache, read only, or None; the new
    tokens go to slots index.. (forward writes them after the scan). Returns (x, (k, v) of the new tokens,
    in the cache's dtype when there is a cache).

    SO(8) gates (when p holds them) act on the o / down projection's output, before any post-norm, so
    so8t.fold_gates can fold them into o and down exactly.
    """
    h = rms_norm(x_BxTxD, p["attn_norm"], cfg.norm_eps)
    q = quant.einsum("BTD,DQH->BTQH", h, p["q"])  # quant.einsum: p may hold quantized matrices (quant.py)
    k = quant.einsum("BTD,DKH->BTKH", h, p["k"])
    v = quant.einsum("BTD,DKH->BTKH", h, p["v"])
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
    mask = masks[0] if masks[1] is None else jnp.where(is_sliding, masks[1], masks[0])
    if layer_cache is None:
        attn = attend(cfg, q, k, v, mask, causal=True)
    else:
        k_cache, v_cache = layer_cache
        k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)  # attention sees what the cache holds
        if x_BxTxD.shape[1] == 1:
            attn = _attend_decode(cfg, q, k_cache, v_cache, k, v, mask)
        else:
            attn = attend(cfg, q, jax.lax.dynamic_update_slice_in_dim(k_cache, k, index, axis=1),
                          jax.lax.dynamic_update_slice_in_dim(v_cache, v, index, axis=1), mask)
    attn_BxTxD = quant.einsum("BTQH,QHD->BTD", attn, p["o"])
    if "attn_gate" in p:
        attn_BxTxD = so8t.apply_gate(attn_BxTxD, p["attn_gate"], alpha)
    if cfg.post_norms:
        attn_BxTxD = rms_norm(attn_BxTxD, p["post_attn_norm"], cfg.norm_eps)
    x_BxTxD = x_BxTxD + attn_BxTxD
    h = rms_norm(x_BxTxD, p["mlp_norm"], cfg.norm_eps)
    gate_BxTxF = _activation(cfg, quant.einsum("BTD,DF->BTF", h, p["gate"]))
    up_BxTxF = quant.einsum("BTD,DF->BTF", h, p["up"])
    mlp_BxTxD = quant.einsum("BTF,FD->BTD", gate_BxTxF * up_BxTxF, p["down"])
    if "mlp_gate" in p:
        mlp_BxTxD = so8t.apply_gate(mlp_BxTxD, p["mlp_gate"], alpha)
    if cfg.post_norms:
        mlp_BxTxD = rms_norm(mlp_BxTxD, p["post_mlp_norm"], cfg.norm_eps)
    return x_BxTxD + mlp_BxTxD, (k, v)


def attention_masks(cfg: ModelConfig, q_pos_BxT, k_pos_BxS, k_valid_BxS):
    """Boolean attention masks [B, T, S], True where a query sees a key: (full, sliding or None). A query sees
    the valid keys at positions up to its own; on sliding layers only those less than sliding_window back."""
    visible = (k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]) & k_valid_BxS[:, None, :]
    if not any(cfg.is_sliding) or cfg.sliding_window is None:
        return visible, None
    near = (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < cfg.sliding_window
    return visible, visible & near


def embed(params: Params, cfg: ModelConfig, tokens_BxT):
    x = quant.take(params["embed"], tokens_BxT)
    if cfg.embed_scale:
        x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
    return x


def lm_head(params: Params, cfg: ModelConfig):
    """The output projection [D, V] (the transposed embedding when tied); a quantized one stays packed, for
    quant.project to dequantize a slice of the vocabulary at a time."""
    return quant.head(params["embed"]) if cfg.tie_embeddings else params["lm_head"]


def remat_policy(remat: str | bool):
    """The jax.checkpoint policy of a train.remat mode, None for "none" (no checkpoint). False / True mean
    "none" / "full"."""
    mode = ("full" if remat else "none") if isinstance(remat, bool) else remat
    if mode not in REMAT_MODES:
        raise ValueError(f"train.remat must be one of {REMAT_MODES}, got {remat!r}")
    return _REMAT_POLICIES[mode]


def forward(params: Params, cfg: ModelConfig, tokens_BxT, *, positions_BxT=None, mask_BxT=None,
            cache: KVCache | None = None, output_hidden: bool = False, logits: bool = True,
            remat: str | bool = "none", context_len: int | None = None, keep_Y=None) -> Output:
    """Run the decoder.

    positions_BxT: token positions (default 0..T-1, or cumsum(mask)-1 when a mask is given, which suits
    left padding; without a cache they must increase along a row's valid tokens, as cuDNN's causal attention
    assumes). mask_BxT: valid tokens (padding keys are never attended to). With a cache the new tokens
    are written at cache.index and attend to everything cached before them; a single new token (decode)
    reads the cache once and only its own slot is written. remat: the layer scan's rematerialisation,
    "none" | "dots" (keep the projections' matmul outputs, recompute the rest) | "full" (keep nothing but
    each layer's input); False / True mean "none" / "full". context_len: the context LongRoPE decides by
    (rope_tables) without a cache; training passes its sequence length P + N, the sampler's cache capacity,
    so on-policy samples and the trained forward use the same factors. keep_Y: bool [Y] (no cache), layers to
    run; a dropped one passes its input through (select.py scores layer subsets this way, one compilation).
    """
    policy = remat_policy(remat)
    b, t = tokens_BxT.shape
    valid_BxT = jnp.ones((b, t), bool) if mask_BxT is None else mask_BxT.astype(bool)
    if positions_BxT is None:
        start = 0 if cache is None else cache.index
        positions_BxT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t)) if mask_BxT is None \
            else jnp.maximum(jnp.cumsum(valid_BxT, axis=1, dtype=jnp.int32) - 1, 0)
    positions_BxT = positions_BxT.astype(jnp.int32)
    decode = cache is not None and t == 1
    if cache is None:
        k_pos, k_valid = positions_BxT, valid_BxT
    else:
        slot_pos = jnp.where(valid_BxT, positions_BxT, -1)
        pos_BxS = jax.lax.dynamic_update_slice_in_dim(cache.pos_BxS, slot_pos, cache.index, axis=1)
        k_pos = pos_BxS
        if decode:  # keys: the cache's slots (less those being overwritten), then the new token
            slots_S = jnp.arange(cache.pos_BxS.shape[1])
            overwritten_S = (slots_S >= cache.index) & (slots_S < cache.index + t)
            k_pos = jnp.concatenate([jnp.where(overwritten_S, -1, cache.pos_BxS), slot_pos], axis=1)
        k_valid = k_pos >= 0
    masks = attention_masks(cfg, positions_BxT, k_pos, k_valid)
    context_len = context_len if cache is None else cache.pos_BxS.shape[1]
    rope_global = rope_tables(cfg, positions_BxT, context_len=context_len)
    rope_local = rope_tables(cfg, positions_BxT, local=True) if cfg.rope_local_theta is not None else None
    sliding_Y = jnp.asarray(cfg.is_sliding)
    index = None if cache is None else cache.index
    # the gates' alpha is set by the trainer from its schedule, never trained: no gradient flows to it
    alpha = jax.lax.stop_gradient(params["so8t_alpha"]) if so8t.has_gates(params) else None

    def body(x, xs):
        p, is_sliding, layer_cache, keep = xs
        if keep is not None:
            x = jax.lax.cond(keep, lambda x: _layer(cfg, x, p, rope_global, rope_local, is_sliding, masks, None,
                                                    index, alpha)[0], lambda x: x, x)
            return x, (x if output_hidden else None, None)
        x, kv = _layer(cfg, x, p, rope_global, rope_local, is_sliding, masks, layer_cache, index, alpha)
        return x, (x if output_hidden else None, kv if cache is not None else None)

    if policy is not None:
        body = jax.checkpoint(body, policy=policy)
    layer_caches = None if cache is None else (cache.k_YxBxSxKxH, cache.v_YxBxSxKxH)
    x = embed(params, cfg, tokens_BxT)
    # a decode step scans too: unrolling it measured 2x slower on CPU and made XLA copy the whole cache
    x, (hiddens, kvs) = jax.lax.scan(body, x, (params["layers"], sliding_Y, layer_caches, keep_Y))
    hidden = rms_norm(x, params["final_norm"], cfg.norm_eps)
    out_logits = None
    if logits:
        out_logits = quant.project(hidden, lm_head(params, cfg))  # [B, T, V] float32
    new_cache = None
    if cache is not None:  # the new tokens' keys / values of every layer [Y, B, T, K, H] into their slots
        new_cache = KVCache(*(jax.lax.dynamic_update_slice_in_dim(c, new, cache.index, axis=2)
                              for c, new in zip(layer_caches, kvs)), pos_BxS, cache.index + t)
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
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params, is_leaf=quant.is_quantized)))
