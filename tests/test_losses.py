"""so8t_jax.losses against float64 numpy references (values and finite-difference gradients), TRL and torch."""
import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import parameterized

from so8t_jax import losses

B, L, V = 2, 6, 11
KINDS = (("forward_kl", 0.0), ("reverse_kl", 0.0), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0))


# ------------------------------------------------------------------------------- float64 references


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(logp, logq):
    return (np.exp(logp) * (logp - logq)).sum(-1)


def np_masked_mean(per_token, mask, num_valid=None):
    count = mask.sum() if num_valid is None else num_valid
    return (per_token * mask).sum() / count if count > 0 else 0.0


def np_divergence(s, t, mask, kind, beta=0.5, tau=1.0, num_valid=None):
    s, t, mask = np.float64(s), np.float64(t), np.float64(mask)
    ls, lt = np_log_softmax(s / tau), np_log_softmax(t / tau)
    if kind == "forward_kl":
        per = tau**2 * np_kl(lt, ls)
    elif kind == "reverse_kl":
        per = tau**2 * np_kl(ls, lt)
    elif beta == 0:
        per = np_kl(lt, ls)
    elif beta == 1:
        per = np_kl(ls, lt)
    else:
        m = np.log(beta * np.exp(lt) + (1 - beta) * np.exp(ls))
        per = beta * np_kl(lt, m) + (1 - beta) * np_kl(ls, m)
    per = np.where(mask > 0, per, 0.0)
    return np_masked_mean(per, mask > 0, num_valid)


def np_cross_entropy(logits, labels, mask=None):
    valid = labels != -100
    if mask is not None:
        valid &= mask > 0
    logp = np_log_softmax(np.float64(logits))
    nll = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return np_masked_mean(np.where(valid, nll, 0.0), valid)


def np_hidden_matching(hs, ht, w, mask, layer_map):
    per_pair = []
    for i, j in layer_map:
        err = ((np.float64(hs[i]) @ np.float64(w) - np.float64(ht[j])) ** 2).mean(-1)
        per_pair.append(np_masked_mean(np.where(mask > 0, err, 0.0), mask > 0))
    return np.mean(per_pair)


def np_gram(hs, ht, mask, layer_map):
    per_pair = []
    for i, j in layer_map:
        per_seq = []
        for b in range(mask.shape[0]):
            rows = mask[b] > 0
            if not rows.any():
                continue
            a, c = np.float64(hs[i, b][rows]), np.float64(ht[j, b][rows])
            a /= np.linalg.norm(a, axis=-1, keepdims=True)
            c /= np.linalg.norm(c, axis=-1, keepdims=True)
            per_seq.append(((a @ a.T - c @ c.T) ** 2).sum() / rows.sum() ** 2)
        per_pair.append(np.mean(per_seq) if per_seq else 0.0)
    return np.mean(per_pair)


def np_pet(h, mask):
    terms = []
    for b in range(h.shape[0]):
        for t in range(h.shape[1] - 2):
            if mask[b, t] and mask[b, t + 1] and mask[b, t + 2]:
                d = np.float64(h[b, t + 2]) - 2 * np.float64(h[b, t + 1]) + np.float64(h[b, t])
                terms.append((d**2).mean())
    return np.mean(terms) if terms else 0.0


def np_safety(logits, labels, weights):
    logp = np_log_softmax(np.float64(logits))
    num = den = 0.0
    for row, y in zip(logp, labels):
        if y >= 0:
            num -= weights[y] * row[y]
            den += weights[y]
    return num / den if den else 0.0


def np_bce(x, z, mask):
    x = np.float64(x)
    return np_masked_mean(np.where(mask > 0, np.logaddexp(0, x) - x * z, 0.0), mask > 0)


