"""The optimizer against a float64 numpy AdamW: two parameter groups (trunk, SO8T heads) with their own peak lr,
weight decay on matrices only, global-norm clipping, warmup + cosine schedules."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import pytest

from so8t_jax.optim import OptimConfig, decay_mask, freeze_tree, group_labels, make_optimizer, make_schedule


def _params(seed=0):
    r = np.random.RandomState(seed)

    def a(*shape):
        return jnp.asarray(r.randn(*shape), jnp.float32)
    return {"student": {"embed": a(6, 4), "final_norm": a(4), "so8t_alpha": a(),
                        "layers": {"q": a(2, 4, 2, 2), "q_bias": a(2, 2, 2), "attn_norm": a(2, 4),
                                   "attn_gate": a(2, 1, 28), "down": a(2, 3, 4)},
                        "safety_head": {"w": a(4, 3), "b": a(3)}, "verifier": {"w": a(4), "b": a()}},
            "proj": a(4, 5)}


def test_groups_and_decay_mask():
    p = _params()
    labels, mask = group_labels(p), decay_mask(p)
    assert labels["student"]["safety_head"] == {"w": "heads", "b": "heads"}
    assert labels["student"]["verifier"] == {"w": "heads", "b": "heads"}
    assert labels["student"]["layers"]["q"] == labels["proj"] == labels["student"]["embed"] == "trunk"
    decayed = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(mask) if v}
    assert decayed == {"['student']['embed']", "['student']['layers']['q']", "['student']['layers']['down']",
                       "['proj']"}


def _reference(cfg: OptimConfig, params, grads_seq):
    """float64 numpy: clip by the global norm, Adam moments with bias correction, decoupled decay where the
    mask says, lr from each group's schedule at the update count."""
    flat, tree = jax.tree_util.tree_flatten(params)
    labels = jax.tree_util.tree_leaves(group_labels(params, cfg.freeze))
    mask = jax.tree_util.tree_leaves(decay_mask(params))
    p = [np.asarray(x, np.float64) for x in flat]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    peaks = {"trunk": cfg.learning_rate, "heads": cfg.head_learning_rate}
    for t, grads in enumerate(grads_seq):
        g = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(grads)]
        norm = np.sqrt(sum((x ** 2).sum() for x in g))
        if cfg.max_grad_norm > 0 and norm > cfg.max_grad_norm:
            g = [x * cfg.max_grad_norm / norm for x in g]
        for i in range(len(p)):
            if labels[i] == "frozen":  # kept as it is, no moments
                continue
            m[i] = cfg.b1 * m[i] + (1 - cfg.b1) * g[i]
            v[i] = cfg.b2 * v[i] + (1 - cfg.b2) * g[i] ** 2
            mhat, vhat = m[i] / (1 - cfg.b1 ** (t + 1)), v[i] / (1 - cfg.b2 ** (t + 1))
            u = mhat / (np.sqrt(vhat) + cfg.eps) + (cfg.weight_decay * p[i] if mask[i] else 0.0)
            lr = float(make_schedule(cfg, peaks[labels[i]])(t))
            p[i] = p[i] - lr * u
    return jax.tree_util.tree_unflatten(tree, p)


class AdamWTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.0, 0.5)
    def test_matches_numpy_adamw(self, max_grad_norm):
        cfg = OptimConfig(learning_rate=1e-2, min_lr=1e-3, warmup_steps=2, total_steps=6, weight_decay=0.1,
                          head_learning_rate=0.3, max_grad_norm=max_grad_norm)
        opt = make_optimizer(cfg)
        params = _params()
        grads_seq = [jax.tree.map(lambda x, s=s: x * (0.5 + s), _params(seed=10 + s)) for s in range(4)]

        @self.variant
        def step(p, state, g):
            updates, state = opt.update(g, state, p)
            return jax.tree.map(lambda a, b: a + b, p, updates), state

        state, p = opt.init(params), params
        for g in grads_seq:
            p, state = step(p, state, g)
        chex.assert_trees_all_close(p, _reference(cfg, params, grads_seq), atol=1e-5, rtol=1e-5)
        # the heads moved at their own (30x larger) rate
        assert float(jnp.abs(p["student"]["verifier"]["b"] - params["student"]["verifier"]["b"])) > 0.1


def test_schedule_with_another_peak_keeps_the_shape():
    cfg = OptimConfig(learning_rate=1e-3, min_lr=1e-4, warmup_steps=3, total_steps=20)
    base, heads = make_schedule(cfg), make_schedule(cfg, 1e-1)
    for step in range(25):
        np.testing.assert_allclose(float(heads(step)), 100 * float(base(step)), rtol=1e-5)


class FreezeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_frozen_embedding_gets_no_gradient_no_moments_no_update(self):
        """optim.freeze = ("embed",): the gradient through freeze_tree is exactly zero there (the step never
        computes it), the optimizer keeps no moments for it and leaves it bitwise; every other parameter follows
        the float64 AdamW fed the same (zero-embedding) gradients."""
        cfg = OptimConfig(learning_rate=1e-2, min_lr=1e-3, warmup_steps=1, total_steps=4, weight_decay=0.1,
                          max_grad_norm=0.5, freeze=("embed",))
        params = _params()
        target = _params(seed=3)

        @self.variant
        def grads_of(p):
            def loss(q):
                q = freeze_tree(q, cfg.freeze)
                return sum(jnp.sum((a - b) ** 2 * (1 + jnp.arange(a.size).reshape(a.shape) % 3))
                           for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(target)))
            return jax.grad(loss)(p)
        opt = make_optimizer(cfg)
        state, p, seen = opt.init(params), params, []
        for _ in range(3):
            g = grads_of(p)
            assert not np.any(np.asarray(g["student"]["embed"]))
            assert np.all(np.asarray(g["student"]["layers"]["q"]) != 0)
            seen.append(g)
            updates, state = opt.update(g, state, p)
            p = jax.tree.map(lambda a, b: a + b, p, updates)
        np.testing.assert_array_equal(np.asarray(p["student"]["embed"]), np.asarray(params["student"]["embed"]))
        want = _reference(cfg, params, seen)
        chex.assert_trees_all_close(p, want, atol=1e-5, rtol=1e-5)
        moments = sum(x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size"))
        unfrozen = sum(x.size for x in jax.tree_util.tree_leaves(make_optimizer(OptimConfig()).init(params))
                       if hasattr(x, "size"))
        assert unfrozen - moments == 2 * params["student"]["embed"].size  # no Adam m and v for the embedding
        assert group_labels(params, cfg.freeze)["student"]["embed"] == "frozen"


def test_freeze_names_are_checked():
    with pytest.raises(ValueError, match="optim.freeze.*unknown.*'bogus'"):
        OptimConfig(freeze=("bogus",))
    with pytest.raises(ValueError, match="no \\['lm_head'\\].*tied"):
        freeze_tree(_params(), ("lm_head",))
