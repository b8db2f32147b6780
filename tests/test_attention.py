"""Attention: model.attend (jax.nn.dot_product_attention) and the decode step's cache attention against a float64
numpy reference (causal, left padding, sliding window, GQA / MQA / MHA, rows that see nothing), and the whole
forward of every family against the previous implementation (einsum attention with additive -1e30 biases, the
cache re-emitted by the layer scan), kept below as the reference."""
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from fixtures import make_hf_model

import so8t_jax
from so8t_jax import model as model_lib
from so8t_jax import so8t

FAMILIES = ("llama", "qwen2", "phi3", "phi3_longrope", "gemma3")
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 on CPU; logits here reach |10|


# ---------------------------------------------------------------------------------------------------------
# float64 numpy reference


def np_attention(q_BxTxQxH, k_BxSxKxH, v_BxSxKxH, q_pos_BxT, k_pos_BxS, k_valid_BxS, scale, window=None):
    """softmax(scale q.k over the visible keys) . v in float64. Query head j uses key / value head j // G. A query
    sees the valid keys at positions <= its own (and < window back); one that sees nothing averages every key."""
    q, k, v = (np.asarray(a, np.float64) for a in (q_BxTxQxH, k_BxSxKxH, v_BxSxKxH))
    q_pos, k_pos, k_valid = np.asarray(q_pos_BxT), np.asarray(k_pos_BxS), np.asarray(k_valid_BxS, bool)
    b, t, q_heads, _ = q.shape
    group = q_heads // k.shape[2]
    out = np.zeros(q.shape)
    for i in range(b):
        for j in range(t):
            seen_S = (k_pos[i] <= q_pos[i, j]) & k_valid[i]
            if window is not None:
                seen_S &= q_pos[i, j] - k_pos[i] < window
            for head in range(q_heads):
                kv = head // group
                scores_S = scale * k[i, :, kv] @ q[i, j, head] if seen_S.any() else np.zeros(k.shape[1])
                scores_S = np.where(seen_S | ~seen_S.any(), scores_S, -np.inf)
                probs_S = np.exp(scores_S - scores_S.max())
                out[i, j, head] = (probs_S / probs_S.sum()) @ v[i, :, kv]
    return out


def _cfg(scale=0.3, window=None):
    """The config fields attention reads (scale; sliding window for the masks)."""
    return types.SimpleNamespace(scale=scale, sliding_window=window, is_sliding=(window is not None,))


def _qkv(b, t, s, q_heads, k_heads, h=8, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(keys[0], (b, t, q_heads, h)), jax.random.normal(keys[1], (b, s, k_heads, h)),
            jax.random.normal(keys[2], (b, s, k_heads, h)))


def _left_padded_positions(pads, length):
    """(positions_BxT, valid_BxT) of left-padded rows, as forward derives them: cumsum(mask) - 1, clipped at 0."""
    valid = np.arange(length)[None, :] >= np.asarray(pads)[:, None]
    return np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32), valid


class AttendTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("mha", 4, None), ("gqa", 2, None), ("mqa", 1, None), ("gqa_sliding", 2, 3), ("mha_sliding", 4, 2))
    def test_matches_numpy(self, k_heads, window):
        """Causal + left padding (0, 3 and 6 of 7 slots) + optional sliding window, every head grouping."""
        cfg = _cfg(window=window)
        q, k, v = _qkv(3, 7, 7, 4, k_heads)
        pos, valid = _left_padded_positions([0, 3, 6], 7)
        full, sliding = model_lib.attention_masks(cfg, jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(valid))
        mask = full if window is None else sliding
        out = self.variant(lambda *a: model_lib.attend(cfg, *a, causal=True))(q, k, v, mask)
        chex.assert_shape(out, q.shape)
        ref = np_attention(q, k, v, pos, pos, valid, cfg.scale, window)
        chex.assert_trees_all_close(np.asarray(out, np.float64), ref, atol=1e-5, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rows_that_see_nothing_average_every_key(self):
        """A row of padding only: no NaN, the uniform average of the values (the old -1e30 bias's result), and
        finite gradients."""
        cfg = _cfg()
        q, k, v = _qkv(2, 5, 5, 4, 2)
        valid = np.array([[True] * 5, [False] * 5])
        pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
        mask = model_lib.attention_masks(cfg, jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(valid))[0]
        assert not np.asarray(mask[1]).any()
        attend = self.variant(lambda *a: model_lib.attend(cfg, *a, causal=True))
        out = np.asarray(attend(q, k, v, mask))
        assert np.isfinite(out).all()
        mean_BxKxH = np.asarray(v).mean(axis=1)
        np.testing.assert_allclose(out[1], np.repeat(mean_BxKxH[1], 2, axis=0)[None].repeat(5, 0), atol=1e-6)
        chex.assert_trees_all_close(out, np_attention(q, k, v, pos, pos, valid, cfg.scale), atol=1e-5, rtol=1e-5)
        grads = jax.grad(lambda *a: jnp.sum(attend(*a, mask) ** 2), argnums=(0, 1, 2))(q, k, v)
        chex.assert_tree_all_finite(grads)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("gqa", 2, None), ("mqa_sliding", 1, 3))
    def test_decode_attention_matches_numpy(self, k_heads, window):
        """One new token per row against a cache of 9 slots (5 and 2 filled, left padding in the second row), the
        slot it is written to holding stale values: the same as attending over the cache with the token written."""
        cfg = _cfg(window=window)
        q, k_cache, v_cache = _qkv(2, 1, 9, 4, k_heads, seed=1)
        _, k_new, v_new = _qkv(2, 1, 1, 4, k_heads, seed=2)
        index = 5
        cache_pos = np.array([[0, 1, 2, 3, 4, 7, -1, -1, -1], [-1, -1, -1, 0, 1, 7, -1, -1, -1]])  # slot 5: stale
        q_pos = np.array([[5], [2]])
        overwritten = np.arange(9) == index
        k_pos = np.concatenate([np.where(overwritten, -1, cache_pos), q_pos], axis=1)
        full, sliding = model_lib.attention_masks(cfg, jnp.asarray(q_pos), jnp.asarray(k_pos), jnp.asarray(k_pos >= 0))
        mask = full if window is None else sliding
        out = self.variant(lambda *a: model_lib._attend_decode(cfg, *a))(q, k_cache, v_cache, k_new, v_new, mask)
        written_pos = np.where(overwritten, q_pos, cache_pos)
        ref = np_attention(q, k_cache.at[:, index].set(k_new[:, 0]), v_cache.at[:, index].set(v_new[:, 0]),
                           q_pos, written_pos, written_pos >= 0, cfg.scale, window)
        chex.assert_trees_all_close(np.asarray(out, np.float64), ref, atol=1e-5, rtol=1e-5)


def test_xla_on_cpu():
    q, k, _ = _qkv(1, 8, 8, 4, 2)
    assert model_lib.attention_implementation(q, k) == "xla"
    assert model_lib.attention_implementation(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)) == "xla"


def test_cudnn_arguments_through_xla(monkeypatch, models):
    """What forward hands cuDNN (is_causal on top of the mask, no cache) runs here through XLA: the valid rows
    are what the plain XLA call gives (padding rows may differ: cuDNN's causal cut leaves a left-padding query
    its own padding slots only)."""
    m = models["gemma3"]
    tokens, mask = _batch(m.config.vocab_size, [0, 4, 2], 13)
    plain = model_lib.forward(m.params, m.config, tokens, mask_BxT=mask).logits
    calls = []
    real = jax.nn.dot_product_attention

    def as_xla(*args, implementation=None, **kw):
        calls.append((implementation, kw["is_causal"]))
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(model_lib, "attention_implementation", lambda q, k: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    forced = model_lib.forward(m.params, m.config, tokens, mask_BxT=mask).logits
    assert calls and all(c == ("cudnn", True) for c in calls)
    valid = np.asarray(mask).astype(bool)
    chex.assert_trees_all_close(np.asarray(forced)[valid], np.asarray(plain)[valid], **TOL)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
def test_cudnn_matches_xla_on_gpu():
    """bf16 cuDNN flash attention against XLA's: forward and gradients, causal, left padding, sliding, GQA."""
    cfg = _cfg(window=64)
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(2, 128, 128, 8, 2, h=64))
    assert model_lib.attention_implementation(q, k) == "cudnn"
    pos, valid = _left_padded_positions([0, 17], 128)

    def loss(q, k, v, mask, impl):
        out = model_lib.attend(cfg, q, k, v, mask, causal=True, implementation=impl)
        return jnp.sum(jnp.where(jnp.asarray(valid)[:, :, None, None], out, 0).astype(jnp.float32) ** 2)

    for mask in model_lib.attention_masks(cfg, jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(valid)):
        for impl_out, xla_out in zip(jax.value_and_grad(loss, (0, 1, 2))(q, k, v, mask, "cudnn"),
                                     jax.value_and_grad(loss, (0, 1, 2))(q, k, v, mask, "xla")):
            chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32), impl_out),
                                        jax.tree.map(lambda a: a.astype(jnp.float32), xla_out), atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------------------------
# the previous implementation, the reference for the whole forward


