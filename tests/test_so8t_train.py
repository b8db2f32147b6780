"""SO8T structure in training: safety / verification terms against torch's own losses (values and gradients),
the alpha schedule applied inside the compiled step, 1 device = pmap = mesh = accumulation with every SO8T
term, and the gauges (alpha, rotation angle) in the metrics."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from so8t_jax import losses, objective, optim, placement, so8t, train_step
from so8t_jax import model as model_lib
from so8t_jax.config import ConfigError, ModelConfig
from so8t_jax.runs import check_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import so8t_kd  # noqa: E402

TEACHER = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_dim=64)
STUDENT = TEACHER.replace(n_layers=2, d_model=24, n_heads=3, n_kv_heads=1, ffn_dim=48)
SO8T_TERMS = objective.LossConfig(divergence="forward_kl", temperature=3.0, kd_weight=0.7, ce_weight=0.3,
                                   hidden_weight=0.1, so8t_weight=0.5, pet_weight=0.05, safety_weight=0.3,
                                   verification_weight=0.2)
# eps 1e-4: Adam's first update is ~ lr * sign(g), so with the default 1e-8 a gradient entry near 1e-9 would turn
# float32 rounding differences between 1 device, pmap and accumulation into lr-sized parameter differences
OPT = optim.OptimConfig(learning_rate=1e-2, min_lr=1e-3, warmup_steps=2, total_steps=20, weight_decay=0.01,
                             max_grad_norm=1.0, eps=1e-4)
GATES = so8t.GateConfig(gates=True)
P, N = 5, 6


def _batch(b=8, seed=0, vocab=64):
    """data.Batcher's layout: left-padded prompts [B, P], right-padded completions [B, N], safety labels."""
    rng = np.random.RandomState(seed)
    prompt, completion = rng.randint(2, vocab, (b, P)), rng.randint(2, vocab, (b, N))
    prompt_mask, completion_mask = np.zeros((b, P), np.int32), np.zeros((b, N), np.int32)
    for i in range(b):
        prompt_mask[i, P - rng.randint(1, P + 1):] = 1
        completion_mask[i, :rng.randint(2, N + 1)] = 1
    prompt, completion = np.where(prompt_mask, prompt, 0), np.where(completion_mask, completion, 0)
    ids = np.concatenate([prompt, completion], 1)
    attn = np.concatenate([prompt_mask, completion_mask], 1)
    labels = np.where(np.pad(completion_mask, ((0, 0), (P, 0))) == 1, ids, -100)
    safety = np.array([0, -1, 2, 1, -1, 2, 0, 1] * (b // 8 + 1))[:b]
    return {k: jnp.asarray(v, jnp.int32) for k, v in dict(
        input_ids=ids, attention_mask=attn, labels=labels, prompt_ids=prompt, prompt_mask=prompt_mask,
        safety_label=safety).items()}


def _student_params(seed=2, gates=True, gate_scale=0.3):
    params = model_lib.init_params(STUDENT, jax.random.key(seed), std=0.3)
    if gates:
        params = so8t.with_gates(STUDENT, params, alpha=0.5)
        rng = np.random.RandomState(seed)
        params["layers"] = {**params["layers"], **{
            k: jnp.asarray(gate_scale * rng.randn(*params["layers"][k].shape), jnp.float32)
            for k in ("attn_gate", "mlp_gate")}}
    heads = so8t.init_heads(STUDENT.d_model, jax.random.key(seed + 10), std=0.5)
    heads["verifier"]["b"] = jnp.asarray(0.3)
    heads["safety_head"]["b"] = jnp.asarray([0.1, -0.2, 0.3])
    return {**params, **heads}


def _setup(loss_cfg=SO8T_TERMS, optim_cfg=OPT, gates=True):
    t_params = model_lib.init_params(TEACHER, jax.random.key(1), std=0.3)
    optimizer = optim.make_optimizer(optim_cfg)
    state = train_step.init_state(_student_params(gates=gates), optimizer, jax.random.key(3), TEACHER.d_model,
                                  loss_cfg)
    return state, t_params


def _close(a, b, atol=1e-5):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol), a, b)


