"""Around the trainer: the config check (every problem found before any model loads) and the run's outputs
(results JSON and model card, written atomically)."""
from __future__ import annotations

import difflib
import json
import os
import pathlib
import tempfile

import jax
import numpy as np

from so8t_jax import defaults, distributed, so8t, stability
from so8t_jax.completions import PolicyConfig
from so8t_jax.config import ConfigError
from so8t_jax.loading import DTYPES, Model
from so8t_jax.objective import LossConfig, needs_heads
from so8t_jax.optim import OptimConfig
from so8t_jax.sharding import MESH_AXES, ParallelConfig

MODES = ("single", "pmap", "mesh")
STUDENT_INITS = ("from_teacher", "random", "path")


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config(config) -> None:
    """Every problem a config can have, found before any model is loaded: unknown keys (against
    so8t_jax/defaults.py), out-of-range values, a missing teacher file. Raises ConfigError naming the key."""
    known = _flat(defaults.get_config().to_dict())
    given = _flat(config.to_dict())
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(key, known, 1)
            raise ConfigError(f"config: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    c = config

    def need(ok, key, rule):
        if not ok:
            raise ConfigError(f"config: {key} must be {rule}, got {given[key]!r}")
    need(c.parallel.mode in MODES, "parallel.mode", f"one of {MODES}")
    need(c.student.init in STUDENT_INITS, "student.init", f"one of {STUDENT_INITS}")
    need(c.student.layers >= 1, "student.layers", ">= 1")
    need(c.student.select in ("kl", "even"), "student.select", "one of ('kl', 'even')")
    need(c.student.select_rows >= 1 and c.student.select_len >= 2, "student.select_rows",
         ">= 1 (and student.select_len >= 2)")
    need(c.student.init != "path" or c.student.path, "student.path", "set when student.init is 'path'")
    need(isinstance(c.teacher.get("quantized", False), bool), "teacher.quantized", "True or False")
    for key in ("teacher.dtype", "student.dtype"):
        need(given[key] in DTYPES, key, f"one of {sorted(DTYPES)}")
    need(0.0 <= c.data.heldout_fraction < 1.0, "data.heldout_fraction", "in [0, 1)")
    need(c.data.max_row_chars >= 1, "data.max_row_chars", ">= 1")
    need(isinstance(c.data.skip_bad_rows, bool), "data.skip_bad_rows", "True or False")
    need(c.data.max_prompt_len <= max(c.data.prompt_buckets), "data.max_prompt_len",
         f"<= the largest prompt bucket ({max(c.data.prompt_buckets)})")
    need(c.train.steps >= 1, "train.steps", ">= 1")
    need(c.train.epochs >= 0, "train.epochs", ">= 0")
    need(c.train.batch_size >= 1, "train.batch_size", ">= 1")
    for key in ("eval_every", "checkpoint_every", "sample_every"):
        need(given[f"train.{key}"] >= 0, f"train.{key}", ">= 0")
    need(c.train.checkpoint_every >= 1, "train.checkpoint_every", ">= 1")
    need(c.eval.rows >= 0, "eval.rows", ">= 0")
    need(set(c.export.formats) <= {"hf", "gguf", ""}, "export.formats", "a subset of ('hf', 'gguf')")
    need(c.export.gguf_type in ("F32", "F16", "Q8_0"), "export.gguf_type", "one of F32, F16, Q8_0")
    check_parallel(c)
    try:
        LossConfig(**c.loss.to_dict(), compute_dtype=c.train.compute_dtype, remat=c.train.remat)
        OptimConfig(total_steps=c.train.steps, **c.optim.to_dict())
        PolicyConfig(**{k: v for k, v in c.policy.to_dict().items()})
        stability.StabilityConfig(**c.stability.to_dict())
        so8t.GateConfig(**c.so8t.to_dict())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config: {e}") from e
    if c.teacher.path not in ("smollm2", "") and not pathlib.Path(c.teacher.path).exists():
        raise ConfigError(f"config: teacher.path {c.teacher.path!r} does not exist")
    if c.teacher.get("quantized", False) and pathlib.Path(c.teacher.path).is_dir():
        raise ConfigError(f"config: teacher.quantized=True keeps a GGUF file's quantized matrices packed, but "
                          f"teacher.path {c.teacher.path!r} is a folder (dense weights): set teacher.quantized=False "
                          f"or give a GGUF file")
    if c.student.init == "path" and not pathlib.Path(c.student.path).exists():
        raise ConfigError(f"config: student.path {c.student.path!r} does not exist")


def check_parallel(config) -> None:
    """What a parallel mode needs, before any model loads: mesh axis sizes that multiply to the device count
    (mesh mode only), and the batch's rows split evenly over the data-parallel devices (pmap: this host's
    devices; mesh: data x fsdp). Several processes (hosts) need mesh mode: its mesh spans them all."""
    mode = config.parallel.mode
    parallel = ParallelConfig.of(config.parallel)
    if mode != "mesh":
        for axis in MESH_AXES:
            if getattr(parallel, axis) != getattr(ParallelConfig, axis):
                raise ConfigError(f"config: parallel.{axis} sizes a mesh axis: it needs parallel.mode=mesh, "
                                  f"got parallel.mode={mode}")
    if jax.process_count() > 1 and mode != "mesh":
        raise ConfigError(f"config: parallel.mode={mode} runs on one process's devices; with "
                          f"{jax.process_count()} processes (hosts) use parallel.mode=mesh")
    if mode == "single":
        return
    n = jax.local_device_count()
    if mode == "mesh":  # the batch's rows go over data x fsdp
        try:
            sizes = parallel.axis_sizes(jax.device_count())
        except ValueError as e:
            raise ConfigError(f"config: {e}") from e
        n = sizes["data"] * sizes["fsdp"]
    b = config.train.batch_size
    if b % n:
        raise ConfigError(f"config: train.batch_size must be a multiple of the {n} devices parallel.mode={mode} "
                          f"splits it over, got {b} (use {max(n, b - b % n)} or parallel.mode=single)")


def write_json(path: pathlib.Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def write_text(path: pathlib.Path, text: str) -> None:
    """Atomic, UTF-8: see write_bytes."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: pathlib.Path, blob: bytes) -> None:
    """Atomic: a temporary file in the same folder, flushed to disk, then renamed over `path` (a reader sees
    the old file or the new one, never a part). A failed write (disk full, ...) leaves `path` as it was, no
    temporary file, and raises OSError naming `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer (its pid is in the name)
        if not _alive(stale.name[len(path.name) + 2:].split(".")[0]):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def steady_step_time(history) -> float | None:
    """The median wall time between consecutive steps' records (the loop's steady pace: compilation, a resume's
    gap and occasional periodic work fall outside the median); None with fewer than three records."""
    gaps = [b["time"] - a["time"] for a, b in zip(history, history[1:])
            if "time" in a and "time" in b and b["step"] == a["step"] + 1]
    return round(float(np.median(gaps[1:])), 4) if len(gaps) > 1 else None  # gaps[0]: the first step's compile


def write_results(run_dir, config, teacher: Model, student: Model, final_state, host, meta, heldout_after,
                  resumed_from, policy_rb, vocab_note) -> dict:
    losses = [h["loss"] for h in host["history"]]
    n_t, n_s = teacher.num_params, student.num_params
    elapsed = meta["elapsed"]
    results = {
        "run": config.run_name, "config": config.to_dict(),
        "teacher": {"path": str(teacher.source), "params": n_t, "layers": teacher.config.n_layers,
                    "family": teacher.config.family},
        "student": {"params": n_s, "layers": student.config.n_layers, "init": config.student.init,
                    "path": str(pathlib.Path(run_dir) / "student"),
                    "teacher_layers": host.get("student_layers")},  # the teacher layers a cut student kept
        "compression_ratio": round(n_t / n_s, 3),
        "steps": int(final_state.step), "resumed_from": resumed_from,
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "min": min(losses) if losses else None,
                 "mean_last_10": float(np.mean(losses[-10:])) if losses else None},
        "evaluation": {"heldout_loss_history": host["eval"], "heldout_loss_final": heldout_after},
        "rollbacks": policy_rb.rollbacks, "rollback_events": policy_rb.events,
        "wall_time_s": round(elapsed, 2), "tokens": host["tokens"],
        "tokens_per_s": round(host["tokens"] / elapsed, 1) if elapsed > 0 else None,
        "step_time_s": steady_step_time(host["history"]),
        "vocab_note": vocab_note,
        "data": host.get("data"),  # rows used and skipped (data.skip_bad_rows), with the first skipped rows' errors
        "final_metrics": host.get("last_metrics"),  # the last step's loss terms, norms, lr (and SO8T gauges)
    }
    if distributed.is_writer():
        write_text(pathlib.Path(run_dir) / "README.md", model_card(results, config))
    return results


def _evaluation_section(r: dict) -> str:
    table = r.get("evaluation", {}).get("table")
    if not table:
        return ""
    return f"\n## Evaluation (held-out prompts)\n\n```\n{table}\n```\n"


def _so8t_section(r: dict, c) -> str:
    lines = []
    if c.so8t.gates:
        m = r.get("final_metrics") or {}
        lines.append(f"SO(8) rotation gates on every attention and MLP output, alpha {c.so8t.alpha_start} -> "
                     f"{c.so8t.alpha_end} (last {m.get('so8t/alpha', float('nan')):.3f}, mean rotation angle "
                     f"{m.get('so8t/rotation_angle', float('nan')):.4f} rad), folded into o_proj / down_proj: the "
                     "exported student is a plain model of its family.")
    if needs_heads(c.loss):
        lines.append("Safety head (allow / escalate / deny, last prompt token) and per-token verifier head: "
                     "`so8t_heads.safetensors` beside each export (torch.nn.Linear layout), restored by "
                     "`so8t_jax.load`; `so8t_jax.generate(student, prompts, 32, return_judgments=True)` returns "
                     "the safety judgment and per-token confidence.")
    return "\n## SO8T structure\n\n" + "\n\n".join(lines) + "\n" if lines else ""


def model_card(r: dict, config) -> str:
    c = config
    objective = (f"{c.loss.divergence} (jsd_beta {c.loss.jsd_beta}, tau {c.loss.temperature}) x {c.loss.kd_weight}"
                 f" + CE x {c.loss.ce_weight} + hidden x {c.loss.hidden_weight} + relational x {c.loss.so8t_weight}"
                 f" + PET x {c.loss.pet_weight} + safety x {c.loss.safety_weight}"
                 f" + verification x {c.loss.verification_weight}; completions: student with probability"
                 f" lmbda={c.policy.lmbda}"
                 f" (sampling temperature {c.policy.temperature}), "
                 + ("teacher otherwise (seq_kd)" if c.policy.seq_kd else "dataset otherwise"))
    return f"""# {r['run']}: a student distilled with so8t_jax

| | |
|---|---|
| teacher | `{r['teacher']['path']}` ({r['teacher']['family']}, {r['teacher']['layers']} layers, \
{r['teacher']['params']:,} parameters) |
| student | {r['student']['layers']} layers, {r['student']['params']:,} parameters (init: {r['student']['init']}) |
| compression | {r['compression_ratio']}x fewer parameters |
| data | `{c.data.source}` (held out: {c.data.heldout_fraction:.0%}) |
| objective | {objective} |
| steps | {r['steps']} (batch {c.train.batch_size}), {r['wall_time_s']} s, {r['tokens_per_s']} tokens/s, \
{r.get('step_time_s')} s a step (median) |
| loss | first {r['loss']['first']}, last {r['loss']['last']}, min {r['loss']['min']} |
| held-out loss (final) | {r['evaluation']['heldout_loss_final']} |
| rollbacks | {r['rollbacks']} |
{_so8t_section(r, c)}{_evaluation_section(r)}
## Load it

```python
import so8t_jax
student = so8t_jax.load("{r['student']['path']}")
print(so8t_jax.generate(student, ["What is the capital of France?"], max_new_tokens=32))
```

Exported: `export/hf/` (transformers' AutoModelForCausalLM loads it) and `export/student-*.gguf` (llama.cpp).
Training state (optimizer included) is in `orbax/` (steps, best, final); the audit trail in `audit.sqlite`
(`python scripts/audit.py verify {pathlib.Path(r['student']['path']).parent}`); curves in `tensorboard/`.
"""
