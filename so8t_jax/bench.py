"""Benchmark bodies for scripts/bench.py. Each yields JSON-ready dicts; nothing here is a test."""
from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax import (completions, flops, loop_bench, objective, optim, placement, quant_bench, so8t,
                      train_step, trl_bench)
from so8t_jax import model as model_lib
from so8t_jax.config import ModelConfig
from so8t_jax.loading import as_dtype, load, smollm2_gguf

# Dense bf16 peak FLOP/s (NVIDIA's data sheets, without sparsity) for MFU, by device kind; none for CPUs.
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
    """XLA's static account of a compiled executable: its memory and xla_flops, cost_analysis's FLOPs, which
    count a while loop's body once (one layer of a scanned decoder: not the work done; flops.py counts that)."""
    out = {}
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        out["xla_flops"] = float(cost.get("flops", 0.0))
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
    model_flops = flops.forward_flops(cfg, args.batch, args.length, args.length)
    yield {"bench": "forward", "preset": args.preset, "dtype": args.dtype, "batch": args.batch,
           "length": args.length, "ms": round(seconds * 1e3, 2),
           "tokens_per_s": round(args.batch * args.length / seconds, 1), **compiled_stats(compiled), **machine(),
           **flop_rates(model_flops, seconds, jax.devices()[0].device_kind, args.dtype)}


def flop_rates(model_flops: int, seconds: float, device: str, dtype: str) -> dict:
    """model_flops (flops.py) and the rate the measured seconds make of them; mfu against PEAK_FLOPS (bf16)."""
    row = {"model_flops": int(model_flops), "model_tflops_per_s": round(model_flops / seconds / 1e12, 3)}
    if dtype == "bfloat16" and device in PEAK_FLOPS:
        row["mfu"] = round(model_flops / seconds / PEAK_FLOPS[device], 4)
    return row


def bench_matmul(args):
    """The machine's dense matmul rate through jax at an output layer's shape, [--batch x --new, D] @ [D, V] of
    --preset in --dtype (fp32 accumulation): the ceiling a compute-bound step's FLOP rate is read against."""
    cfg = ModelConfig.preset(args.preset)
    dtype = as_dtype(args.dtype)
    h = jax.random.normal(jax.random.key(0), (args.batch * args.new, cfg.d_model), dtype)
    w = jax.random.normal(jax.random.key(1), (cfg.d_model, cfg.vocab_size), dtype)
    compiled = jax.jit(lambda h, w: jnp.dot(h, w, preferred_element_type=jnp.float32)).lower(h, w).compile()
    seconds = _median_time(lambda: jax.block_until_ready(compiled(h, w)), args.repeats)
    work = 2 * h.shape[0] * cfg.d_model * cfg.vocab_size
    yield {"bench": "matmul", "shape": [h.shape[0], cfg.d_model, cfg.vocab_size], "dtype": args.dtype,
           "seconds": round(seconds, 5), "gflops_per_s": round(work / seconds / 1e9, 1), **machine()}


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


def _time_step(args, step, state, teacher, batch, model_flops: int) -> dict:
    """Compile once, then the median step time, the FLOPs (model_flops, and the traced program's: recomputation
    included) and the compiled step's memory as a result row."""
    key = jax.random.key(3)
    compiled = jax.jit(step).lower(state, teacher, batch, key).compile()
    seconds = _median_time(lambda: jax.block_until_ready(compiled(state, teacher, batch, key)), args.repeats)
    tokens = args.batch * (args.prompt_len + args.new)
    return {"teacher": args.teacher_preset, "student_layers": args.student_layers, "dtype": args.dtype,
            "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new, "chunk": args.chunk,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1), **compiled_stats(compiled),
            "program_flops": flops.program_flops(step, state, teacher, batch, key, while_trips=args.new - 1),
            **flop_rates(model_flops, seconds, jax.devices()[0].device_kind, args.dtype), **machine()}


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
        model_flops = flops.step_flops(s_cfg, t_cfg, args.batch, args.prompt_len, args.new, on_policy=lmbda > 0)
        yield {"bench": "step", "lmbda": lmbda, **_time_step(args, step, state, teacher, batch, model_flops["total"])}


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
        model_flops = flops.step_flops(s_cfg, t_cfg, args.batch, args.prompt_len, args.new)["total"]
        yield {"bench": "so8t_step", "variant": name, **_time_step(args, step, state, teacher, batch, model_flops)}


