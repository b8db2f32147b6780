"""The step's compute policies against the plain float32 step: bfloat16 compute with float32 master weights,
rematerialisation, chunked losses (the default), and a non-finite step that never reaches the weights."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_step import ALL_TERMS, OPT, STUDENT, TEACHER, _batch, _setup

from so8t_jax import defaults, objective, optim, train_step


def _step_once(loss_cfg, optim_cfg=OPT, teacher=None, state=None):
    s, t = _setup(loss_cfg, optim_cfg)
    step, _ = train_step.make_step(STUDENT, TEACHER, loss_cfg, optim_cfg)
    return s if state is None else state, jax.jit(step)(s if state is None else state,
                                                        t if teacher is None else teacher, _batch(),
                                                        jax.random.key(0))


def _grads(loss_cfg, batch=None):
    state, teacher = _setup(loss_cfg)
    batch = _batch() if batch is None else batch
    counts = objective.batch_counts(batch, loss_cfg)

    def f(p):
        return objective.loss_terms(p, teacher, batch, counts, STUDENT, TEACHER, loss_cfg)["loss"]
    return jax.jit(jax.value_and_grad(f))(state.params)


def test_recipes_default_to_chunked_losses():
    assert defaults.get_config().loss.chunk_size > 0 and objective.LossConfig().chunk_size > 0


@pytest.mark.parametrize("change", [{"chunk_size": 5}, {"chunk_size": 256}, {"remat": "full"}, {"remat": "dots"}])
def test_chunking_and_remat_keep_loss_and_gradients(change):
    plain = dataclasses.replace(ALL_TERMS, chunk_size=0, remat="none")
    loss0, g0 = _grads(plain)
    loss1, g1 = _grads(dataclasses.replace(plain, **change))
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    chex.assert_trees_all_close(g1, g0, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kd_weight", [1.0, 0.0])  # 0: the cross-entropy term alone
def test_chunked_losses_skip_prompt_positions_exactly(kd_weight):
    """A [prompt P | completion] batch (prompt_ids present): the chunked losses start at position P - 1, and give
    the loss and gradients of the plain full-logits path over every position."""
    batch = dict(_batch(length=12, seed=3))
    batch["labels"] = batch["labels"].at[:, :5].set(-100)
    batch["prompt_ids"] = batch["input_ids"][:, :5]
    plain = dataclasses.replace(ALL_TERMS, kd_weight=kd_weight, chunk_size=0, remat="none")
    loss0, g0 = _grads(plain, batch)
    loss1, g1 = _grads(dataclasses.replace(plain, chunk_size=3), batch)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    chex.assert_trees_all_close(g1, g0, atol=1e-6, rtol=1e-5)
    assert objective._first_target(batch) == 4 and objective._first_target(_batch()) == 0


def test_frozen_embedding_stays_and_its_gradient_is_not_computed():
    """optim.freeze = ("embed", "lm_head") (an untied student): the step leaves both bitwise, moves the rest, and
    its compiled program does fewer FLOPs (cost_analysis): the output layer's [D, V] weight gradient (2 D V FLOPs
    per target position, 8 rows x 11 here) is never formed."""
    frozen = dataclasses.replace(OPT, freeze=("embed", "lm_head"))
    before, (after, metrics) = _step_once(ALL_TERMS, frozen)
    for name in ("embed", "lm_head"):
        np.testing.assert_array_equal(np.asarray(after.params["student"][name]),
                                      np.asarray(before.params["student"][name]))
    moved = after.params["student"]["layers"]["q"] - before.params["student"]["layers"]["q"]
    assert np.abs(np.asarray(moved)).min() > 0

    def flops(optim_cfg):
        s, t = _setup(ALL_TERMS, optim_cfg)
        step, _ = train_step.make_step(STUDENT, TEACHER, ALL_TERMS, optim_cfg)
        return jax.jit(step).lower(s, t, _batch(), jax.random.key(0)).compile().cost_analysis()["flops"]
    assert flops(frozen) < flops(OPT) - 2 * STUDENT.d_model * STUDENT.vocab_size * 8 * 11 * 0.9


def test_bfloat16_compute_step_is_close_to_float32_and_keeps_float32_masters():
    (_, (s32, m32)) = _step_once(ALL_TERMS)
    (_, (s16, m16)) = _step_once(dataclasses.replace(ALL_TERMS, compute_dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s16.params))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree_util.tree_leaves(s16.opt_state)
               if hasattr(x, "dtype"))
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=3e-2)
    np.testing.assert_allclose(float(m16["grad_norm"]), float(m32["grad_norm"]), rtol=5e-2)
    # the update itself (lr-sized) agrees: Adam's normalisation makes it depend on gradient signs mostly
    delta16 = jax.tree_util.tree_map(lambda a, b: a - b, s16.params, _setup(ALL_TERMS)[0].params)
    delta32 = jax.tree_util.tree_map(lambda a, b: a - b, s32.params, _setup(ALL_TERMS)[0].params)
    agree = np.mean([np.mean(np.sign(np.asarray(a)) == np.sign(np.asarray(b)))
                     for a, b in zip(jax.tree_util.tree_leaves(delta16), jax.tree_util.tree_leaves(delta32))])
    assert agree > 0.9


def test_update_below_bfloat16_resolution_still_moves_the_float32_masters():
    lr = 1e-6  # a weight of ~0.3 has bf16 spacing 2**-10 ~ 1e-3: a bf16 master would not move at all
    tiny = optim.OptimConfig(learning_rate=lr, min_lr=lr, warmup_steps=0, total_steps=10, schedule="constant",
                             weight_decay=0.0, max_grad_norm=0.0)
    lc = dataclasses.replace(ALL_TERMS, compute_dtype="bfloat16")
    before, (after, _) = _step_once(lc, tiny)  # plain jit: `before` is not donated
    q0, q1 = np.asarray(before.params["student"]["layers"]["q"]), np.asarray(after.params["student"]["layers"]["q"])
    moved = np.abs(q1 - q0)
    assert moved.max() <= 1.5 * lr and np.mean(moved > 0.5 * lr) > 0.5  # Adam's first step: ~lr per weight
    q0_bf16 = jnp.asarray(q0, jnp.bfloat16)
    lost = np.asarray(q0_bf16 + jnp.asarray(q1 - q0, jnp.bfloat16) == q0_bf16)
    assert lost.mean() > 0.99  # the same update applied to bfloat16 weights would vanish


def test_non_finite_step_leaves_weights_and_moments_unchanged():
    state, teacher = _setup(ALL_TERMS)
    nan_teacher = jax.tree_util.tree_map(lambda x: x * jnp.nan, teacher)
    step, _ = train_step.make_step(STUDENT, TEACHER, ALL_TERMS, OPT)
    new, metrics = jax.jit(step)(state, nan_teacher, _batch(), jax.random.key(0))
    assert not np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 1.0
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.opt_state, state.opt_state)
    assert int(new.step) == int(state.step) + 1
    good, m = jax.jit(step)(state, teacher, _batch(), jax.random.key(0))
    assert float(m["skipped"]) == 0.0 and np.isfinite(float(m["loss"]))


def test_compute_dtype_and_remat_are_validated():
    with pytest.raises(ValueError, match="train.compute_dtype must be one of"):
        objective.LossConfig(compute_dtype="float16")
    with pytest.raises(ValueError, match="train.remat must be one of"):
        objective.LossConfig(remat="some")


def test_in_compute_dtype_casts_floats_only():
    tree = {"w": jnp.ones((2, 2), jnp.float32), "i": jnp.arange(3), "b": jnp.ones(2, jnp.bfloat16)}
    out = objective.in_compute_dtype(tree, "bfloat16")
    assert out["w"].dtype == jnp.bfloat16 and out["i"].dtype == tree["i"].dtype and out["b"] is tree["b"]
    assert objective.in_compute_dtype(tree, "float32")["w"] is tree["w"]