def test_safety_and_verification_terms_match_torch():
    """Our loss_terms vs torch.nn.CrossEntropyLoss(weight=(1, 3, 5), ignore_index=-1) on the last prompt token
    and torch BCEWithLogits against [argmax student == argmax teacher], in float64 on the same hidden states;
    gradients of both heads compared too."""
    student = _student_params()
    teacher = model_lib.init_params(TEACHER, jax.random.key(1), std=0.3)
    batch = _batch()
    lc = objective.LossConfig(kd_weight=0.0, safety_weight=1.0, verification_weight=1.0)

    def terms(heads):
        return objective.loss_terms({"student": {**student, **heads}}, teacher, batch,
                                     objective.batch_counts(batch, lc), STUDENT, TEACHER, lc)
    heads = {k: student[k] for k in so8t.HEADS}
    ours = terms(heads)
    grads = jax.grad(lambda h: terms(h)["safety"] + terms(h)["verification"])(heads)

    s_out = model_lib.forward(student, STUDENT, batch["input_ids"], mask_BxT=batch["attention_mask"])
    t_logits = model_lib.forward(teacher, TEACHER, batch["input_ids"], mask_BxT=batch["attention_mask"]).logits
    hidden = torch.tensor(np.asarray(s_out.hidden, np.float64))
    w_s = torch.tensor(np.asarray(heads["safety_head"]["w"], np.float64).T.copy(), requires_grad=True)
    b_s = torch.tensor(np.asarray(heads["safety_head"]["b"], np.float64), requires_grad=True)
    w_v = torch.tensor(np.asarray(heads["verifier"]["w"], np.float64), requires_grad=True)
    b_v = torch.tensor(np.asarray(heads["verifier"]["b"], np.float64), requires_grad=True)
    ce = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64), ignore_index=-1)
    safety = ce(hidden[:, P - 1] @ w_s.T + b_s, torch.tensor(np.asarray(batch["safety_label"], np.int64)))
    agree = np.argmax(np.asarray(s_out.logits), -1) == np.argmax(np.asarray(t_logits), -1)
    valid = np.asarray(batch["labels"])[:, 1:] != -100
    v_logits = (hidden[:, :-1] @ w_v + b_v)[torch.tensor(valid)]
    verification = torch.nn.functional.binary_cross_entropy_with_logits(
        v_logits, torch.tensor(agree[:, :-1][valid], dtype=torch.float64))
    (safety + verification).backward()
    assert 0 < agree[:, :-1][valid].mean() < 1  # both targets occur
    np.testing.assert_allclose(float(ours["safety"]), safety.item(), rtol=1e-5)
    np.testing.assert_allclose(float(ours["verification"]), verification.item(), rtol=1e-5)
    np.testing.assert_allclose(float(ours["loss"]), safety.item() + verification.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["safety_head"]["w"]), w_s.grad.numpy().T, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["safety_head"]["b"]), b_s.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads["verifier"]["w"]), w_v.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(float(grads["verifier"]["b"]), b_v.grad.item(), atol=1e-6)


def test_zero_weights_skip_heads_and_need_them_when_on():
    state, teacher = _setup(gates=False)
    batch = _batch()
    plain = objective.LossConfig(kd_weight=1.0)
    terms = objective.loss_terms(state.params, teacher, batch, objective.batch_counts(batch, plain), STUDENT,
                                  TEACHER, plain)
    assert set(terms) == {"kd", "loss"}
    no_heads = {"student": so8t.split_heads(state.params["student"])[0]}
    with pytest.raises(KeyError, match="heads"):
        objective.loss_terms(no_heads, teacher, batch, objective.batch_counts(batch, SO8T_TERMS), STUDENT,
                              TEACHER, SO8T_TERMS)
    with pytest.raises(KeyError, match="safety_label"):
        objective.batch_counts({k: v for k, v in batch.items() if k != "safety_label"}, SO8T_TERMS)


