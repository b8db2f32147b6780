"""Benchmark bodies for scripts/bench.py. Each yields JSON-ready dicts; nothing here is a test."""
from __future__ import annotations

import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from so8t_jax import completions, objective, optim, so8t, train_step
from so8t_jax import model as model_lib
from so8t_jax.config import ModelConfig
from so8t_jax.loading import as_dtype, load, smollm2_gguf

# Dense bf16 peak FLOP/s for MFU, by device kind (None on CPUs: no meaningful peak).
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}


def machine() -> dict:
    dev = jax.devices()[0]
    return {"device": dev.device_kind, "platform": dev.platform, "n_devices": jax.device_count(),
            "host": platform.machine(), "jax": jax.__version__}


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled_stats(compiled) -> dict:
    """FLOPs and memory of a compiled XLA executable (honest proxies on a CPU)."""
    out = {}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        out["flops"] = float(cost.get("flops", 0.0))
    mem = compiled.memory_analysis()
    if mem is not None:
        out.update(temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
                   output_bytes=int(mem.output_size_in_bytes))
    return out


def bench_load(args):
    path = pathlib.Path(args.path) if args.path else smollm2_gguf()

    def ours():
        jax.block_until_ready(load(path).params)

    row = {"bench": "load", "path": path.name, "seconds": round(_median_time(ours, args.repeats), 3), **machine()}
    if args.transformers:
        import torch
        from transformers import AutoModelForCausalLM
        start = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        row["transformers_seconds"] = round(time.perf_counter() - start, 3)
    yield row


def bench_forward(args):
    cfg = ModelConfig.preset(args.preset)
    dtype = as_dtype(args.dtype)
    params = model_lib.init_params(cfg, jax.random.key(0), dtype)
    tokens = jnp.zeros((args.batch, args.length), jnp.int32)
    fn = jax.jit(lambda p, t: model_lib.forward(p, cfg, t).logits)
    compiled = fn.lower(params, tokens).compile()
    seconds = _median_time(lambda: jax.block_until_ready(compiled(params, tokens)), args.repeats)
    stats = compiled_stats(compiled)
    row = {"bench": "forward", "preset": args.preset, "dtype": args.dtype, "batch": args.batch,
           "length": args.length, "ms": round(seconds * 1e3, 2),
           "tokens_per_s": round(args.batch * args.length / seconds, 1), **stats, **machine()}
    peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
    if peak and "flops" in stats:
        row["mfu"] = round(stats["flops"] / seconds / peak, 4)
    yield row


def bench_generate(args):
    """Generation tokens/s of the compiled KV-cache sampler (EOS off, so every row makes --new tokens)."""
    from so8t_jax.sampling import GREEDY, Sampler, make_sample_fn
    if args.path:
        m = load(args.path, args.dtype)
        cfg, params = m.config, m.params
    else:
        cfg = ModelConfig.preset(args.preset)
        params = model_lib.init_params(cfg, jax.random.key(0), as_dtype(args.dtype))
    prompt = jax.random.randint(jax.random.key(1), (args.batch, args.prompt_len), 3, cfg.vocab_size)
    mask = jnp.ones_like(prompt)
    for name, sampler in (("greedy", GREEDY), ("temperature_0.9_top_p_0.95", Sampler(0.9, 0, 0.95))):
        fn = make_sample_fn(cfg, args.new, sampler, (), 0)
        seconds = _median_time(lambda f=fn: jax.block_until_ready(f(params, prompt, mask, jax.random.key(2))),
                               args.repeats)
        yield {"bench": "generate", "model": args.path or args.preset, "sampler": name, "dtype": args.dtype,
               "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new,
               "seconds": round(seconds, 3), "tokens_per_s": round(args.batch * args.new / seconds, 1), **machine()}


