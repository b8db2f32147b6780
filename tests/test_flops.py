"""so8t_jax/flops.py: the analytic FLOPs against the traced program's matmuls, exactly; the program counter
against XLA's own count where XLA's is right (one layer), and XLA's undercount of scanned layers that made the
counter necessary."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from so8t_jax import completions, flops, objective, optim, train_step
from so8t_jax import model as model_lib
from so8t_jax.config import ModelConfig

SHAPES = dict(vocab_size=512, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)
FAMILY_EXTRAS = {
    "llama": {}, "mistral": {}, "qwen2": {"attn_bias": True}, "qwen3": {"qk_norm": True},
    "phi3": {"rope_dim": 8},
    "gemma3": {"qk_norm": True, "post_norms": True, "embed_scale": True, "activation": "gelu_tanh",
               "sliding_window": 4, "rope_local_theta": 100.0},
}


def _cfg(family: str, n_layers: int) -> ModelConfig:
    extra = dict(FAMILY_EXTRAS[family])
    if family == "gemma3":
        extra["sliding_layers"] = tuple(i % 2 == 0 for i in range(n_layers))
    return ModelConfig(family=family, n_layers=n_layers, **SHAPES, **extra)


def _logits_fn(cfg):
    return lambda params, tokens: model_lib.forward(params, cfg, tokens).logits


@pytest.mark.parametrize("family", sorted(FAMILY_EXTRAS))
@pytest.mark.parametrize("n_layers", [1, 3])
def test_forward_flops_equal_the_traced_programs_matmuls(family, n_layers):
    cfg = _cfg(family, n_layers)
    params = model_lib.init_params(cfg, jax.random.key(0), jnp.float32)
    tokens = jnp.ones((2, 12), jnp.int32)
    # the dense kernels score every query against all 12 keys
    assert flops.program_flops(_logits_fn(cfg), params, tokens) == flops.forward_flops(cfg, 2, 12, 12, keys=12)


def test_program_count_matches_xla_on_one_layer_where_xla_undercounts_a_scan():
    """XLA's cost_analysis() is the independent check of the counter where it is right: with one layer the scan's
    body runs once, and XLA's FLOPs (matmuls plus a little elementwise work) are within 3% above ours. With three
    layers XLA still reports about one layer's work: its while body is counted once."""
    def xla_and_ours(n_layers):
        cfg = _cfg("llama", n_layers)
        params = model_lib.init_params(cfg, jax.random.key(0), jnp.float32)
        tokens = jnp.ones((2, 12), jnp.int32)
        xla = jax.jit(_logits_fn(cfg)).lower(params, tokens).compile().cost_analysis()
        xla = (xla[0] if isinstance(xla, (list, tuple)) else xla)["flops"]
        return xla, flops.program_flops(_logits_fn(cfg), params, tokens)
    xla1, ours1 = xla_and_ours(1)
    assert 1.0 <= xla1 / ours1 < 1.03
    xla3, ours3 = xla_and_ours(3)
    assert ours3 > 2 * ours1 and xla3 < 1.03 * xla1


def test_visible_keys_count_the_attention_masks_true_entries():
    """Model FLOPs count the pairs each query sees: the model's own boolean masks (causal, and gemma3's window on
    sliding layers) summed, for a fresh prefix and for tokens after a cache."""
    cfg = _cfg("gemma3", 2)
    for length, past in ((12, 0), (5, 7), (1, 9)):
        q_pos = jnp.arange(past, past + length)[None]
        k_pos = jnp.arange(past + length)[None]
        full, sliding = model_lib.attention_masks(cfg, q_pos, k_pos, jnp.ones_like(k_pos, bool))
        assert flops._visible_keys(length, past, None) == int(np.asarray(full).sum())
        assert flops._visible_keys(length, past, cfg.sliding_window) == int(np.asarray(sliding).sum())


