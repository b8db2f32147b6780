"""Stability: group norms against float64 numpy, every anomaly kind, no false positives, rollback policy,
monitor state round trip, snapshots."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from so8t_jax.stability import (ANOMALY_KINDS, Monitor, RollbackPolicy, SnapshotKeeper, StabilityConfig,
                                flatten_norms, group_norms, update_ratios)

Y, D, F, V = 3, 8, 12, 20


def np_params(seed=0):
    """A decoder-shaped tree (stacked layers) plus a hidden-state projection, float32 and bfloat16 leaves."""
    rng = np.random.default_rng(seed)
    student = {"embed": rng.normal(size=(V, D)).astype(np.float32),
               "final_norm": rng.normal(size=(D,)).astype(np.float32),
               "lm_head": rng.normal(size=(D, V)).astype(np.float32),
               "layers": {"q": rng.normal(size=(Y, D, 2, 4)).astype(np.float32),
                          "attn_norm": rng.normal(size=(Y, D)).astype(np.float32),
                          "down": (rng.normal(size=(Y, F, D)) * 3).astype(np.float32),
                          "q_bias": np.zeros((Y, 2, 4), np.float32)}}
    return {"student": student, "proj": rng.normal(size=(D, 2 * D)).astype(np.float32)}


def test_group_norms_against_numpy():
    params = np_params()
    norms = jax.jit(group_norms)(jax.tree_util.tree_map(jnp.asarray, params))
    st = params["student"]
    assert set(norms) == {"embed", "final_norm", "lm_head", "proj", "layers/q", "layers/attn_norm", "layers/down",
                          "layers/q_bias"}
    for name in ("embed", "final_norm", "lm_head"):
        assert norms[name].shape == ()
        np.testing.assert_allclose(norms[name], np.linalg.norm(st[name].astype(np.float64)), rtol=1e-5)
    np.testing.assert_allclose(norms["proj"], np.linalg.norm(params["proj"].astype(np.float64)), rtol=1e-5)
    for name, x in st["layers"].items():
        want = [np.linalg.norm(x[i].astype(np.float64).ravel()) for i in range(Y)]
        assert norms[f"layers/{name}"].shape == (Y,)
        np.testing.assert_allclose(norms[f"layers/{name}"], want, rtol=1e-5)
    flat = flatten_norms(norms)
    assert flat["layers/down/2"] == pytest.approx(np.linalg.norm(st["layers"]["down"][2].astype(np.float64)),
                                                  rel=1e-5)
    assert len(flat) == 4 + 4 * Y and all(isinstance(v, float) for v in flat.values())
    # bfloat16 leaves are measured in float32; the ratio of updates to params per group
    bf = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    np.testing.assert_allclose(group_norms(bf)["embed"],
                               np.linalg.norm(np.asarray(bf["student"]["embed"], np.float64)), rtol=1e-5)
    half = jax.tree_util.tree_map(lambda x: x * 0.5, params)
    ratios = update_ratios(params, half)
    np.testing.assert_allclose(ratios["embed"], 0.5, rtol=1e-6)
    np.testing.assert_allclose(ratios["layers/q"], [0.5] * Y, rtol=1e-6)


CFG = StabilityConfig(every_n=1, spike_factor=3.0, window=20, min_history=10, max_grad_norm_factor=10.0,
                      collapse_eps=0.1, explode_factor=10.0, max_rollbacks=2)


def healthy_run(monitor, steps, seed=0, start=0):
    """Decreasing loss and grad norm with lognormal noise; returns every anomaly seen."""
    rng = np.random.default_rng(seed)
    found = []
    for t in range(start, start + steps):
        loss = (0.5 + 4.0 * np.exp(-t / 150)) * rng.lognormal(0.0, 0.25)
        grad = (0.3 + 2.0 * np.exp(-t / 100)) * rng.lognormal(0.0, 0.4)
        found += monitor.check(t, {"loss": loss, "grad_norm": grad, "lr": 1e-4})
    return found


def test_no_false_positives_on_noisy_decreasing_loss():
    init = {"embed": 2.0, "layers/q": np.array([1.0, 1.5, 0.0])}
    monitor = Monitor(CFG, init)
    rng = np.random.default_rng(1)
    found = []
    for t in range(500):
        loss = (0.5 + 4.0 * np.exp(-t / 150)) * rng.lognormal(0.0, 0.25)
        grad = (0.3 + 2.0 * np.exp(-t / 100)) * rng.lognormal(0.0, 0.4)
        drift = 1.0 + 0.5 * np.sin(t / 50)  # norms wander within [0.5, 1.5] x initial
        norms = {"embed": 2.0 * drift, "layers/q": np.array([1.0, 1.5, 0.3]) * drift}
        found += monitor.check(t, {"loss": loss, "grad_norm": grad}, norms)
    assert found == []
    assert len(monitor.history["loss"]) == 20 and monitor.num_anomalies == 0


def warmed(cfg=CFG, init=None):
    monitor = Monitor(cfg, init)
    assert healthy_run(monitor, 30) == []
    return monitor


@pytest.mark.parametrize("metrics,kind", [
    ({"loss": float("nan"), "grad_norm": 1.0}, "nonfinite_loss"),
    ({"loss": float("inf"), "grad_norm": 1.0}, "nonfinite_loss"),
    ({"loss": 3.0, "grad_norm": float("nan")}, "nonfinite_grad"),
    ({"loss": 1e3, "grad_norm": 1.0}, "loss_spike"),
    ({"loss": 3.0, "grad_norm": 1e4}, "grad_explosion"),
])
def test_each_metric_anomaly_and_history_untouched(metrics, kind):
    monitor = warmed()
    before = monitor.state_dict()
    found = monitor.check(30, metrics)
    assert [a.kind for a in found] == [kind] and found[0].step == 30 and kind in ANOMALY_KINDS
    assert found[0].value == metrics["loss" if "loss" in kind else "grad_norm"] or not np.isfinite(found[0].value)
    after = monitor.state_dict()
    assert after["losses"] == before["losses"] and after["grad_norms"] == before["grad_norms"]
    assert after["num_anomalies"] == 1


def test_spike_is_judged_against_healthy_median_only():
    monitor = Monitor(CFG)
    for t in range(20):
        assert monitor.check(t, {"loss": 1.0 + 0.01 * (t % 3)}) == []
    # A burst of spikes: each is judged against the same healthy median, none enters the window.
    for t in range(20, 40):
        found = monitor.check(t, {"loss": 5.0})
        assert [a.kind for a in found] == ["loss_spike"], t
        assert "median 1.01" in found[0].detail
    assert max(monitor.history["loss"]) <= 1.02
    # Below k x median is healthy; before min_history nothing is a spike.
    assert monitor.check(40, {"loss": 2.9}) == []
    fresh = Monitor(CFG)
    assert all(fresh.check(t, {"loss": 10.0 ** t}) == [] for t in range(CFG.min_history))


def test_absolute_grad_ceiling_applies_from_step_zero():
    monitor = Monitor(StabilityConfig(max_grad_norm=100.0, max_grad_norm_factor=0))
    assert monitor.check(0, {"loss": 1.0, "grad_norm": 99.0}) == []
    assert [a.kind for a in monitor.check(1, {"loss": 1.0, "grad_norm": 101.0})] == ["grad_explosion"]


def test_norm_collapse_and_explosion_per_layer():
    init = group_norms(jax.tree_util.tree_map(jnp.asarray, np_params()))
    monitor = Monitor(CFG, init)
    ref = flatten_norms(init)
    norms = {k: np.asarray(v) for k, v in jax.device_get(init).items()}
    assert monitor.check(0, {"loss": 1.0}, norms) == []
    collapsed = {**norms, "layers/q": norms["layers/q"] * np.array([1.0, 0.05, 1.0])}
    found = monitor.check(1, {"loss": 1.0}, collapsed)
    assert [(a.kind, a.detail.split()[0]) for a in found] == [("norm_collapse", "layers/q/1")]
    assert found[0].value == pytest.approx(0.05 * ref["layers/q/1"])
    exploded = {**norms, "lm_head": norms["lm_head"] * 11, "layers/down": norms["layers/down"] * [1, 1, np.inf]}
    found = monitor.check(2, {"loss": 1.0}, exploded)
    assert sorted((a.kind, a.detail.split()[0]) for a in found) == [("norm_explosion", "layers/down/2"),
                                                                   ("norm_explosion", "lm_head")]
    # zero-initialised biases have no reference and are never judged
    assert monitor.check(3, {"loss": 1.0}, {**norms, "layers/q_bias": norms["layers/q_bias"] + 5.0}) == []
    assert monitor.history["loss"] == [1.0, 1.0]  # steps 1 and 2 were anomalous


def test_monitor_state_round_trip_continues_identically():
    a = warmed(init={"embed": 1.0})
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint's meta carries
    b = Monitor(CFG)
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    rng = np.random.default_rng(5)
    for t in range(30, 80):
        metrics = {"loss": float(rng.lognormal(0, 1.0)), "grad_norm": float(rng.lognormal(0, 1.2))}
        norms = {"embed": float(rng.uniform(0.05, 12))}
        assert a.check(t, metrics, norms) == b.check(t, metrics, norms)
    assert a.num_anomalies > 0 and a.state_dict() == b.state_dict()


def test_rollback_policy_counts_and_stops():
    monitor = warmed()
    policy = RollbackPolicy(CFG)
    spike = monitor.check(31, {"loss": 1e3})
    d1 = policy.on_anomaly(spike, 31, batch_id=31)
    assert (d1.action, d1.lr_scale_factor, d1.skip_batch, d1.lr_scale) == ("rollback", 0.5, True, 0.5)
    assert "rollback 1/2 at step 31" in d1.message and "loss_spike" in d1.message
    d2 = policy.on_anomaly(monitor.check(40, {"loss": float("nan")}), 40, batch_id=40)
    assert (d2.action, d2.lr_scale) == ("rollback", 0.25)
    assert policy.should_skip(31) and policy.should_skip(40) and not policy.should_skip(32)
    resumed = RollbackPolicy(CFG)
    resumed.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    for p in (policy, resumed):
        d3 = p.on_anomaly(monitor.check(55, {"loss": 3.0, "grad_norm": 1e5}), 55)
        assert d3.action == "stop" and p.rollbacks == 2
        assert d3.message.startswith("stopped after 2 rollbacks: last anomaly grad_explosion")
        assert "at step 55" in d3.message and "lower the learning rate" in d3.message
    assert RollbackPolicy(StabilityConfig(max_rollbacks=0)).on_anomaly(spike, 31).action == "stop"
    with pytest.raises(ValueError, match="at least one"):
        policy.on_anomaly([], 1)


@pytest.mark.parametrize("key,value", [("every_n", 0), ("spike_factor", 0.5), ("window", 0), ("min_history", 21),
                                       ("max_grad_norm_factor", 1.0), ("max_grad_norm", -1.0),
                                       ("collapse_eps", 1.0), ("explode_factor", 0.9), ("snapshot_every", 0),
                                       ("keep_snapshots", 0), ("lr_backoff", 0.0), ("lr_backoff", 1.5),
                                       ("max_rollbacks", -1)])
def test_config_validation_names_the_key(key, value):
    with pytest.raises(ValueError, match=f"stability.{key} "):
        StabilityConfig(**{key: value})


def test_snapshot_keeper_keeps_k_and_restores_bitwise(tmp_path):
    keeper = SnapshotKeeper(tmp_path / "snapshots", keep=2)
    assert keeper.latest() is None
    rng = np.random.default_rng(0)
    states = {}
    for step in (0, 100, 200, 300):
        states[step] = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                        "count": jnp.asarray(step, jnp.int32), "rng": jax.random.key(step),
                        "bf": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16)}
        keeper.save(step, states[step], {"step": step, "data_pos": step * 8})
    assert keeper.steps() == [200, 300]
    keeper.close()
    keeper = SnapshotKeeper(tmp_path / "snapshots", keep=2)
    step, state, meta = keeper.latest(target=states[0])
    assert step == 300 and meta == {"step": 300, "data_pos": 2400}
    for name in ("w", "count", "bf"):
        assert state[name].dtype == states[300][name].dtype
        assert np.asarray(state[name]).tobytes() == np.asarray(states[300][name]).tobytes()
    np.testing.assert_array_equal(jax.random.key_data(state["rng"]), jax.random.key_data(states[300]["rng"]))
    keeper.close()
