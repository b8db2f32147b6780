"""SO(8) gates against float64 numpy / scipy references: SO(8) membership, identity at init, gradients,
folding for export, the alpha schedule, and the safety / verifier heads."""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from so8t_jax import build, so8t
from so8t_jax import model as model_lib
from so8t_jax.config import ModelConfig, set_path
from so8t_jax.loading import Model

LLAMA = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, ffn_dim=64)
GEMMA = ModelConfig(family="gemma3", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, ffn_dim=64, activation="gelu_tanh", tie_embeddings=True, qk_norm=True,
                    post_norms=True, embed_scale=True, rope_local_theta=100.0, sliding_window=3,
                    sliding_layers=(True, False), norm_eps=1e-6)
CONFIGS = {"llama": LLAMA, "gemma3": GEMMA}


@functools.partial(jax.jit, static_argnums=1)
def _logits(params, cfg, tokens):
    return model_lib.forward(params, cfg, tokens).logits


def _params(cfg, seed=0):
    """Random parameters from numpy (init_params compiles a sampler per shape: slow on a shared CPU)."""
    rng = np.random.RandomState(seed)
    params = {}
    for name, shape in sorted(model_lib.param_shapes(cfg).items()):
        value = 1.0 + 0.1 * rng.randn(*shape) if name.endswith("norm") else 0.2 * rng.randn(*shape)
        set_path(params, name, jnp.asarray(value, jnp.float32), sep="/")
    return params


def _theta(shape, scale, seed=0):
    return jnp.asarray(scale * np.random.RandomState(seed).randn(*shape), jnp.float32)


def _tokens(cfg, b=2, t=5):
    return jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (b, t)))


def _random_gates(cfg, params, alpha, seed=0):
    gated = so8t.with_gates(cfg, params, alpha)
    z = cfg.d_model // 8
    layers = dict(gated["layers"], attn_gate=_theta((cfg.n_layers, z, 28), 0.5, seed),
                  mlp_gate=_theta((cfg.n_layers, z, 28), 0.5, seed + 1))
    return dict(gated, layers=layers)


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_rotations_in_so8_and_match_scipy(scale):
    theta = _theta((6, 28), scale)
    r = np.asarray(so8t.rotations(theta), np.float64)
    eye = np.eye(8)
    for k in range(6):
        assert np.abs(r[k].T @ r[k] - eye).max() < 1e-5
        assert abs(np.linalg.det(r[k]) - 1.0) < 1e-5
        a = np.zeros((8, 8))
        a[np.triu_indices(8, 1)] = np.asarray(theta[k], np.float64)
        np.testing.assert_allclose(r[k], scipy.linalg.expm(a - a.T), atol=1e-5)
    assert np.abs(r - eye).max() > 0.05  # not a trivial identity


def test_norms_preserved_and_gate_matrix():
    theta = _theta((4, 28), 3.0)
    y = jnp.asarray(np.random.RandomState(2).randn(3, 5, 32), jnp.float32)
    rotated = so8t.apply_gate(y, theta, 40.0)  # sigmoid(40) == 1 in float32: blockdiag(R) y
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(y, axis=-1), rtol=1e-5)
    blocks = np.asarray(rotated).reshape(3, 5, 4, 8)
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=-1),
                               np.linalg.norm(np.asarray(y).reshape(3, 5, 4, 8), axis=-1), rtol=1e-5)
    m = np.asarray(so8t.gate_matrix(theta, 0.3), np.float64)
    r = np.asarray(so8t.rotations(theta), np.float64)
    s = 1.0 / (1.0 + np.exp(-0.3))
    ref = np.eye(32) + s * (scipy.linalg.block_diag(*r) - np.eye(32))
    np.testing.assert_allclose(m, ref, atol=1e-6)
    np.testing.assert_allclose(so8t.apply_gate(y, theta, 0.3), np.asarray(y, np.float64) @ ref.T, atol=1e-5)
    assert so8t.apply_gate(y.astype(jnp.bfloat16), theta, 0.3).dtype == jnp.bfloat16


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_zero_gates_are_identity(family):
    cfg = CONFIGS[family]
    params = _params(cfg)
    tokens = _tokens(cfg)
    plain = _logits(params, cfg, tokens)
    gated = _logits(so8t.with_gates(cfg, params, alpha=1.6), cfg, tokens)
    np.testing.assert_allclose(gated, plain, atol=1e-6, rtol=0)