def _step_program(chunk: int, remat: str, lmbda: float):
    t_cfg, s_cfg = _cfg("qwen2", 4), _cfg("qwen2", 2)
    b, p, n = 2, 6, 10
    ids = jax.random.randint(jax.random.key(2), (b, p + n), 3, 512)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "prompt_ids": ids[:, :p],
             "labels": jnp.where(jnp.arange(p + n)[None] >= p, ids, -100), "prompt_mask": jnp.ones((b, p), jnp.int32)}
    policy = completions.PolicyConfig(lmbda=lmbda, temperature=0.9, max_new_tokens=n, eos_ids=())
    loss_cfg = objective.LossConfig(divergence="jsd", chunk_size=chunk, remat=remat)
    step, opt = train_step.make_step(s_cfg, t_cfg, loss_cfg, optim.OptimConfig(), policy=policy)
    state = train_step.init_state(model_lib.init_params(s_cfg, jax.random.key(1), jnp.float32), opt)
    teacher = model_lib.init_params(t_cfg, jax.random.key(0), jnp.float32)
    program = flops.program_flops(step, state, teacher, batch, jax.random.key(3), while_trips=n - 1)
    return program, t_cfg, s_cfg, (b, p, n)


def test_the_plain_step_is_the_teachers_forward_and_three_student_forwards():
    """No chunking, no remat, dataset completions: the step's matmuls are exactly the teacher's forward plus the
    student's forward and backward (twice the forward: each matmul's two cotangent products), all logits made."""
    program, t_cfg, s_cfg, (b, p, n) = _step_program(0, "none", 0.0)
    length = p + n
    want = flops.forward_flops(t_cfg, b, length, length, keys=length) + \
        3 * flops.forward_flops(s_cfg, b, length, length, keys=length)
    assert program == want


def test_on_policy_step_adds_the_samplers_prefill_and_decode_steps():
    """lmbda 1: the sampler's prefill (every prompt query against the cache's P + N slots, logits at the last
    position) and N - 1 decode steps (the cache's slots plus the new token), on top of the offline step."""
    offline, t_cfg, s_cfg, (b, p, n) = _step_program(0, "none", 0.0)
    on_policy, *_ = _step_program(0, "none", 1.0)
    capacity = p + n
    sample = flops.forward_flops(s_cfg, b, p, 1, keys=capacity) + \
        (n - 1) * flops.forward_flops(s_cfg, b, 1, 1, keys=capacity + 1)
    assert on_policy - offline == sample


def test_recomputation_shows_in_the_program_not_in_the_model_flops():
    """remat full recomputes the student's layers (less the last matmul, whose output the backward never
    needs): the program grows, the model FLOPs (what utilisation divides by) stay those of the plain step with the
    prompt's logits skipped."""
    plain, t_cfg, s_cfg, (b, p, n) = _step_program(0, "none", 0.0)
    remat, *_ = _step_program(0, "full", 0.0)
    layers = flops.forward_flops(s_cfg, b, p + n, 0, keys=p + n)
    assert plain < remat <= plain + layers
    model = flops.step_flops(s_cfg, t_cfg, b, p, n)
    assert model["total"] == model["teacher"] + model["student"] < plain
    assert model["student"] == 3 * flops.forward_flops(s_cfg, b, p + n, n)
    assert flops.step_flops(s_cfg, t_cfg, b, p, n, on_policy=True)["sample"] == flops.sample_flops(s_cfg, b, p, n) > 0


def test_chunked_losses_project_the_completion_once_and_form_the_gradient_in_that_pass():
    """The chunked losses (fused_head.py) compute the output layers only from the last prompt position (N
    targets a row, padded to whole chunks) and four matmuls per chunk: both models' logits, then the student's
    d hidden and d head in the same pass, nothing recomputed. The plain step projects all P + N positions: the
    teacher once, the student three times (forward, d hidden, d head)."""
    plain, t_cfg, s_cfg, (b, p, n) = _step_program(0, "none", 0.0)
    chunked, *_ = _step_program(8, "none", 0.0)
    head = 2 * s_cfg.d_model * s_cfg.vocab_size  # per token; teacher and student share d_model and V here
    padded = -(-b * n // 8) * 8
    assert chunked == plain - 4 * head * b * (p + n) + 4 * head * padded


def test_a_while_loop_needs_its_trip_count():
    def f(x):
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ c[1]), (0, x))[1]
    x = jnp.ones((4, 4))
    with pytest.raises(ValueError, match="while_trips"):
        flops.program_flops(f, x)
    assert flops.program_flops(f, x, while_trips=3) == 3 * 2 * 4 * 4 * 4