def fd_grad(f, x, eps=1e-6):
    """Central finite-difference gradient of a float64 numpy function, every coordinate."""
    x = np.array(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


def assert_close(actual, desired, rtol=1e-5):
    """Elementwise |a - d| <= rtol * (|d| + max|d|): relative to each entry and to the array's scale."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * float(np.max(np.abs(desired), initial=0)))


# --------------------------------------------------------------------------------------------- inputs


def rand_logits(rng, shape=(B, L, V), scale=3.0):
    return np.float32(scale * rng.standard_normal(shape))


def rand_mask(rng, shape=(B, L), p=0.7):
    mask = rng.random(shape) < p
    mask[0, 0] = True
    mask[-1, -1] = False
    return mask.astype(np.float32)


def with_garbage(x, mask, value):
    """x with every masked token's entries replaced by `value`."""
    keep = (mask > 0).reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return np.where(keep, x, np.float32(value)).astype(x.dtype)


@pytest.fixture(autouse=True)
def _x64_off():
    assert not jax.config.jax_enable_x64, "the fp32 library is compared against float64 references"


# ------------------------------------------------------------------------------------------ values


class ValueTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*KINDS)
    def test_divergence(self, kind, beta):
        rng = np.random.default_rng(0)
        s, t, mask = rand_logits(rng), rand_logits(rng), rand_mask(rng)
        if kind == "forward_kl":
            fn = losses.forward_kl
        elif kind == "reverse_kl":
            fn = losses.reverse_kl
        else:
            fn = functools.partial(losses.generalized_jsd, beta=beta)
        fn = self.variant(fn)
        for tau in (0.5, 1.0, 2.0):  # traced under jit: one compilation for all temperatures
            got = fn(s, t, mask, temperature=tau)
            chex.assert_shape(got, ())
            assert got.dtype == jnp.float32
            assert_close(got, np_divergence(s, t, mask, kind, beta, tau))
            got = fn(s, t, mask, temperature=tau, num_valid=17)
            assert_close(got, np_divergence(s, t, mask, kind, beta, tau, num_valid=17))

    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy(self):
        rng = np.random.default_rng(1)
        logits = rand_logits(rng)
        labels = rng.integers(0, V, (B, L))
        labels[rng.random((B, L)) < 0.3] = -100
        mask = rand_mask(rng)
        ce = self.variant(losses.cross_entropy)
        assert_close(ce(logits, labels), np_cross_entropy(logits, labels))
        assert_close(ce(logits, labels, mask), np_cross_entropy(logits, labels, mask))
        assert_close(ce(logits, labels, num_valid=9), np_cross_entropy(logits, labels) * (labels != -100).sum() / 9)

    @chex.variants(with_jit=True, without_jit=True)
    def test_hidden_losses(self):
        rng = np.random.default_rng(2)
        hs = np.float32(rng.standard_normal((3, B, L, 4)))
        ht = np.float32(rng.standard_normal((5, B, L, 7)))
        w = np.float32(rng.standard_normal((4, 7)))
        mask = rand_mask(rng)
        layer_map = losses.default_layer_map(3, 5)
        hm = self.variant(functools.partial(losses.hidden_matching, layer_map=layer_map))
        assert_close(hm(hs, ht, w, mask), np_hidden_matching(hs, ht, w, mask, layer_map))
        gram = self.variant(functools.partial(losses.relational_gram_loss, layer_map=layer_map))
        assert_close(gram(hs, ht, mask), np_gram(hs, ht, mask, layer_map))
        assert_close(self.variant(losses.pet_loss)(hs[0], mask), np_pet(hs[0], mask))

    @chex.variants(with_jit=True, without_jit=True)
    def test_safety_and_verification(self):
        rng = np.random.default_rng(3)
        logits = rand_logits(rng, (7, 3))
        labels = np.array([0, 1, 2, -1, 2, -1, 1])
        assert_close(self.variant(losses.safety_loss)(logits, labels), np_safety(logits, labels, (1.0, 3.0, 5.0)))
        s, t, mask = rand_logits(rng, (B, L, 3)), rand_logits(rng, (B, L, 3)), rand_mask(rng)
        v = rand_logits(rng, (B, L))
        z = np.argmax(s, -1) == np.argmax(t, -1)
        assert 0 < z.sum() < z.size
        assert_close(self.variant(losses.verification_loss)(v, s, t, mask), np_bce(v, z, mask))
        assert_close(self.variant(losses.verification_bce)(v, z, mask), np_bce(v, z, mask))


def test_safety_matches_torch():
    rng = np.random.default_rng(4)
    logits = rand_logits(rng, (9, 3))
    labels = np.array([0, 1, 2, -1, 2, -1, 1, 0, 2])
    x = torch.tensor(np.float64(logits), requires_grad=True)
    ref = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64), ignore_index=-1)
    out = ref(x, torch.tensor(labels))
    out.backward()
    value_and_grad = jax.jit(jax.value_and_grad(losses.safety_loss))
    val, grad = value_and_grad(logits, labels)
    assert_close(val, out.item())
    assert_close(grad, x.grad.numpy())
    val, grad = value_and_grad(logits, np.full(9, -1))
    assert float(val) == 0.0 and not np.any(grad)