def _old_attend(cfg, q_BxTxQxH, k_BxSxKxH, v_BxSxKxH, bias_BxTxS):
    b, t, q_heads, h = q_BxTxQxH.shape
    k_heads = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxQxH.reshape(b, t, k_heads, q_heads // k_heads, h)
    scores_BxKxGxTxS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_BxSxKxH,
                                  preferred_element_type=jnp.float32) * cfg.scale
    scores_BxKxGxTxS = scores_BxKxGxTxS + bias_BxTxS[:, None, None]
    probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, q_heads, h)


def _old_layer(cfg, x_BxTxD, p, rope_global, rope_local, is_sliding, biases, cache_kv, alpha=None):
    rms_norm = model_lib.rms_norm
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
    q, k = model_lib.apply_rope(q, cos, sin), model_lib.apply_rope(k, cos, sin)
    if cache_kv is not None:
        k_cache, v_cache, index = cache_kv
        k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
    bias = jnp.where(is_sliding, biases[1], biases[0]) if biases[1] is not None else biases[0]
    attn = _old_attend(cfg, q, k.astype(q.dtype), v.astype(q.dtype), bias)
    attn_BxTxD = jnp.einsum("BTQH,QHD->BTD", attn, p["o"])
    if "attn_gate" in p:
        attn_BxTxD = so8t.apply_gate(attn_BxTxD, p["attn_gate"], alpha)
    if cfg.post_norms:
        attn_BxTxD = rms_norm(attn_BxTxD, p["post_attn_norm"], cfg.norm_eps)
    x_BxTxD = x_BxTxD + attn_BxTxD
    h = rms_norm(x_BxTxD, p["mlp_norm"], cfg.norm_eps)
    gate_BxTxF = model_lib._activation(cfg, jnp.einsum("BTD,DF->BTF", h, p["gate"]))
    up_BxTxF = jnp.einsum("BTD,DF->BTF", h, p["up"])
    mlp_BxTxD = jnp.einsum("BTF,FD->BTD", gate_BxTxF * up_BxTxF, p["down"])
    if "mlp_gate" in p:
        mlp_BxTxD = so8t.apply_gate(mlp_BxTxD, p["mlp_gate"], alpha)
    if cfg.post_norms:
        mlp_BxTxD = rms_norm(mlp_BxTxD, p["post_mlp_norm"], cfg.norm_eps)
    return x_BxTxD + mlp_BxTxD, (k, v)


def _old_mask_biases(cfg, q_pos_BxT, k_pos_BxS, k_valid_BxS):
    visible = (k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]) & k_valid_BxS[:, None, :]
    full = jnp.where(visible, 0.0, -1e30).astype(jnp.float32)
    if not any(cfg.is_sliding) or cfg.sliding_window is None:
        return full, None
    near = (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < cfg.sliding_window
    return full, jnp.where(visible & near, 0.0, -1e30).astype(jnp.float32)


def old_forward(params, cfg, tokens_BxT, *, positions_BxT=None, mask_BxT=None, cache=None):
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
    biases = _old_mask_biases(cfg, positions_BxT, k_pos, k_valid)
    context_len = None if cache is None else cache.pos_BxS.shape[1]
    rope_global = model_lib.rope_tables(cfg, positions_BxT, context_len=context_len)
    rope_local = model_lib.rope_tables(cfg, positions_BxT, local=True) if cfg.rope_local_theta is not None else None
    alpha = jax.lax.stop_gradient(params["so8t_alpha"]) if so8t.has_gates(params) else None

    def body(x, xs):
        p, is_sliding, layer_cache = xs
        cache_kv = None if layer_cache is None else (*layer_cache, cache.index)
        x, kv = _old_layer(cfg, x, p, rope_global, rope_local, is_sliding, biases, cache_kv, alpha)
        return x, (x, kv if cache is not None else None)

    layer_caches = None if cache is None else (cache.k_YxBxSxKxH, cache.v_YxBxSxKxH)
    x = model_lib.embed(params, cfg, tokens_BxT)
    x, (hiddens, kvs) = jax.lax.scan(body, x, (params["layers"], jnp.asarray(cfg.is_sliding), layer_caches))
    hidden = model_lib.rms_norm(x, params["final_norm"], cfg.norm_eps)
    logits = jnp.einsum("BTD,DV->BTV", hidden, model_lib.lm_head(params, cfg), preferred_element_type=jnp.float32)
    new_cache = None if cache is None else model_lib.KVCache(kvs[0], kvs[1], pos_BxS, cache.index + t)
    return model_lib.Output(logits, hidden, hiddens, new_cache)


# ---------------------------------------------------------------------------------------------------------
# the whole forward, new against old


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: so8t_jax.load(make_hf_model(fam, root / fam)) for fam in FAMILIES}