def test_student_from_gated_teacher_equals_teacher_subset():
    cfg = LLAMA.replace(n_layers=3)
    params = _params(cfg)
    src = pathlib.Path("teacher")
    student = build.student_from_teacher(Model(cfg, so8t.with_gates(cfg, params, 0.5), src), 2, "float32")
    subset = build.student_from_teacher(Model(cfg, params, src), 2, "float32")
    assert student.params["layers"]["attn_gate"].shape == (2, 4, 28)
    tokens = _tokens(cfg)
    np.testing.assert_allclose(_logits(student.params, student.config, tokens),
                               _logits(subset.params, subset.config, tokens), atol=1e-6, rtol=0)


def test_gradients_reach_all_28_parameters():
    cfg = LLAMA
    params = _random_gates(cfg, _params(cfg), alpha=0.7)
    tokens = _tokens(cfg)

    def loss(p):
        return jnp.sum(jax.nn.log_softmax(_logits(p, cfg, tokens))[..., 3])
    grads = jax.jit(jax.grad(loss))(params)
    for name in ("attn_gate", "mlp_gate"):
        assert np.all(np.abs(np.asarray(grads["layers"][name][0, 1])) > 0), name
    assert float(grads["so8t_alpha"]) == 0.0  # set by the schedule, not trained


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_fold_then_run_equals_run(family):
    cfg = CONFIGS[family]
    params = _random_gates(cfg, _params(cfg), alpha=-5.0)
    tokens = _tokens(cfg)
    folded = so8t.fold_gates(cfg, params, alpha=0.9)
    assert "attn_gate" not in folded["layers"] and "so8t_alpha" not in folded
    assert set(folded["layers"]) == set(_params(cfg)["layers"])
    ref = _logits(dict(params, so8t_alpha=jnp.float32(0.9)), cfg, tokens)
    out = _logits(folded, cfg, tokens)
    plain = _logits(so8t.fold_gates(cfg, params, alpha=-40.0), cfg, tokens)
    assert np.abs(np.asarray(ref - plain)).max() > 1e-3  # the gates matter
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def _alpha_ref(p, start=-5.0, mid=-2.0, end=1.6, warm=0.05, c=0.5, w=0.1):
    sig = lambda x: 1.0 / (1.0 + np.exp(-(x - c) / w))  # noqa: E731
    if p <= warm:
        return start + (mid - start) * p / warm
    return mid + (end - mid) * (sig(p) - sig(warm)) / (sig(1.0) - sig(warm))


def test_alpha_schedule():
    for p in (0.0, 0.02, 0.05, 0.3, 0.5, 0.8, 1.0):
        assert float(so8t.alpha_schedule(p)) == pytest.approx(_alpha_ref(p), abs=1e-5)
    assert float(so8t.alpha_schedule(0.0)) == pytest.approx(-5.0)
    assert float(so8t.alpha_schedule(0.05)) == pytest.approx(-2.0, abs=1e-6)
    assert float(so8t.alpha_schedule(1.0)) == pytest.approx(1.6, abs=1e-5)
    grid = jax.jit(so8t.alpha_schedule)(jnp.linspace(0.0, 1.0, 2001))
    assert np.all(np.diff(np.asarray(grid)) >= -1e-6)
    eps = 1e-4
    assert abs(float(so8t.alpha_schedule(0.05 + eps)) - float(so8t.alpha_schedule(0.05 - eps))) < 1e-2


def test_mean_rotation_angle_is_geodesic_distance():
    theta = _theta((2, 3, 28), 0.2)
    r = np.asarray(so8t.rotations(theta), np.float64).reshape(-1, 8, 8)
    # plane angles from the eigenvalues (pairs e^{+-i phi}): sqrt(sum phi^2) = sqrt(sum over all 8 / 2)
    angles = [np.sqrt(np.sum(np.angle(np.linalg.eigvals(m)) ** 2) / 2) for m in r]
    assert float(so8t.mean_rotation_angle(theta)) == pytest.approx(np.mean(angles), rel=1e-4)


def test_heads():
    heads = so8t.init_heads(16, jax.random.PRNGKey(0))
    hidden = jnp.asarray(np.random.RandomState(3).randn(2, 6, 16), jnp.float32)
    left = jnp.asarray([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], bool)   # prompt ends at 4 and at 3
    right = jnp.asarray([[1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], bool)  # prompt ends at 4 and at 5
    w, b = np.asarray(heads["safety_head"]["w"]), np.asarray(heads["safety_head"]["b"])
    for mask, last in ((left, [4, 3]), (right, [4, 5])):
        out = so8t.safety_logits(heads, hidden, mask)
        ref = np.stack([np.asarray(hidden)[i, j] @ w + b for i, j in enumerate(last)])
        np.testing.assert_allclose(out, ref, atol=1e-6)
    v = so8t.verifier_logits(heads, hidden)
    assert v.shape == (2, 6) and v.dtype == jnp.float32
    np.testing.assert_allclose(v, np.asarray(hidden) @ np.asarray(heads["verifier"]["w"]), atol=1e-6)
