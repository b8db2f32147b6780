"""scripts/bench.py quantized: a GGUF teacher's forward loaded dense against kept quantized (so8t_jax/quant.py),
each in a fresh process so that its peak RSS is its own; scripts/bench.py quantized_step: the trainer's step with
a big random teacher kept quantized (e.g. Qwen2-7B in Q4_K) beside a student (e.g. Qwen2-0.5B), its memory."""
from __future__ import annotations

import functools
import json
import math
import pathlib
import resource
import statistics
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax import model as model_lib
from so8t_jax import quant
from so8t_jax.loading import load, smollm2_gguf


def measure(path: str, quantized: bool, batch: int, length: int, repeats: int, dtype: str) -> dict:
    """One model's forward (in this process: its peak RSS is the model's)."""
    start = time.perf_counter()
    m = load(path, dtype, quantized=quantized)
    load_s = time.perf_counter() - start
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, m.config.vocab_size, (batch, length)), jnp.int32)
    compiled = jax.jit(lambda p, t: model_lib.forward(p, m.config, t).logits).lower(m.params, tokens).compile()
    times = []
    for _ in range(repeats + 1):  # the first: warm-up
        start = time.perf_counter()
        jax.block_until_ready(compiled(m.params, tokens))
        times.append(time.perf_counter() - start)
    mem = compiled.memory_analysis()
    return {"bench": "quantized_forward", "path": pathlib.Path(path).name, "quantized": quantized, "dtype": dtype,
            "batch": batch, "length": length, "load_s": round(load_s, 2), "params_bytes": m.nbytes,
            "ms": round(1e3 * statistics.median(times[1:]), 1), "argument_bytes": int(mem.argument_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device": jax.devices()[0].device_kind}


def bench(args):
    """scripts/bench.py quantized: each GGUF of --path (comma-separated; default the SmolLM2 file) loaded dense
    and kept quantized, its [--batch, --length] forward timed, each in a fresh process (peak RSS)."""
    for path in (args.path.split(",") if args.path else [str(smollm2_gguf())]):
        for quantized in (False, True):
            code = (f"import json; from so8t_jax import quant_bench; print(json.dumps(quant_bench.measure({path!r}, "
                    f"{quantized}, {args.batch}, {args.length}, {args.repeats}, {args.dtype!r})))")
            out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
            yield json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------- quantized_step: a big 4-bit teacher beside a student

def _file_matrix(cfg, part: str, dense_shape) -> tuple[int, int]:
    """(rows, cols) of the file's [out, in] matrix whose decoder layout is dense_shape (one layer)."""
    cols = {"o": cfg.n_heads * cfg.head_dim, "down": cfg.ffn_dim}.get(part, cfg.d_model)
    rows = math.prod(dense_shape) // cols
    if quant._dense_shape(cfg, part, rows, cols) != tuple(dense_shape):
        raise ValueError(f"{part}: no [{rows}, {cols}] file matrix gives {tuple(dense_shape)}")
    return rows, cols


def random_quantized(cfg, dtype: str, qtype: str, key=None) -> dict:
    """Teacher params of cfg's shape whose matrices (quant._TRANSPOSED's) are QuantizedWeights of `qtype`: random
    blocks, each fp16 scale / min set to 0.01 (finite values), made on the device one leaf at a time (no dense
    teacher ever exists); norms ones, other dense leaves zeros. key None: abstract leaves (jax.ShapeDtypeStruct),
    for lowering a computation at shapes that do not fit this machine."""
    dense = jax.eval_shape(lambda k: model_lib.init_params(cfg, k, dtype), jax.random.key(0))
    size = quant.block_size(qtype)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)

    @functools.partial(jax.jit, static_argnums=1)
    def blocks(k, shape):
        b = jax.random.bits(k, shape, jnp.uint8)
        for off in quant._FP16_FIELDS[qtype]:
            b = b.at[..., off:off + 2].set(scale)
        return b

    def leaf(path, x):
        part, lead = path[-1].key, x.shape[:1] if path[0].key == "layers" else ()
        if part not in quant._TRANSPOSED:
            if key is None:
                return x
            return (jnp.ones if part.endswith("norm") else jnp.zeros)(x.shape, x.dtype)
        rows, cols = _file_matrix(cfg, part, x.shape[len(lead):])
        if cols % size[0]:
            raise ValueError(f"{qtype} blocks hold {size[0]} values, which do not divide {part}'s rows of {cols}")
        shape = (*lead, rows, cols // size[0], size[1])
        b = jax.ShapeDtypeStruct(shape, jnp.uint8) if key is None else \
            blocks(jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode())), shape)
        return quant.QuantizedWeight(b, None, (qtype,), tuple(x.shape[len(lead):]), quant._TRANSPOSED[part],
                                     jnp.dtype(dtype).name)
    return jax.tree_util.tree_map_with_path(leaf, dense)