def _batch(vocab, pads, length, seed=0, right_pads=None):
    """Random tokens [B, L] and a mask with pads[i] padding slots on the left (right_pads[i] on the right)."""
    tokens = np.random.RandomState(seed).randint(3, vocab, (len(pads), length))
    slots = np.arange(length)[None, :]
    right = np.zeros(len(pads), int) if right_pads is None else np.asarray(right_pads)
    mask = (slots >= np.asarray(pads)[:, None]) & (slots < length - right[:, None])
    return jnp.asarray(tokens), jnp.asarray(mask.astype(np.int32))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_previous(models, family):
    """No mask; left padding (gemma3: 13 tokens, past its window of 4); the training view (left-padded prompt,
    right-padded completion); a row of padding only. Every position, padding included, and every layer."""
    m = models[family]
    new_fwd = jax.jit(lambda p, t, mk: model_lib.forward(p, m.config, t, mask_BxT=mk, output_hidden=True))
    old_fwd = jax.jit(lambda p, t, mk: old_forward(p, m.config, t, mask_BxT=mk))
    length = 13 if family == "gemma3" else 12
    tokens, _ = _batch(m.config.vocab_size, [0, 0], length)
    new = model_lib.forward(m.params, m.config, tokens, output_hidden=True)
    old = old_forward(m.params, m.config, tokens)
    chex.assert_trees_all_close((new.logits, new.hiddens), (old.logits, old.hiddens), **TOL)
    assert np.abs(np.asarray(old.logits)).max() > 1.0
    for pads, right_pads in (([0, 3, 7], None), ([2, 5, 0, length], [3, 0, 4, 0])):
        tokens, mask = _batch(m.config.vocab_size, pads, length, seed=1, right_pads=right_pads)
        new, old = new_fwd(m.params, tokens, mask), old_fwd(m.params, tokens, mask)
        chex.assert_tree_all_finite(new.logits)
        chex.assert_trees_all_close((new.logits, new.hiddens), (old.logits, old.hiddens), **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_matches_previous(models, family):
    """Prefill of left-padded prompts into a cache, then 6 single-token decode steps (gemma3 past its window):
    logits and the whole cache (keys, values, slot positions, index) after every step."""
    m, cfg = models[family], models[family].config
    tokens, mask = _batch(cfg.vocab_size, [0, 3], 7, seed=2)
    cache0 = model_lib.init_cache(cfg, 2, 13)
    new_step = jax.jit(lambda p, t, c, pos: model_lib.forward(p, cfg, t, positions_BxT=pos, cache=c))
    old_step = jax.jit(lambda p, t, c, pos: old_forward(p, cfg, t, positions_BxT=pos, cache=c))
    new = model_lib.forward(m.params, cfg, tokens, mask_BxT=mask, cache=cache0)
    old = old_forward(m.params, cfg, tokens, mask_BxT=mask, cache=cache0)
    chex.assert_trees_all_close((new.logits, new.cache), (old.logits, old.cache), **TOL)
    next_pos = jnp.sum(mask, axis=1)[:, None]
    for i in range(6):
        tok = jnp.argmax(old.logits[:, -1], axis=-1)[:, None]
        new = new_step(m.params, tok, new.cache, next_pos + i)
        old = old_step(m.params, tok, old.cache, next_pos + i)
        chex.assert_trees_all_close((new.logits, new.cache), (old.logits, old.cache), **TOL)
    # rewound two slots: the token overwrites a slot holding a stale key, which it must not see
    rewind = lambda c: c._replace(index=c.index - 2)  # noqa: E731
    tok = jnp.asarray([[5], [6]])
    new = new_step(m.params, tok, rewind(new.cache), next_pos + 4)
    old = old_step(m.params, tok, rewind(old.cache), next_pos + 4)
    chex.assert_trees_all_close((new.logits, new.cache), (old.logits, old.cache), **TOL)


def test_decode_writes_only_the_new_slots(models):
    """The layer scan of a decode step carries no [.., S, ..] cache as its output (the old scan re-emitted the whole
    cache every token): only the new token's keys / values leave it, and one dynamic_update_slice per cache
    writes them."""
    m = models["llama"]
    cfg = m.config
    cache = model_lib.init_cache(cfg, 2, 16)
    jaxpr = jax.make_jaxpr(lambda p, c, t: model_lib.forward(p, cfg, t, positions_BxT=t, cache=c))(
        m.params, cache, jnp.zeros((2, 1), jnp.int32))
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1
    out_shapes = [v.aval.shape for v in scans[0].outvars]
    assert cache.k_YxBxSxKxH.shape not in out_shapes
    assert (cfg.n_layers, 2, 1, cfg.n_kv_heads, cfg.head_dim) in out_shapes