def test_bf16_inputs_give_fp32():
    rng = np.random.default_rng(5)
    s, t, mask = jnp.bfloat16(rand_logits(rng)), jnp.bfloat16(rand_logits(rng)), rand_mask(rng)
    got = jax.jit(losses.forward_kl)(s, t, mask, temperature=2.0)
    assert got.dtype == jnp.float32
    assert_close(got, np_divergence(np.float32(s), np.float32(t), mask, "forward_kl", tau=2.0))


# ---------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind,beta", KINDS)
def test_divergence_grads_and_zero_at_identical_distributions(kind, beta):
    rng = np.random.default_rng(6)
    s, t, mask = rand_logits(rng), rand_logits(rng), rand_mask(rng)
    value_and_grad = jax.jit(jax.value_and_grad(
        functools.partial(losses.divergence, kind=kind, beta=beta), argnums=(0, 1)))
    for tau in (0.5, 2.0):  # traced: one compilation
        _, (gs, gt) = value_and_grad(s, t, mask, temperature=tau)
        assert_close(gs, fd_grad(lambda x, tau=tau: np_divergence(x, t, mask, kind, beta, tau), s))
        assert_close(gt, fd_grad(lambda x, tau=tau: np_divergence(s, x, mask, kind, beta, tau), t))
    val, (gs, _) = value_and_grad(s, s + 4.0, mask, temperature=1.5)  # same distributions (shift-invariant)
    assert abs(float(val)) < 1e-6
    assert np.max(np.abs(gs)) < 1e-6


def test_cross_entropy_grads():
    rng = np.random.default_rng(7)
    logits = rand_logits(rng)
    labels = rng.integers(0, V, (B, L))
    labels[0, 1] = -100
    g = jax.jit(jax.grad(losses.cross_entropy))(logits, labels)
    assert_close(g, fd_grad(lambda x: np_cross_entropy(x, labels), logits))


def test_hidden_loss_grads():
    rng = np.random.default_rng(8)
    hs = np.float32(rng.standard_normal((2, B, L, 3)))
    ht = np.float32(rng.standard_normal((3, B, L, 4)))
    w = np.float32(rng.standard_normal((3, 4)))
    mask = rand_mask(rng)
    lm = ((0, 1), (1, 2))

    @jax.jit
    def grads(hs, ht, w, mask):
        return (jax.grad(losses.hidden_matching, argnums=(0, 2))(hs, ht, w, mask, lm),
                jax.grad(losses.relational_gram_loss, argnums=(0, 1))(hs, ht, mask, lm),
                jax.grad(losses.pet_loss)(hs[0], mask))

    (g_hs, g_w), (g_gram_s, g_gram_t), g_pet = grads(hs, ht, w, mask)
    assert_close(g_hs, fd_grad(lambda x: np_hidden_matching(x, ht, w, mask, lm), hs))
    assert_close(g_w, fd_grad(lambda x: np_hidden_matching(hs, ht, x, mask, lm), w))
    assert_close(g_gram_s, fd_grad(lambda x: np_gram(x, ht, mask, lm), hs))
    assert_close(g_gram_t, fd_grad(lambda x: np_gram(hs, x, mask, lm), ht))
    assert_close(g_pet, fd_grad(lambda x: np_pet(x, mask), hs[0]))


def test_verification_grads():
    rng = np.random.default_rng(9)
    s, t, mask, v = rand_logits(rng), rand_logits(rng), rand_mask(rng), rand_logits(rng, (B, L))
    z = np.argmax(s, -1) == np.argmax(t, -1)
    gv, gs, gt = jax.jit(jax.grad(losses.verification_loss, argnums=(0, 1, 2)))(v, s, t, mask)
    assert_close(gv, fd_grad(lambda x: np_bce(x, z, mask), v))
    assert not np.any(gs) and not np.any(gt)  # the target is under stop_gradient


# ---------------------------------------------------------------------------------------------- TRL