def step_row(t_cfg, s_cfg, args, lmbda: float) -> dict:
    """The trainer's compiled step (placement.jit_step: jit, state donated) with a random --qtype teacher of t_cfg's
    shape kept quantized in --dtype, a float32-master student of s_cfg's shape computing in --dtype, the
    default chunked losses and remat, --batch rows of --prompt-len + --new tokens. --compile-only: lowered from
    abstract arguments and compiled, not run (memory_analysis is then the only figure: a proxy on CPU)."""
    from so8t_jax import completions, objective, optim, placement, train_step
    loss_cfg = objective.LossConfig(divergence="jsd", compute_dtype=args.dtype)
    policy = completions.PolicyConfig(lmbda=lmbda, temperature=0.9, max_new_tokens=args.new)
    freeze = tuple(n for n in getattr(args, "freeze", "").split(",") if n)
    step, optimizer = train_step.make_step(s_cfg, t_cfg, loss_cfg, optim.OptimConfig(freeze=freeze), policy=policy)
    abstract = args.compile_only
    key = None if abstract else jax.random.key(0)
    teacher = random_quantized(t_cfg, args.dtype, args.qtype, key)

    def state_of(k):
        return train_step.init_state(model_lib.init_params(s_cfg, k, jnp.float32), optimizer)
    state = jax.eval_shape(state_of, jax.random.key(1)) if abstract else jax.jit(state_of)(jax.random.key(1))
    p, n, b = args.prompt_len, args.new, args.batch
    ids = jax.random.randint(jax.random.key(2), (b, p + n), 3, s_cfg.vocab_size)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "prompt_ids": ids[:, :p],
             "labels": jnp.where(jnp.arange(p + n)[None] >= p, ids, -100), "prompt_mask": jnp.ones((b, p), jnp.int32)}
    compiled = placement.jit_step(step).lower(state, teacher, batch, jax.random.key(3)).compile()
    mem = compiled.memory_analysis()
    row = {"bench": "quantized_step", "teacher": args.teacher_preset, "student": args.student_preset,
           "qtype": args.qtype, "dtype": args.dtype, "freeze": ",".join(freeze), "lmbda": lmbda, "batch": b,
           "prompt_len": p, "new_tokens": n,
           "teacher_bytes": quant.nbytes(teacher) if not abstract else sum(
               math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(teacher)),
           "argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
           "output_bytes": int(mem.output_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
           "device": jax.devices()[0].device_kind}
    # XLA's static account: arguments + outputs not aliased to a donated argument + temporaries
    row["static_peak_bytes"] = row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
    if abstract:
        return row
    state = [state]

    def run():
        state[0], metrics = compiled(state[0], teacher, batch, jax.random.key(3))
        jax.block_until_ready(metrics)
    run()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    return {**row, "seconds": round(statistics.median(times), 4), "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def bench_step(args):
    """scripts/bench.py quantized_step: step_row at --lmbda, in a fresh process (its own peak memory)."""
    flags = {k: getattr(args, k) for k in ("teacher_preset", "student_preset", "qtype", "dtype", "batch",
                                           "prompt_len", "new", "repeats", "compile_only", "freeze")}
    flags.update(teacher_layers=0, vocab=0)  # bench.compare_configs: whole presets on the shorter vocabulary
    code = (f"import json, types; from so8t_jax import bench, quant_bench; a = types.SimpleNamespace(**{flags!r}); "
            f"print(json.dumps(quant_bench.step_row(*bench.compare_configs(a), a, {float(args.lmbda)})))")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    yield json.loads(out.stdout.strip().splitlines()[-1])