def test_chunked_verification_equals_plain():
    state, teacher = _setup()
    batch = _batch()
    chunked = objective.LossConfig(**{**SO8T_TERMS.__dict__, "chunk_size": 7})

    def run(lc):
        def f(p):
            t = objective.loss_terms(p, teacher, batch, objective.batch_counts(batch, lc), STUDENT, TEACHER, lc)
            return t["loss"], t
        return jax.value_and_grad(f, has_aux=True)(state.params)
    (_, t1), g1 = run(SO8T_TERMS)
    (_, t2), g2 = run(chunked)
    for k in ("kd", "ce", "verification", "safety", "loss"):
        np.testing.assert_allclose(float(t1[k]), float(t2[k]), rtol=1e-5)
    _close(g1, g2, atol=1e-5)


def _step(loss_cfg=SO8T_TERMS, optim_cfg=OPT, gate_cfg=GATES):
    step, _ = train_step.make_step(STUDENT, TEACHER, loss_cfg, optim_cfg, gate_cfg=gate_cfg)
    return jax.jit(step)


def test_every_term_finite_nonzero_and_alpha_follows_schedule():
    state, teacher = _setup()
    step = _step()
    for i in range(3):
        assert int(state.step) == i
        state, m = step(state, teacher, _batch(seed=i), jax.random.key(i))
        alpha = float(GATES.alpha(i, OPT.total_steps))
        np.testing.assert_allclose(float(m["so8t/alpha"]), alpha, rtol=1e-6)
        np.testing.assert_allclose(float(m["so8t/gate"]), 1 / (1 + np.exp(-alpha)), rtol=1e-6)
        # the stored alpha is the one used (weight decay's pull undone), not a learned value
        assert float(state.params["student"]["so8t_alpha"]) == pytest.approx(alpha, rel=1e-6)
        for k in ("kd", "ce", "hidden", "so8t", "pet", "safety", "verification"):
            assert np.isfinite(m[f"loss/{k}"]) and m[f"loss/{k}"] > 0, k
    layers = state.params["student"]["layers"]
    theta = jnp.concatenate([layers["attn_gate"], layers["mlp_gate"]])
    np.testing.assert_allclose(float(m["so8t/rotation_angle"]), float(so8t.mean_rotation_angle(theta)), rtol=1e-5)
    # first step at alpha_start, last at exactly alpha_end (the value export folds)
    assert float(GATES.alpha(0, 20)) == pytest.approx(GATES.alpha_start)
    assert float(GATES.alpha(19, 20)) == pytest.approx(GATES.alpha_end, abs=1e-6)


def test_gates_and_heads_learn_from_zero():
    """Zero gates (the identity) get gradients and move; the heads' steps scale with optim.head_learning_rate."""
    state, teacher = _setup()
    zero = dict(state.params["student"]["layers"], attn_gate=jnp.zeros_like(state.params["student"]["layers"][
        "attn_gate"]), mlp_gate=jnp.zeros_like(state.params["student"]["layers"]["mlp_gate"]))
    state = state.replace(params=dict(state.params, student=dict(state.params["student"], layers=zero)))
    gates = optim.OptimConfig(**{**OPT.__dict__, "head_learning_rate": OPT.learning_rate})
    fast = optim.OptimConfig(**{**OPT.__dict__, "head_learning_rate": 10 * OPT.learning_rate})
    s1, m1 = _step(optim_cfg=gates)(state, teacher, _batch(), jax.random.key(0))
    s10, _ = _step(optim_cfg=fast)(state, teacher, _batch(), jax.random.key(0))
    new = s1.params["student"]["layers"]
    assert float(m1["so8t/rotation_angle"]) > 0
    assert np.all(np.abs(np.asarray(new["attn_gate"])) > 0) and np.all(np.abs(np.asarray(new["mlp_gate"])) > 0)
    old_w = np.asarray(state.params["student"]["safety_head"]["w"])
    d1 = np.asarray(s1.params["student"]["safety_head"]["w"]) - old_w
    d10 = np.asarray(s10.params["student"]["safety_head"]["w"]) - old_w
    np.testing.assert_allclose(d10, 10 * d1, rtol=1e-3, atol=1e-7)
    _close(s10.params["student"]["embed"], s1.params["student"]["embed"])  # the trunk is unaffected


