"""What a run shows and leaves besides its checkpoints: sample completions for TensorBoard, and at the end
the student folder, the exports (HF folder, GGUF) and the teacher / before / after evaluation, recorded in
the results, the model card and the audit log. Every output appears whole or not at all (a temporary name,
then a rename), so a run killed while writing one never leaves a partial file that reads as valid."""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp

from so8t_jax import audit, data, distributed
from so8t_jax.checkpoint import CheckpointError
from so8t_jax.completions import PolicyConfig
from so8t_jax.evaluate import evaluate_run, format_table
from so8t_jax.loading import encode_prompt, save_converted
from so8t_jax.runs import model_card, write_json, write_text
from so8t_jax.sampling import GREEDY, bucket_length, left_pad, make_sample_fn
from so8t_jax.weights.export import export


def samples(cfg, params, tokenizer, rows, policy: PolicyConfig) -> list[tuple[str, str]]:
    """(prompt as JSON, greedy completion) of a few rows, for TensorBoard."""
    prompts = [encode_prompt(tokenizer, data.messages_for(r)) for r in rows]
    ids, mask = left_pad(prompts, bucket_length(max(len(p) for p in prompts)), policy.pad_id)
    fn = make_sample_fn(cfg, min(policy.max_new_tokens, 48), GREEDY, policy.eos_ids, policy.pad_id)
    out = jax.device_get(distributed.gathered(fn(params, jnp.asarray(ids), jnp.asarray(mask), None)))
    texts = [tokenizer.decode(t[: n], skip_special_tokens=True) for t, n in zip(out.tokens_BxN, out.lengths_B)]
    return [(json.dumps(data.messages_for(r), ensure_ascii=False), t) for r, t in zip(rows, texts)]


def save_student(cfg, params, tokenizer, out_dir: pathlib.Path, source: str) -> pathlib.Path:
    """RUN/student as `save_converted` writes it, but whole or not at all: written in a temporary folder beside
    it (a killed write's leftover is replaced), then renamed into place; an earlier student/ is moved aside
    first and deleted after (a folder cannot be replaced in one rename). With several processes every one
    calls this (the params are gathered from all of them) and the writer writes."""
    out = pathlib.Path(out_dir).absolute()
    params = distributed.gathered(params)
    if not distributed.is_writer():
        return out
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_converted(cfg, params, tokenizer, tmp, source=source)
    except Exception as e:  # noqa: BLE001 - disk full, file too large, ...: one clear error, the old folder kept
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(out, e, kept=f"{out.name}/ as it was" if out.exists() else None) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_and_evaluate(config, run_dir: pathlib.Path, results: dict, log: audit.AuditLog) -> dict:
    """The results JSON, then export (HF + GGUF) and the teacher / before / after evaluation, recorded in the
    results, model card and audit log. A failure here is recorded and reported, never allowed to lose the
    trained student. Only the writer process writes, exports and evaluates (on student/, without collectives)."""
    if not distributed.is_writer():
        return results
    write_json(run_dir / "distillation_results.json", results)  # evaluate_run reads the run's config from it
    formats = [f for f in config.export.formats if f]
    if formats:
        for stale in (run_dir / "export").glob(".*"):  # temporaries of a killed export (this run owns the folder)
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        try:
            paths = export(run_dir / "student", run_dir / "export", formats, config.export.gguf_type)
            results["export"] = {k: str(v) for k, v in paths.items()}
            log.append(audit.EXPORT, **results["export"])
        except Exception as e:  # noqa: BLE001 - unsupported config, disk full (OSError, SafetensorError), ...
            results["export"] = {"error": f"{type(e).__name__}: {e}"}
            log.append(audit.EXPORT, error=results["export"]["error"])
    if config.eval.at_end and config.data.heldout_fraction > 0:
        ev = evaluate_run(run_dir, n_rows=config.eval.rows or None)
        results["evaluation"].update(models=ev["models"], samples=ev["samples"], table=format_table(ev))
        log.append(audit.EVAL, **{name: {k: m[k] for k in ("kl", "top1", "ppl", "greedy_match")}
                                  for name, m in ev["models"].items()})
    write_json(run_dir / "distillation_results.json", results)
    write_text(run_dir / "README.md", model_card(results, config))
    return results
