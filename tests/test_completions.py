"""Where completions come from: the lmbda schedule (values against numpy, draws at the scheduled rate) and the
source draw."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from so8t_jax.completions import PolicyConfig, choose_source


def _numpy_lmbda(kind, start, end, ramp, step, total):
    if kind == "constant":
        return end
    t = min(max(step / max(ramp * total, 1.0), 0.0), 1.0)
    shape = t if kind == "linear" else 0.5 - 0.5 * math.cos(math.pi * t)
    return start + (end - start) * shape


class LmbdaScheduleTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("constant", 0.0, 0.5, 0.5), ("linear", 0.0, 0.8, 0.5), ("cosine", 0.1, 0.9, 0.3),
                              ("linear", 0.6, 0.2, 1.0))
    def test_values(self, kind, start, end, ramp):
        policy = PolicyConfig(lmbda=end, lmbda_schedule=kind, lmbda_start=start, lmbda_ramp=ramp)
        total = 40
        at = self.variant(lambda s: policy.lmbda_at(s, total))
        got = np.asarray([at(jnp.int32(s)) for s in range(total + 5)])
        want = np.asarray([_numpy_lmbda(kind, start, end, ramp, s, total) for s in range(total + 5)])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_draws_follow_the_schedule(kind):
    """The step's draw (rng = fold_in(key(seed), position), as the trainer passes it) is on-policy at the
    scheduled rate: in each quarter of the run the count matches the summed probabilities within 4 sigma, and
    the first steps (lmbda near 0) are offline."""
    total, seed = 4000, 0
    policy = PolicyConfig(lmbda=0.8, lmbda_schedule=kind, lmbda_start=0.0, lmbda_ramp=0.5)
    steps = jnp.arange(total)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(seed), s))(steps)
    lmbdas = jax.vmap(lambda s: policy.lmbda_at(s, total))(steps)
    sources = np.asarray(jax.vmap(lambda k, lm: choose_source(k, policy, lm))(keys, lmbdas))
    p = np.asarray(lmbdas)
    for q in range(4):
        window = slice(q * total // 4, (q + 1) * total // 4)
        on = (sources[window] == 1).sum()
        expect, sd = p[window].sum(), math.sqrt((p[window] * (1 - p[window])).sum())
        assert abs(on - expect) <= 4 * sd + 1, (q, on, expect)
    assert (sources[:20] == 1).sum() <= 2 and set(np.unique(sources)) <= {0, 1}


def test_seq_kd_and_generates():
    assert not PolicyConfig(lmbda=0.0).generates
    assert PolicyConfig(lmbda=0.0, lmbda_schedule="linear", lmbda_start=0.3).generates
    assert PolicyConfig(seq_kd=True).generates
    key = jax.random.key(3)
    assert int(choose_source(key, PolicyConfig(lmbda=0.0, seq_kd=True))) == 2
    assert int(choose_source(key, PolicyConfig(lmbda=1.0, seq_kd=True))) == 1
    with pytest.raises(ValueError, match="lmbda_schedule"):
        PolicyConfig(lmbda_schedule="step")
    with pytest.raises(ValueError, match="lmbda_ramp"):
        PolicyConfig(lmbda_ramp=1.5)