def test_pmap_mesh_accumulation_and_single_device_agree():
    assert jax.device_count() == 8
    state, teacher = _setup()
    batch = _batch()
    s1, m1 = _step()(state, teacher, batch, jax.random.key(0))

    pstep, _, pplace = placement.pmap_step(STUDENT, TEACHER, SO8T_TERMS, OPT, gate_cfg=GATES)
    s2, m2 = pstep(*pplace(_setup()[0], teacher, batch), jax.random.key(0))  # the single step donated state
    _close(s1.params, s2.params)
    for k in ("loss", "loss/safety", "loss/verification", "so8t/alpha", "so8t/rotation_angle"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5)

    mesh = placement.make_mesh()
    mstep, _, place = placement.mesh_step(STUDENT, TEACHER, SO8T_TERMS, OPT, mesh, shard_teacher=True,
                                           gate_cfg=GATES)
    s3, m3 = mstep(*place(state, teacher, batch), jax.random.key(0))
    _close(s1.params, s3.params)
    np.testing.assert_allclose(m1["loss"], m3["loss"], rtol=1e-5)

    accum = optim.OptimConfig(**{**OPT.__dict__, "grad_accum_steps": 2})
    micro = jax.tree_util.tree_map(lambda x: x.reshape(2, 4, *x.shape[1:]), batch)
    s4, m4 = _step(optim_cfg=accum)(_setup()[0], teacher, micro, jax.random.key(0))  # mesh_step donated state
    _close(s1.params, s4.params)
    np.testing.assert_allclose(m1["loss/safety"], m4["loss/safety"], rtol=1e-5)


def test_safety_loss_global_denominator():
    """Shards' losses with the global weight sum add up to the whole batch's loss."""
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.randn(8, 3), jnp.float32)
    labels = jnp.asarray([0, -1, 2, 1, -1, 2, 0, 1])
    total = losses.safety_weight_sum(labels)
    assert float(total) == 1 + 5 + 3 + 5 + 1 + 3
    parts = [losses.safety_loss(logits[i:i + 2], labels[i:i + 2], total_weight=total) for i in range(0, 8, 2)]
    np.testing.assert_allclose(float(sum(parts)), float(losses.safety_loss(logits, labels)), rtol=1e-6)


def test_gate_config_validation():
    with pytest.raises(ValueError, match="alpha_start <= so8t.alpha_mid"):
        so8t.GateConfig(alpha_start=1.0, alpha_mid=0.0)
    with pytest.raises(ValueError, match="alpha_warm"):
        so8t.GateConfig(alpha_warm=0.0)
    with pytest.raises(ValueError, match="safety_class_weights"):
        objective.LossConfig(safety_class_weights=(1.0, 0.0, 5.0))
    with pytest.raises(ValueError, match="head_learning_rate"):
        optim.OptimConfig(head_learning_rate=-1.0)


def test_run_config_errors_name_the_key():
    c = so8t_kd.get_config()
    assert c.so8t.gates and c.loss.safety_weight == 0.3 and c.loss.verification_weight == 0.2
    check_config(c)
    c.so8t.alpha_warm = 1.5
    with pytest.raises(ConfigError, match="so8t.alpha_warm must be in"):
        check_config(c)
    c = so8t_kd.get_config()
    c.loss.safety_weight = -1.0
    with pytest.raises(ConfigError, match="loss.safety_weight must be >= 0"):
        check_config(c)
