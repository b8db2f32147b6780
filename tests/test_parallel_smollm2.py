"""Real size, marked slow (CI runs it with `make test-slow`): the smoke config with the SmolLM2 GGUF teacher
(30 layers) on 8 fake CPU devices, on-policy, in pmap and mesh mode, against the same run on one device.
The first real-size pmap run used to abort the process in step 2 (XLA's CPU all-reduce never rendezvoused)."""
import jax
import numpy as np
import pytest
from test_trainer import ROOT, _final_params  # noqa: F401 (ROOT puts configs/ on the path)

from configs import smoke
from so8t_jax.trainer import train

pytestmark = pytest.mark.slow


def _config(out, mode):
    c = smoke.get_config()
    c.output_dir = str(out)
    c.parallel.mode = mode
    c.train.batch_size = 8
    c.train.steps = 3
    c.policy.lmbda = 1.0          # every step samples its completions (on-policy)
    c.policy.max_new_tokens = 12
    c.train.eval_every = 0
    c.train.sample_every = 0
    c.eval.at_end = False
    c.export.formats = ()
    # Adam divides each gradient by its own running RMS: with eps 1e-8 an embedding row whose gradient is zero
    # up to float32 rounding (a token no softmax gives mass to) moves by up to lr on rounding noise alone, and
    # the summation order of 8 devices' partial gradients differs from one device's. eps 1e-6 keeps those
    # rows still, so the comparison tests the distributed step, not the noise.
    c.optim.eps = 1e-6
    return c


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    results = train(_config(out, "single"))
    return results, _final_params(out / "smoke")[0]


@pytest.mark.parametrize("mode", ["pmap", "mesh"])
def test_real_size_parallel_run_matches_one_device(single, tmp_path, mode):
    assert jax.device_count() == 8
    results, want = single
    got_results = train(_config(tmp_path, mode))
    got, _ = _final_params(tmp_path / "smoke")
    assert got_results["steps"] == results["steps"] == 3
    assert got_results["final_metrics"]["on_policy"] == 1.0
    # the same completions were sampled (row-keyed sampling), so the same targets were trained on
    assert got_results["final_metrics"]["num_targets"] == results["final_metrics"]["num_targets"]
    for k in ("first", "last", "min"):
        assert got_results["loss"][k] == pytest.approx(results["loss"][k], rel=1e-5), k
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), want["params"], got["params"])