# ------------------------------------------------------------------ compare: TRL's GKDTrainer step against ours

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
_COMPARE_FLAGS = ("teacher_preset", "teacher_layers", "student_preset", "student_layers", "vocab", "batch",
                  "prompt_len", "new", "dtype", "repeats", "remat")
FRAMEWORKS = ("trl", "so8t_jax")
_LMBDAS = (0.0, 1.0)
# What both sides share: GKDConfig's defaults (JSD beta, sampling temperature; top-k 0, top-p 1 and loss
# temperature 1 are both sides' defaults), AdamW with one schedule, clipping at 1, no EOS (all --new tokens made).
_GKD = dict(beta=0.5, temperature=0.9)
_OPTIM = dict(learning_rate=5e-5, weight_decay=0.01, max_grad_norm=1.0, warmup_steps=10)
_STEPS = 100  # the cosine schedule's length (its shape costs nothing)
_OUR_NAMES = {"input_ids": "input_ids", "attention_mask": "attention_mask", "labels": "labels",
              "prompt_ids": "prompts", "prompt_mask": "prompt_attention_mask"}  # ours: TRL's collator's


def compare_configs(args) -> tuple[ModelConfig, ModelConfig]:
    """(teacher, student) of compare: --teacher-preset (cut to --teacher-layers when > 0) and --student-preset, or
    with none the teacher's shape cut to --student-layers; both on the shorter vocabulary, as the trainer's
    reconcile_vocab does (Qwen2-7B pads its embeddings to 152064 rows, Qwen2-0.5B to 151936; GKD needs one), or
    on --vocab rows when > 0 (quick smoke runs)."""
    t_cfg = ModelConfig.preset(args.teacher_preset)
    t_cfg = t_cfg.replace(n_layers=args.teacher_layers) if args.teacher_layers else t_cfg
    s_cfg = ModelConfig.preset(args.student_preset) if args.student_preset else \
        t_cfg.replace(n_layers=args.student_layers)
    vocab = args.vocab or min(t_cfg.vocab_size, s_cfg.vocab_size)
    return t_cfg.replace(vocab_size=vocab), s_cfg.replace(vocab_size=vocab)


def compare_batch(args, vocab: int) -> dict[str, np.ndarray]:
    """The same batch for both frameworks, in the names of TRL's GKD collator: --prompt-len prompt and --new
    completion tokens per row (seeded random ids), labels -100 on the prompt."""
    p = args.prompt_len
    ids = np.random.default_rng(0).integers(3, vocab, (args.batch, p + args.new), dtype=np.int64)
    labels = np.where(np.arange(ids.shape[1]) >= p, ids, -100)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels, "prompts": ids[:, :p],
            "prompt_attention_mask": np.ones_like(ids[:, :p])}


def _memory(device_peak: int | None, kind: str) -> dict:
    """The device allocator's peak where there is one (GPU), else the process's peak RSS (CPU)."""
    if device_peak:
        return {"peak_memory_bytes": int(device_peak), "memory_kind": kind}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            "memory_kind": "process peak RSS"}


def _ours_loss_config(args) -> objective.LossConfig:
    """The trainer's defaults for the loss chunk size and the student's rematerialisation (or --remat), computing
    in --dtype as TRL's side does: decided once, for the step and for the row that reports it."""
    return objective.LossConfig(divergence="jsd", jsd_beta=_GKD["beta"], compute_dtype=args.dtype,
                                remat=args.remat or objective.LossConfig().remat)