@functools.cache
def trl_generalized_jsd_loss():
    """TRL's static method; ImportError (a test failure, not a skip) when trl is missing."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer  # trl >= 0.2x moved GKD here
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


_jsd_value_and_grad = jax.jit(jax.value_and_grad(losses.generalized_jsd), static_argnames="beta")


@pytest.mark.parametrize("beta", (0.0, 0.1, 0.5, 0.9, 1.0))
@pytest.mark.parametrize("tau", (0.5, 1.0, 2.0))
def test_generalized_jsd_matches_trl(beta, tau):
    """TRL with labels = -100 at masked tokens and reduction="batchmean" is our masked token mean."""
    trl_jsd = trl_generalized_jsd_loss()
    rng = np.random.default_rng(10)
    s, t, mask = rand_logits(rng), rand_logits(rng), rand_mask(rng)
    labels = torch.tensor(np.where(mask > 0, 1, -100))
    ours, grad = _jsd_value_and_grad(s, t, mask, beta=beta, temperature=tau)
    s64 = torch.tensor(np.float64(s), requires_grad=True)
    ref64 = trl_jsd(s64, torch.tensor(np.float64(t)), labels=labels, beta=beta, temperature=tau,
                    reduction="batchmean")
    ref64.backward()
    ref32 = trl_jsd(torch.tensor(s), torch.tensor(t), labels=labels, beta=beta, temperature=tau,
                    reduction="batchmean")
    np.testing.assert_allclose(float(ours), ref64.item(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(ours), ref32.item(), rtol=1e-6, atol=1e-7)
    assert_close(grad, s64.grad.numpy())


def test_num_valid_is_trl_num_items_in_batch():
    """num_valid plays TRL's num_items_in_batch: the global token count under gradient accumulation."""
    rng = np.random.default_rng(10)
    s, t, mask = rand_logits(rng), rand_logits(rng), rand_mask(rng)
    ref = trl_generalized_jsd_loss()(
        torch.tensor(np.float64(s)), torch.tensor(np.float64(t)), labels=torch.tensor(np.where(mask > 0, 1, -100)),
        beta=0.5, temperature=2.0, num_items_in_batch=torch.tensor(40))
    ours = losses.generalized_jsd(s, t, mask, 0.5, temperature=2.0, num_valid=40)
    np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------- properties


def test_jsd_half_is_symmetric_and_endpoints_jump():
    rng = np.random.default_rng(12)
    s, t, mask = rand_logits(rng), rand_logits(rng), rand_mask(rng)
    assert_close(losses.generalized_jsd(s, t, mask, 0.5), losses.generalized_jsd(t, s, mask, 0.5), rtol=1e-6)
    fkl = float(losses.forward_kl(s, t, mask, temperature=2.0))
    assert_close(losses.generalized_jsd(s, t, mask, 0.0, temperature=2.0), fkl / 4.0)  # no tau^2 in TRL
    assert_close(losses.generalized_jsd(s, t, mask, 1.0), losses.reverse_kl(s, t, mask))
    # Endpoint jump: JSD_beta <= beta log(1/beta) + log(1/(1-beta)) -> 0, but JSD_0 is the full forward KL.
    beta = 1e-4
    bound = beta * np.log(1 / beta) + np.log(1 / (1 - beta))
    assert float(losses.generalized_jsd(s, t, mask, beta)) < bound < 1e-3 * float(losses.forward_kl(s, t, mask))
    assert float(losses.generalized_jsd(s, t, mask, 1 - beta)) < bound < 1e-3 * float(losses.reverse_kl(s, t, mask))
    with pytest.raises(TypeError):
        jax.jit(lambda b: losses.generalized_jsd(s, t, mask, b))(0.5)


def test_gram_loss_is_orthogonally_invariant_across_widths():
    rng = np.random.default_rng(13)
    hs = np.float32(rng.standard_normal((2, B, L, 5)))
    ht = np.float32(rng.standard_normal((3, B, L, 9)))
    mask = rand_mask(rng)
    gram = jax.jit(losses.relational_gram_loss, static_argnums=3)
    lm = losses.default_layer_map(2, 3)
    q_s = np.linalg.qr(rng.standard_normal((5, 5)))[0].astype(np.float32)
    q_t = np.linalg.qr(rng.standard_normal((9, 9)))[0].astype(np.float32)
    base = gram(hs, ht, mask, lm)
    assert float(base) > 1e-3
    assert_close(gram(hs @ q_s, ht, mask, lm), base)
    assert_close(gram(hs, ht @ q_t, mask, lm), base)
    assert_close(gram(hs @ q_s, ht @ q_t, mask, lm), base)
    # Same geometry in a wider space (student padded with zeros, then rotated) -> 0.
    wide = np.concatenate([hs, np.zeros_like(hs)], -1) @ np.linalg.qr(rng.standard_normal((10, 10)))[0]
    assert float(gram(hs, np.float32(wide), mask, ((0, 0), (1, 1)))) < 1e-10