def _step_inputs(args):
    """(t_cfg, s_cfg, teacher, student, batch) of the step benchmarks: random weights of --teacher-preset and
    its first --student-layers layers, --batch rows of --prompt-len prompt + --new completion tokens, a quarter
    of them unlabelled for safety and the rest cycling through the three labels."""
    t_cfg = ModelConfig.preset(args.teacher_preset)
    s_cfg = t_cfg.replace(n_layers=args.student_layers)
    dtype = as_dtype(args.dtype)
    teacher = model_lib.init_params(t_cfg, jax.random.key(0), dtype)
    student = model_lib.init_params(s_cfg, jax.random.key(1), dtype)
    p, n, b = args.prompt_len, args.new, args.batch
    ids = jax.random.randint(jax.random.key(2), (b, p + n), 3, t_cfg.vocab_size)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
             "labels": jnp.where(jnp.arange(p + n)[None] >= p, ids, -100), "prompt_ids": ids[:, :p],
             "prompt_mask": jnp.ones((b, p), jnp.int32), "safety_label": jnp.arange(b, dtype=jnp.int32) % 4 - 1}
    return t_cfg, s_cfg, teacher, student, batch


def _time_step(args, step, state, teacher, batch) -> dict:
    """Compile once, then the median step time and the compiled step's FLOPs / memory as a result row."""
    compiled = jax.jit(step).lower(state, teacher, batch, jax.random.key(3)).compile()
    seconds = _median_time(lambda: jax.block_until_ready(compiled(state, teacher, batch, jax.random.key(3))),
                           args.repeats)
    tokens = args.batch * (args.prompt_len + args.new)
    return {"teacher": args.teacher_preset, "student_layers": args.student_layers, "dtype": args.dtype,
            "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new, "chunk": args.chunk,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1), **compiled_stats(compiled),
            **machine()}


def bench_step(args):
    """Distillation step time: teacher (preset, random weights) -> student of --student-layers, offline (lmbda 0)
    and on-policy (lmbda 1: the student samples --new tokens inside the compiled step)."""

    t_cfg, s_cfg, teacher, student, batch = _step_inputs(args)
    loss_cfg = objective.LossConfig(divergence="jsd", chunk_size=args.chunk)
    optim_cfg = optim.OptimConfig()
    for lmbda in (0.0, 1.0):
        policy = completions.PolicyConfig(lmbda=lmbda, temperature=0.9, max_new_tokens=args.new, eos_ids=())
        step, optimizer = train_step.make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, policy=policy)
        state = train_step.init_state(student, optimizer)
        yield {"bench": "step", "lmbda": lmbda, **_time_step(args, step, state, teacher, batch)}


def bench_so8t_step(args):
    """Cost of the SO8T structure: the so8t_kd recipe's step (forward KL, CE, hidden, relational) on dataset
    completions, then + SO(8) gates, then + gates and the safety / verifier heads with their losses."""

    t_cfg, s_cfg, teacher, student, batch = _step_inputs(args)
    recipe = dict(divergence="forward_kl", temperature=3.0, kd_weight=0.7, ce_weight=0.3, hidden_weight=0.1,
                  so8t_weight=0.5, chunk_size=args.chunk)
    gated = so8t.with_gates(s_cfg, student)
    variants = (("recipe without SO8T", student, {}, False),
                ("+ gates", gated, {}, True),
                ("+ gates + heads", {**gated, **so8t.init_heads(s_cfg.d_model, jax.random.key(4))},
                 {"safety_weight": 0.3, "verification_weight": 0.2}, True))
    for name, params, extra, gates in variants:
        loss_cfg = objective.LossConfig(**recipe, **extra)
        step, optimizer = train_step.make_step(s_cfg, t_cfg, loss_cfg, optim.OptimConfig(),
                                               gate_cfg=so8t.GateConfig(gates=gates))
        state = train_step.init_state(params, optimizer, jax.random.key(5), t_cfg.d_model, loss_cfg)
        yield {"bench": "so8t_step", "variant": name, **_time_step(args, step, state, teacher, batch)}


BENCHMARKS = {"load": bench_load, "forward": bench_forward, "generate": bench_generate, "step": bench_step,
              "so8t_step": bench_so8t_step}