def _ours_inputs(args, lmbda: float, abstract: bool = False):
    """(step, state, teacher, batch, key) of our compare step: make_step with _ours_loss_config;
    abstract: weights and state as jax.ShapeDtypeStructs (nothing allocated)."""
    t_cfg, s_cfg = compare_configs(args)
    dtype = as_dtype(args.dtype)
    loss_cfg = _ours_loss_config(args)
    policy = completions.PolicyConfig(lmbda=lmbda, temperature=_GKD["temperature"], max_new_tokens=args.new)
    step, optimizer = train_step.make_step(s_cfg, t_cfg, loss_cfg, optim.OptimConfig(total_steps=_STEPS, **_OPTIM),
                                           policy=policy)
    make = jax.eval_shape if abstract else (lambda build: build())
    teacher = make(lambda: model_lib.init_params(t_cfg, jax.random.key(0), dtype))
    state = make(lambda: train_step.init_state(model_lib.init_params(s_cfg, jax.random.key(1), dtype), optimizer))
    b = compare_batch(args, s_cfg.vocab_size)
    batch = {ours: jnp.asarray(b[theirs], jnp.int32) for ours, theirs in _OUR_NAMES.items()}
    return step, state, teacher, batch, jax.random.key(3)


def _ours_measure(args, lmbda: float) -> dict:
    """Our step as the trainer runs it (make_step under placement.jit_step: jit, state donated), compiled once,
    timed on the compare batch; its traced program's FLOPs and the compiled step's memory."""
    step, state, teacher, batch, key = _ours_inputs(args, lmbda)
    loss_cfg = _ours_loss_config(args)
    program = flops.program_flops(step, state, teacher, batch, key, while_trips=args.new - 1)
    compiled = placement.jit_step(step).lower(state, teacher, batch, key).compile()
    state = [state]

    def run():
        state[0], metrics = compiled(state[0], teacher, batch, key)
        jax.block_until_ready(metrics)
    seconds = _median_time(run, args.repeats)
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return {"seconds": seconds, **_memory(peak, "jax peak_bytes_in_use"), **compiled_stats(compiled),
            "program_flops": program, "loss_chunk": loss_cfg.chunk_size, "remat": loss_cfg.remat, **machine()}


def bench_flops(args):
    """Model FLOPs (teacher, student forward + backward, sampling) and the traced program's FLOPs of our compare
    step at lmbda 0 and 1, from abstract weights: nothing allocated or run, so any machine counts GPU shapes."""
    t_cfg, s_cfg = compare_configs(args)
    for lmbda in _LMBDAS:
        model = flops.step_flops(s_cfg, t_cfg, args.batch, args.prompt_len, args.new, on_policy=lmbda > 0)
        program = flops.program_flops(*_ours_inputs(args, lmbda, abstract=True), while_trips=args.new - 1)
        yield {"bench": "flops", "lmbda": lmbda, **_shapes(args), **{f"model_flops_{k}": v for k, v in model.items()},
               "program_flops": program, "program_over_model": round(program / model["total"], 3)}


def _trl_measure(args, lmbda: float) -> dict:
    """TRL's step time on CUDA when there is one, else the CPU (so8t_jax/trl_bench.py)."""
    t_cfg, s_cfg = compare_configs(args)
    out = trl_bench.measure(t_cfg, s_cfg, args, lmbda, compare_batch(args, s_cfg.vocab_size), _median_time,
                            {**_GKD, **_OPTIM}, _STEPS)
    return {**out, **_memory(out.pop("cuda_peak"), "torch max_memory_allocated")}