def test_pet_zero_on_linear_sequences_and_short_sequences():
    rng = np.random.default_rng(14)
    a, b = rng.standard_normal((B, 1, 8)), rng.standard_normal((B, 1, 8))
    h = np.float32(a + np.arange(L)[None, :, None] * b)
    pet = jax.jit(losses.pet_loss)
    assert float(pet(h, np.ones((B, L)))) < 1e-10
    assert float(pet(h[:, :2], np.ones((B, 2)))) == 0.0
    mask = np.ones((B, L))
    mask[:, 2::3] = 0  # no three consecutive valid tokens
    assert float(pet(np.float32(rng.standard_normal((B, L, 8))), mask)) == 0.0


def test_default_layer_map():
    assert losses.default_layer_map(4, 4) == ((0, 0), (1, 1), (2, 2), (3, 3))
    assert losses.default_layer_map(4, 12) == ((0, 2), (1, 5), (2, 8), (3, 11))
    assert losses.default_layer_map(4, 6) == ((0, 1), (1, 2), (2, 4), (3, 5))  # 1.5 -> 2, 4.5 -> 5
    assert losses.default_layer_map(4, 2) == ((0, 0), (1, 0), (2, 1), (3, 1))


def _all_losses(s, t, mask, h, labels):
    """Every masked loss as a function of (student logits, teacher logits, hidden), by name."""
    lm = ((0, 0), (1, 1))
    hid = jnp.stack([h, 2.0 * h])
    w = jnp.eye(h.shape[-1])[:, :3]
    # Teacher-side inputs are linear in h so that the test itself puts no NaN into masked cotangents.
    return {
        **{f"{k}{b}": losses.divergence(s, t, mask, k, b, 2.0) for k, b in KINDS},
        "ce": losses.cross_entropy(s, labels, mask),
        "hidden": losses.hidden_matching(hid, 0.5 * hid[..., :3] + 1.0, w, mask, lm),
        "gram": losses.relational_gram_loss(hid, jnp.flip(hid, -1) + 1.0, mask, lm),
        "pet": losses.pet_loss(h, mask),
        "verif": losses.verification_loss(h[..., 0], s, t, mask),
        "chunked_jsd": losses.chunked_divergence(h, w, h, jnp.flip(w, 0), mask, "jsd", 0.5, 2.0, chunk_size=5),
        "chunked_ce": losses.chunked_cross_entropy(h, w, jnp.minimum(labels, 2), 5, mask),
    }


@jax.jit
def _all_losses_and_grad(s, t, mask, h, labels):
    """All losses, and the gradient of a generic weighted sum of them: a NaN or nonzero in any one shows."""
    def total(s, t, h):
        values = _all_losses(s, t, mask, h, labels)
        return sum((1.0 + 0.37 * k) * v for k, v in enumerate(jax.tree.leaves(values))), values
    grads, values = jax.grad(total, argnums=(0, 1, 2), has_aux=True)(s, t, h)
    return values, grads


@pytest.mark.parametrize("garbage", (1e30, -3e38, np.inf, np.nan))
def test_masked_contents_are_irrelevant(garbage):
    rng = np.random.default_rng(15)
    s, t, mask = rand_logits(rng), rand_logits(rng), rand_mask(rng)
    h = np.float32(rng.standard_normal((B, L, 4)))
    labels = rng.integers(0, V, (B, L))
    clean, clean_grads = _all_losses_and_grad(s, t, mask, h, labels)
    dirty, dirty_grads = _all_losses_and_grad(*(with_garbage(x, mask, garbage) for x in (s, t)), mask,
                                              with_garbage(h, mask, garbage), labels)
    for name in clean:
        np.testing.assert_array_equal(np.asarray(dirty[name]), np.asarray(clean[name]), err_msg=name)
    for g, g_clean in zip(dirty_grads, clean_grads):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g_clean))
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(with_garbage(np.asarray(g), mask, 0.0), g)  # 0 at masked tokens


def test_all_masked_gives_zero_and_finite_grads():
    rng = np.random.default_rng(16)
    s, t, h = rand_logits(rng), rand_logits(rng), np.float32(rng.standard_normal((B, L, 4)))
    mask, labels = np.zeros((B, L), np.float32), rng.integers(0, V, (B, L))
    values, grads = _all_losses_and_grad(s, t, mask, h, labels)
    for name, val in values.items():
        assert float(val) == 0.0, name
    for g in grads:
        assert np.all(g == 0.0)
    values, _ = _all_losses_and_grad(s, t, np.ones((B, L), np.float32), h, np.full((B, L), -100))
    assert float(values["ce"]) == 0.0 and float(values["chunked_ce"]) == 0.0
    assert float(losses.forward_kl(s, t, mask, num_valid=0)) == 0.0


