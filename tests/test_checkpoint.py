"""Orbax checkpoints: bitwise round trips of the full training state, keep-K, best, final, partial saves."""
import os

import jax
import optax
import jax.numpy as jnp
import numpy as np
import pytest

from so8t_jax.checkpoint import Checkpointer
from so8t_jax.config import ModelConfig
from so8t_jax.model import init_params
from so8t_jax.optim import OptimConfig, make_optimizer
from so8t_jax.train_step import TrainState, init_state

TINY = ModelConfig(family="llama", vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
                   ffn_dim=32)


@pytest.fixture(scope="module")
def train_state() -> TrainState:
    """A TrainState whose adam moments and int32 count are non-trivial (a few updates on random grads)."""
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=2))

    @jax.jit  # one compilation instead of hundreds of eager ops
    def build(key):
        state = init_state(init_params(TINY, key), optimizer)

        def update(i, carry):  # a loop, not unrolled: compiled once
            params, opt_state = carry
            grads = jax.tree_util.tree_map(lambda x: jnp.sin(7.0 * (i + 1) * x) + 0.1 * i, params)
            upd, opt_state = optimizer.update(grads, opt_state, params)
            return jax.tree_util.tree_map(jnp.add, params, upd), opt_state

        params, opt_state = jax.lax.fori_loop(0, 3, update, (state.params, state.opt_state))
        return TrainState(jnp.asarray(3, jnp.int32), params, opt_state, jnp.asarray(0.25, jnp.float32))

    return build(jax.random.key(0, impl="unsafe_rbg"))  # rbg: threefry's init compiles ~10x slower on CPU


def full_tree(train: TrainState, seed=0):
    return {"train": train, "rng": jax.random.key(seed + 7),
            "rngs": jax.random.split(jax.random.key(seed + 8), 3), "raw_key": jax.random.PRNGKey(seed + 9),
            "rbg": jax.random.key(seed, impl="rbg"),
            "data_pos": np.int64(1234 + seed), "epoch": 2, "frac": 0.5, "seen": np.arange(4, dtype=np.int32)}


