"""so8t_jax/fused_head.py: the chunked losses' gradient formed in their forward pass, against float64 finite
differences of the float64 losses, for every input (student and teacher sides); only what is differentiated is
computed (program FLOPs); bf16 inputs; a quantized teacher head."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from test_losses import fd_grad, np_cross_entropy, np_divergence, rand_mask

from so8t_jax import flops, losses

N_B, N_L, DS, DT, V, CHUNK = 2, 9, 6, 8, 19, 7  # 18 tokens: chunks of 7 leave 3 padded rows


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    hs, ht = rng.standard_normal((N_B, N_L, DS)), rng.standard_normal((N_B, N_L, DT))
    ws, wt = rng.standard_normal((DS, V)) * 0.5, rng.standard_normal((DT, V)) * 0.5
    mask = rand_mask(rng, (N_B, N_L))
    labels = np.where(mask > 0, rng.integers(0, V, (N_B, N_L)), -100)
    return hs, ws, ht, wt, mask, labels


def _np_divergence_of(i, args, mask, kind, beta):
    """The float64 divergence as a function of input i of (hs, ws, ht, wt), the others fixed."""
    def f(x):
        a = list(args)
        a[i] = x
        return np_divergence(a[0] @ a[1], a[2] @ a[3], mask, kind, beta, 1.7)
    return f


class FusedHeadTest(chex.TestCase, parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("forward_kl", 0.0), ("jsd", 0.5), ("reverse_kl", 0.0))
    def test_divergence_gradients_match_float64_finite_differences(self, kind, beta):
        hs, ws, ht, wt, mask, _ = _inputs()

        def loss(hs, ws, ht, wt):
            return losses.chunked_divergence(hs, ws, ht, wt, mask, kind, beta, 1.7, chunk_size=CHUNK)
        value, grads = self.variant(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
            *(jnp.float32(x) for x in (hs, ws, ht, wt)))
        args = (hs, ws, ht, wt)
        np.testing.assert_allclose(float(value), np_divergence(hs @ ws, ht @ wt, mask, kind, beta, 1.7), rtol=1e-5)
        for i, g in enumerate(grads):
            chex.assert_shape(g, args[i].shape)
            np.testing.assert_allclose(np.asarray(g), fd_grad(_np_divergence_of(i, args, mask, kind, beta), args[i]),
                                       rtol=2e-3, atol=2e-5, err_msg=f"{kind} input {i}")

    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy_gradients_match_float64_finite_differences(self):
        hs, ws, _, _, mask, labels = _inputs(1)

        def loss(hs, ws):
            return losses.chunked_cross_entropy(hs, ws, labels, CHUNK, mask)
        value, (g_hs, g_ws) = self.variant(jax.value_and_grad(loss, argnums=(0, 1)))(jnp.float32(hs), jnp.float32(ws))
        np.testing.assert_allclose(float(value), np_cross_entropy(hs @ ws, labels, mask), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(g_hs), fd_grad(lambda x: np_cross_entropy(x @ ws, labels, mask), hs),
                                   rtol=2e-3, atol=2e-5)
        np.testing.assert_allclose(np.asarray(g_ws), fd_grad(lambda x: np_cross_entropy(hs @ x, labels, mask), ws),
                                   rtol=2e-3, atol=2e-5)


def test_only_what_is_differentiated_is_computed():
    """The teacher's side under stop_gradient adds no matmul to the gradient, a frozen student head drops its
    [D, V] gradient matmul: per chunk the logits of both (2), then d hidden and d head of the student's."""
    hs, ws, ht, wt, mask, _ = (jnp.float32(x) for x in _inputs())
    chunks = -(-N_B * N_L // CHUNK)
    matmul_s, matmul_t = 2 * chunks * CHUNK * DS * V, 2 * chunks * CHUNK * DT * V

    def loss(hs, ws):
        return losses.chunked_divergence(hs, ws, jax.lax.stop_gradient(ht), jax.lax.stop_gradient(wt), mask,
                                         chunk_size=CHUNK)
    value = flops.program_flops(loss, hs, ws)
    both = flops.program_flops(jax.grad(loss, argnums=(0, 1)), hs, ws)
    hidden_only = flops.program_flops(jax.grad(lambda hs: loss(hs, jax.lax.stop_gradient(ws))), hs)
    assert value == matmul_s + matmul_t
    assert both == value + 2 * matmul_s
    assert hidden_only == value + matmul_s
    # and the gradients do not depend on what else is differentiated
    g_hs, _ = jax.grad(loss, argnums=(0, 1))(hs, ws)
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda hs: loss(hs, jax.lax.stop_gradient(ws)))(hs)),
                                  np.asarray(g_hs))


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    hs, ws, ht, wt, mask, _ = (jnp.float32(x) for x in _inputs(2))

    def grads(dtype):
        def loss(hs, ws):
            return losses.chunked_divergence(hs, ws, ht.astype(dtype), wt.astype(dtype), mask, "jsd", 0.5,
                                             chunk_size=CHUNK)
        return jax.grad(loss, argnums=(0, 1))(hs.astype(dtype), ws.astype(dtype))
    g16, g32 = grads(jnp.bfloat16), grads(jnp.float32)
    for a, b in zip(g16, g32):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b), rtol=0.1, atol=0.02 * np.abs(b).max())


def test_a_quantized_teacher_head_gives_the_dequantized_heads_gradient():
    """A tied teacher's Q8_0 embedding as the teacher's head (blocks viewed transposed, quant.head): the student's
    gradient equals the one with that head dequantized."""
    from fixtures import quantize

    from so8t_jax import quant
    hs, ws, _, _, mask, _ = (jnp.float32(x) for x in _inputs(3))
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((V, 32)).astype(np.float32)
    blocks = quantize(emb, "Q8_0").reshape(V, 1, 34)  # one 32-value block (34 bytes) per vocabulary row
    packed = quant.QuantizedWeight(jnp.asarray(blocks), None, ("Q8_0",), (V, 32), False, "float32")
    head_q, head_d = quant.head(packed), quant.dequantize(packed).T
    ht = jnp.float32(rng.standard_normal((N_B, N_L, 32)))

    def grad(head_t):
        return jax.grad(lambda hs: losses.chunked_divergence(hs, ws, ht, head_t, mask, chunk_size=CHUNK))(hs)
    np.testing.assert_allclose(np.asarray(grad(head_q)), np.asarray(grad(head_d)), rtol=1e-5, atol=1e-7)
