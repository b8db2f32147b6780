"""scripts/bench.py quantized: a GGUF teacher's forward loaded dense against kept quantized (so8t_jax/quant.py),
each in a fresh process so that its peak RSS is its own."""
from __future__ import annotations

import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax import model as model_lib
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