# ------------------------------------------------------------------------------------------ chunked


def _chunked_inputs(rng):
    n_b, n_l, ds, dt, v = 2, 9, 6, 8, 19
    hs, ht = np.float32(rng.standard_normal((n_b, n_l, ds))), np.float32(rng.standard_normal((n_b, n_l, dt)))
    ws, wt = np.float32(rng.standard_normal((ds, v))), np.float32(rng.standard_normal((dt, v)))
    mask = rand_mask(rng, (n_b, n_l))
    labels = np.where(mask > 0, rng.integers(0, v, (n_b, n_l)), -100)
    return hs, ws, ht, wt, mask, labels


@pytest.mark.parametrize("kind,beta,chunks", (  # chunks: (chunk_size, num_valid); 18 tokens
    ("forward_kl", 0.0, ((6, None), (7, None), (64, None))),  # chunk divides the tokens, does not, exceeds
    ("reverse_kl", 0.0, ((7, 31),)),  # num_valid: the global count of valid tokens
    ("jsd", 0.5, ((6, 31), (7, None))),
    ("ce", 0.0, ((6, None), (7, 31))),
))
def test_chunked_matches_plain(kind, beta, chunks):
    hs, ws, ht, wt, mask, labels = _chunked_inputs(np.random.default_rng(17))
    if kind == "ce":
        def plain(hs, ws, num_valid):
            return losses.cross_entropy(hs @ ws, labels, num_valid=num_valid)

        def chunked(hs, ws, chunk_size, num_valid):
            return losses.chunked_cross_entropy(hs, ws, labels, chunk_size, num_valid=num_valid)
    else:
        def plain(hs, ws, num_valid):
            return losses.divergence(hs @ ws, ht @ wt, mask, kind, beta, 1.7, num_valid)

        def chunked(hs, ws, chunk_size, num_valid):
            return losses.chunked_divergence(hs, ws, ht, wt, mask, kind, beta, 1.7, chunk_size, num_valid)
    for chunk_size, num_valid in chunks:
        want, (want_g_hs, want_g_ws) = jax.value_and_grad(plain, argnums=(0, 1))(hs, ws, num_valid)
        got, (got_g_hs, got_g_ws) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)), static_argnums=2)(
            hs, ws, chunk_size, num_valid)
        assert_close(got, want)
        assert_close(got_g_hs, want_g_hs)
        assert_close(got_g_ws, want_g_ws)


def test_chunked_agreement():
    hs, ws, ht, wt, mask, _ = _chunked_inputs(np.random.default_rng(18))
    _, agree = losses.chunked_divergence(hs, ws, ht, wt, mask, chunk_size=5, return_agreement=True)
    want = np.argmax(hs @ ws, -1) == np.argmax(ht @ wt, -1)
    assert 0 < want.sum() < want.size
    np.testing.assert_array_equal(np.asarray(agree)[mask > 0], want[mask > 0])


def _temp_bytes(f, *args):
    compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_does_not_grow_with_logits():
    """L and V both x4: the plain loss's temp memory grows ~16x (B*L*V logits), the chunked one's far less."""
    plain, chunked = {}, {}
    for n_l, v in ((32, 512), (128, 2048)):
        hs, ws = jnp.ones((2, n_l, 16)), jnp.ones((16, v))
        ht, wt, mask = jnp.ones((2, n_l, 16)), jnp.ones((16, v)), jnp.ones((2, n_l))
        plain[v] = _temp_bytes(lambda hs, ws, ht, wt, m: losses.forward_kl(hs @ ws, ht @ wt, m),
                               hs, ws, ht, wt, mask)
        chunked[v] = _temp_bytes(lambda hs, ws, ht, wt, m: losses.chunked_divergence(hs, ws, ht, wt, m, chunk_size=16),
                                 hs, ws, ht, wt, mask)
    logits_bytes = 2 * 128 * 2048 * 4
    assert plain[2048] / plain[512] > 12, plain
    assert plain[2048] > 2 * logits_bytes, plain
    assert chunked[2048] / chunked[512] < 6, chunked  # O(chunk * V) logits + O(L * D) scan residuals
    assert chunked[2048] < logits_bytes / 2, chunked
