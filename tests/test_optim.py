"""The optimizer against a float64 numpy AdamW: two parameter groups (trunk, SO8T heads) with their own peak lr,
weight decay on matrices only, global-norm clipping, warmup + cosine schedules."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from so8t_jax.optim import OptimConfig, decay_mask, group_labels, make_optimizer, make_schedule


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
    labels = jax.tree_util.tree_leaves(group_labels(params))
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