def bench_gkd_step(args):
    """One framework's GKD step at one lmbda (--framework, --lmbda); compare runs each in its own process."""
    out = (_trl_measure if args.framework == "trl" else _ours_measure)(args, args.lmbda)
    t_cfg, s_cfg = compare_configs(args)
    tokens = args.batch * (args.prompt_len + args.new)
    model_flops = flops.step_flops(s_cfg, t_cfg, args.batch, args.prompt_len, args.new, on_policy=args.lmbda > 0)
    yield {"bench": "gkd_step", "framework": args.framework, "lmbda": args.lmbda, **_shapes(args),
           "teacher_layers": t_cfg.n_layers, "student_layers": s_cfg.n_layers, "vocab": s_cfg.vocab_size,
           "repeats": args.repeats, **out, "seconds": round(out["seconds"], 4),
           "tokens_per_s": round(tokens / out["seconds"], 1),
           **flop_rates(model_flops["total"], out["seconds"], out["device"], args.dtype)}


def _shapes(args) -> dict:
    return {"teacher": args.teacher_preset, "student": args.student_preset or args.teacher_preset,
            "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new}


def _run_child(args, framework: str, lmbda: float) -> dict:
    """bench.py gkd_step in a fresh process (JAX and torch never share one: each would hold the GPU's memory);
    the torch one keeps JAX on the CPU. Its stderr passes through; a failure raises."""
    flags = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in _COMPARE_FLAGS]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TRL_EXPERIMENTAL_SILENCE="1") if framework == "trl" else None
    out = subprocess.run([sys.executable, str(SCRIPT), "gkd_step", f"--framework={framework}", f"--lmbda={lmbda}",
                          *flags], env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"bench": "gkd_step"')]
    if len(rows) != 1:
        raise RuntimeError(f"{framework} lmbda {lmbda}: expected one gkd_step JSON line, got:\n{out}")
    return rows[0]


def bench_compare(args):
    """TRL's GKDTrainer step against our compiled step at the same shapes, lmbda 0 (dataset completions) and 1
    (the student generates --new tokens), each in its own process, one after the other; then the ratios."""
    rows = {}
    for framework in FRAMEWORKS:
        for lmbda in _LMBDAS:
            rows[framework, lmbda] = row = _run_child(args, framework, lmbda)
            yield row

    def ratio(lmbda, key):
        return round(rows["trl", lmbda][key] / rows["so8t_jax", lmbda][key], 3)
    yield {"bench": "compare_ratio", **_shapes(args),
           **{f"time_trl_over_ours_lmbda_{lmbda:g}": ratio(lmbda, "seconds") for lmbda in _LMBDAS},
           **{f"memory_trl_over_ours_lmbda_{lmbda:g}": ratio(lmbda, "peak_memory_bytes") for lmbda in _LMBDAS}}


def bench_fuzz(args):
    """GGUF fuzzing (so8t_jax/fuzz.py): --cases mutations of tiny valid GGUF files (built from tests/fixtures.py,
    or --path FILE[,FILE...]) loaded in child processes; the summary also goes to --out (JSON, written atomically)."""
    from so8t_jax import fuzz
    row = {**fuzz.bench(args.cases, args.seed, args.path.split(",") if args.path else None), **machine()}
    tmp = pathlib.Path(args.out + ".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(args.out)
    yield row


def bench_crash(args):
    """Kill / resume sweep (tests/crash_driver.py sweep, a checkout's tests/ needed): per seed (--seeds) an
    uninterrupted run, --kills runs killed at random events and times, the rerun compared bitwise with it."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "crash_driver.py"), "sweep",
           "--seeds", str(args.seeds), "--kills", str(args.kills)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            row = json.loads(line)
            yield {**row, **machine()} if row.get("summary") else row
    if proc.returncode:
        raise RuntimeError(f"crash sweep failed (exit {proc.returncode})")


BENCHMARKS = {"load": bench_load, "forward": bench_forward, "matmul": bench_matmul, "generate": bench_generate,
              "step": bench_step, "so8t_step": bench_so8t_step, "gkd_step": bench_gkd_step, "flops": bench_flops,
              "compare": bench_compare, "fuzz": bench_fuzz, "crash": bench_crash, "quantized": quant_bench.bench,
              "quantized_step": quant_bench.bench_step, "trainer": loop_bench.bench}
