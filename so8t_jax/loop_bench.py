"""scripts/bench.py trainer: the training loop's steady pace against the compiled step it runs, same run, same
batches. The loop dispatches step N+1 before reading step N's metrics and prepares batches on a thread, so the
two should agree; the gap is the host's overhead (batching, dispatch, metric reads, logging, the audit log)."""
from __future__ import annotations

import importlib
import statistics
import sys
import tempfile
import time

import jax

from so8t_jax import trainer
from so8t_jax.cli import CONFIG_DIR, resolve_config_path
from so8t_jax.config import set_path


def config_of(args, out_dir: str):
    """--config (default configs/gkd.py) with --steps steps at --lmbda (a constant on-policy share), periodic
    work only at the last step, no final evaluation or export, the student cut evenly (no selection pass)."""
    if str(CONFIG_DIR.parent) not in sys.path:
        sys.path.insert(0, str(CONFIG_DIR.parent))  # configs/gkd_gpu.py imports `configs.gkd`
    path = resolve_config_path(args.config)
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    n = args.steps
    for key, value in {"train.steps": n, "train.eval_every": 0, "train.sample_every": 0, "train.checkpoint_every": n,
                       "stability.snapshot_every": n, "stability.every_n": n, "policy.lmbda": args.lmbda,
                       "policy.lmbda_schedule": "constant", "student.select": "even", "eval.at_end": False,
                       "export.formats": (), "output_dir": out_dir, "run_name": "loop"}.items():
        set_path(c, key, value)
    return c


def compiled_step_time(config, repeats: int) -> float:
    """The median time of the run's own compiled step (placement.run, as the loop calls it) on the run's first
    batch, each call waiting for its metrics, after one warm-up call."""
    run = trainer.setup(config)
    try:
        batch = trainer.step_batch(run, 0)
        key = jax.random.key(config.seed)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            run.state, metrics = run.placement.run(run.state, run.teacher_params, batch, key)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])
    finally:
        trainer.close(run)


def bench(args):
    """One row: the loop's median seconds a step (distillation_results.json's step_time_s) and the compiled
    step's, and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        results = trainer.train(config_of(args, f"{tmp}/loop"))
        step_s = compiled_step_time(config_of(args, f"{tmp}/step"), args.repeats)
    loop_s = results["step_time_s"]
    yield {"bench": "trainer", "config": args.config, "steps": args.steps, "lmbda": args.lmbda,
           "batch": results["config"]["train"]["batch_size"], "loop_step_s": loop_s,
           "compiled_step_s": round(step_s, 4),
           "loop_over_compiled": round(loop_s / step_s, 3), "wall_time_s": results["wall_time_s"],
           "device": jax.devices()[0].device_kind}