def other_values(train: TrainState) -> TrainState:
    """Same layout, other (zero) values: a restore target must only lend its structure."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.zeros(x.shape, x.dtype)), train)


def host_copy(tree):
    """Independent host bytes of every leaf (keys as their key data), taken before any donation."""
    def one(x):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.array(x, copy=True)
    return jax.tree_util.tree_map(one, tree)


def assert_bitwise(restored, expected, reference):
    """Same pytree structure and leaf types as `reference`, same bytes and dtypes as `expected`."""
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(reference)
    for r, e, ref in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(expected),
                         jax.tree_util.tree_leaves(reference)):
        assert type(r) is type(ref), (type(r), type(ref))
        is_key = hasattr(r, "dtype") and jax.dtypes.issubdtype(r.dtype, jax.dtypes.prng_key)
        if is_key:
            assert r.dtype == ref.dtype
            r = jax.random.key_data(r)
        r = np.asarray(r)
        assert r.dtype == e.dtype and r.shape == e.shape
        assert r.tobytes() == e.tobytes()


def test_roundtrip_bitwise_with_donation(tmp_path, train_state):
    tree = full_tree(jax.tree_util.tree_map(jnp.copy, train_state))  # a copy: this test donates it
    expected = host_copy(tree)
    counts = optax.tree_utils.tree_get_all_with_path(tree["train"].opt_state, "count")
    assert counts and all(int(c) == 3 for _, c in counts)  # real adam state (trunk and heads groups): 3 updates
    ckpt = Checkpointer(tmp_path / "orbax", keep=2)
    ckpt.save(10, tree, {"data_pos": np.int64(1234), "seed": 0, "rollbacks": 1})
    # The trainer donates the state into the next step right after an (async) save.
    clobber = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x * 0 - 1, s), donate_argnums=0)
    jax.block_until_ready(clobber(tree["train"]))
    target = full_tree(other_values(train_state), seed=1)
    restored, meta = ckpt.restore(target=target)
    assert meta == {"data_pos": 1234, "seed": 0, "rollbacks": 1}
    assert_bitwise(restored, expected, target)
    assert all(c.dtype == jnp.int32 for _, c in optax.tree_utils.tree_get_all_with_path(
        restored["train"].opt_state, "count"))
    # An abstract target (jax.eval_shape) gives the same result.
    abstract = {**jax.eval_shape(lambda: {k: target[k] for k in ("train", "rng", "rngs", "raw_key", "rbg")}),
                "data_pos": np.int64(0), "epoch": 0, "frac": 0.0, "seen": np.zeros(4, np.int32)}
    again, _ = ckpt.restore(10, target=abstract)
    assert_bitwise(again, expected, target)
    ckpt.close()


def test_keep_k_prunes_and_resume_sees_steps(tmp_path):
    small = {"w": jnp.arange(3.0), "n": np.int64(0)}
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, {"w": small["w"] * step, "n": np.int64(step)}, {"step": step})
    ckpt = Checkpointer(tmp_path, keep=2)  # a resumed run
    assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
    state, meta = ckpt.restore(4, target=small)
    np.testing.assert_array_equal(state["w"], np.arange(3.0) * 4)
    assert state["n"] == 4 and isinstance(state["n"], np.int64) and meta == {"step": 4}
    # After a rollback the trainer saves an earlier step again: the abandoned later steps go.
    ckpt.save(3, {"w": small["w"] * -1, "n": np.int64(3)}, {"step": 3})
    assert ckpt.all_steps() == [3]
    assert ckpt.restore(target=small)[1] == {"step": 3}
    ckpt.close()


def test_best_keeps_only_the_best(tmp_path):
    tree = {"w": jnp.zeros(2)}
    ckpt = Checkpointer(tmp_path, keep=3)
    assert ckpt.best_metric() is None
    assert ckpt.save_best(1, {"w": jnp.full(2, 1.0)}, {"step": 1}, metric=2.0)
    assert not ckpt.save_best(2, {"w": jnp.full(2, 2.0)}, {"step": 2}, metric=3.0)      # worse
    assert not ckpt.save_best(3, {"w": jnp.full(2, 3.0)}, {"step": 3}, metric=2.0)      # not strictly better
    assert not ckpt.save_best(4, {"w": jnp.full(2, 4.0)}, {"step": 4}, metric=float("nan"))
    assert ckpt.save_best(5, {"w": jnp.full(2, 5.0)}, {"step": 5}, metric=1.0)
    ckpt.close()
    ckpt = Checkpointer(tmp_path, keep=3)  # resumed: compares against the stored best
    assert ckpt.best_metric() == 1.0
    assert not ckpt.save_best(6, {"w": jnp.full(2, 6.0)}, {}, metric=1.5)
    assert ckpt.all_steps("best") == [5] and ckpt.all_steps() == []
    state, meta = ckpt.restore(target=tree, kind="best")
    np.testing.assert_array_equal(state["w"], [5.0, 5.0])
    assert meta == {"step": 5, "best_metric": 1.0, "best_mode": "min"}
    ckpt.close()
    maxi = Checkpointer(tmp_path / "other")
    assert maxi.save_best(1, tree, {}, metric=0.5, mode="max")
    assert not maxi.save_best(2, tree, {}, metric=0.4, mode="max")
    assert maxi.save_best(3, tree, {}, metric=0.6, mode="max") and maxi.all_steps("best") == [3]
    with pytest.raises(ValueError, match="mode"):
        maxi.save_best(4, tree, {}, metric=0.6, mode="median")
    maxi.close()
    assert sorted(os.listdir(tmp_path)) == ["best", "other", "steps"]


def test_final(tmp_path, train_state):
    tree = {"train": train_state, "data_pos": np.int64(99)}
    expected = host_copy(tree)
    ckpt = Checkpointer(tmp_path)
    ckpt.save_final(tree, {"done": True}, step=3)
    ckpt.close()
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step("final") == 3
    restored, meta = ckpt.restore(target=tree, kind="final")
    assert meta == {"done": True}
    assert_bitwise(restored, expected, tree)
    # A TrainState alone: the step comes from state.step.
    ckpt.save_final(tree["train"], {})
    assert ckpt.all_steps("final") == [3]  # same step replaces
    ckpt.close()


def test_half_written_checkpoint_is_ignored(tmp_path):
    tree = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"w": tree["w"] + 1}, {"step": 1})
    ckpt.save(2, {"w": tree["w"] + 2}, {"step": 2})
    ckpt.close()
    # A save killed mid-write leaves Orbax's tmp folder (renamed to "3" only once complete).
    partial = tmp_path / "steps" / "3.orbax-checkpoint-tmp-1712345678"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [1, 2]
    state, meta = ckpt.restore(target=tree)
    np.testing.assert_array_equal(state["w"], np.arange(4.0) + 2)
    assert meta == {"step": 2}
    ckpt.save(3, {"w": tree["w"] + 3}, {"step": 3})  # the same step can still be written properly
    assert ckpt.restore(target=tree)[1] == {"step": 3}
    ckpt.close()
