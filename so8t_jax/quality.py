"""The quality table: students trained at equal steps and tokens by different recipes, each evaluated (teacher /
before / after) on prompts from a source other than the training prompts; docs/RESULTS.md is written from it.

    python scripts/quality.py --budget cpu --eval-data ../shared/data/gsm8k_train.jsonl

Recipes (all from configs/gkd.py's teacher, student and data, differing only in where completions come from):
kd (offline: the dataset's completions, forward KL), gkd (JSD beta 0.5 with the lmbda schedule: offline first,
then half on-policy), on_policy (lmbda 1 from the start), seq_kd (the teacher's cached completions), gkd_seq_kd
(gkd whose offline steps use the teacher's cached completions). "Gap closed"
is the fraction of the before -> teacher distance the training covered: KL (teacher 0), top-1 (teacher 1),
greedy-match (the teacher's own completion length would be a full match; reported as tokens).
"""
from __future__ import annotations

import json
import pathlib
import time

from so8t_jax import build, data, evaluate, runs, select, teacher_prompts, trainer
from so8t_jax.completions import PolicyConfig
from so8t_jax.config import set_path
from so8t_jax.defaults import get_config

RECIPES = {
    "kd": {"loss.divergence": "forward_kl", "policy.lmbda": 0.0, "policy.seq_kd": False},
    "gkd": {"loss.divergence": "jsd", "loss.jsd_beta": 0.5, "policy.lmbda": 0.5, "policy.lmbda_schedule": "linear",
            "policy.lmbda_start": 0.0, "policy.lmbda_ramp": 0.5, "policy.seq_kd": False},
    "on_policy": {"loss.divergence": "jsd", "loss.jsd_beta": 0.5, "policy.lmbda": 1.0, "policy.seq_kd": False},
    "seq_kd": {"loss.divergence": "forward_kl", "policy.lmbda": 0.0, "policy.seq_kd": True},
}
# gkd whose offline steps train on the teacher's cached completions instead of the dataset's
RECIPES["gkd_seq_kd"] = {**RECIPES["gkd"], "policy.seq_kd": True}
# per budget: config overrides shared by every recipe, and evaluation rows
BUDGETS = {
    "smoke": ({"student.layers": 2, "data.source": "builtin:diverse:24", "train.steps": 2, "train.batch_size": 4,
               "policy.max_new_tokens": 8, "data.max_prompt_len": 64, "data.prompt_buckets": (64,),
               "student.select_rows": 2, "student.select_len": 16}, 4),
    # configs/gkd.py's budget and optimizer (its lr from the sweep in docs/RESULTS.md): the default job's shapes
    "cpu": ({"train.steps": 150, "train.batch_size": 8, "policy.max_new_tokens": 64, "optim.learning_rate": 3e-4,
             "optim.min_lr": 3e-5, "optim.warmup_steps": 10, "train.remat": "none"}, 64),
    "gpu": ({"train.steps": 2000, "train.batch_size": 32, "policy.max_new_tokens": 128,
             "data.source": "builtin:diverse:8192", "train.compute_dtype": "bfloat16", "teacher.dtype": "bfloat16",
             "train.remat": "dots", "optim.learning_rate": 1e-4}, 256),
}


def gsm8k_rows(path, out_path) -> pathlib.Path:
    """A GSM8K-style file ({"question", "answer"} with the final number after ####) as TRL prompt / completion
    rows with the final answer (what evaluation scores task accuracy on); other files pass through."""
    path, out_path = pathlib.Path(path), pathlib.Path(out_path)
    first = path.open(encoding="utf-8").readline()
    try:
        if not {"question", "answer"} <= set(json.loads(first)):
            return path
    except ValueError:
        return path
    lines = []
    for line in path.open(encoding="utf-8"):
        if line.strip():
            r = json.loads(line)
            lines.append(json.dumps({"prompt": r["question"], "completion": r["answer"],
                                     "answer": r["answer"].rsplit("####", 1)[-1].strip()}, ensure_ascii=False))
    runs.write_text(out_path, "\n".join(lines) + "\n")
    return out_path


def recipe_config(base, recipe: str, budget: str, out_dir, seed: int = 0):
    c = get_config() if base is None else base
    for key, value in {**BUDGETS[budget][0], **RECIPES[recipe]}.items():
        set_path(c, key, value)
    if teacher_prompts.is_source(c.data.source) and PolicyConfig(**c.policy.to_dict()).offline_steps:
        c.policy.seq_kd = True  # prompt-only rows (teacher:N): the offline steps train on the teacher's completions
    c.run_name, c.output_dir, c.seed = f"quality-{budget}-{recipe}", str(out_dir), seed
    c.eval.at_end, c.export.formats = False, ()
    c.train.sample_every = 0
    return c


def gap_closed(before: float, after: float, teacher: float) -> float | None:
    span = teacher - before
    return None if abs(span) < 1e-12 else (after - before) / span


def _finished(out_dir: pathlib.Path, table: dict) -> dict:
    """The recipes out_dir/quality.json already holds for the same budget, evaluation file and row count (an
    earlier, perhaps interrupted, run of the same table), else none."""
    try:
        old = json.loads((out_dir / "quality.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    same = all(old.get(k) == table[k] for k in ("budget", "eval_data", "eval_rows"))
    return old.get("recipes", {}) if same else {}


def run_quality(budget: str, eval_data, out_dir, recipes=tuple(RECIPES), base_config=None,
                eval_rows: int | None = None, fresh: bool = False) -> dict:
    """Train each recipe, evaluate teacher / before / after on eval_data; returns (and writes out_dir/
    quality.json) {"budget", "eval_data", "recipes": {name: {"metrics": {...}, "gap": {...}, "train_s"}}}.
    A recipe out_dir/quality.json already has for this budget and evaluation is kept, not retrained (a student
    costs half an hour on a CPU: adding a recipe to the table, or rerunning after a kill, trains only what is
    missing); fresh=True trains every recipe again."""
    out_dir = pathlib.Path(out_dir)
    eval_path = gsm8k_rows(eval_data, out_dir / "eval_rows.jsonl")
    data.load_rows(str(eval_path))  # a bad evaluation file fails here, not after the first student's training
    n_eval = eval_rows or BUDGETS[budget][1]
    table = {"budget": budget, "eval_data": str(eval_data), "eval_rows": n_eval, "recipes": {}}
    done = {} if fresh else _finished(out_dir, table)
    for name in recipes:
        if name in done:
            table["recipes"][name] = done[name]
            continue
        config = recipe_config(base_config.copy_and_resolve_references() if base_config else None, name, budget,
                               out_dir)
        start = time.time()
        result = trainer.train(config)
        train_s = time.time() - start
        m = evaluate.evaluate_run(pathlib.Path(config.output_dir) / config.run_name, n_rows=n_eval,
                                  data_source=str(eval_path))["models"]
        t, b, a = m["teacher"], m["before"], m["after"]
        table["recipes"][name] = {
            "metrics": m, "train_s": round(train_s, 1), "steps": result["steps"], "tokens": result["tokens"],
            "student_layers": result["student"].get("teacher_layers"),
            "gap": {"kl": gap_closed(b["kl"], a["kl"], 0.0), "top1": gap_closed(b["top1"], a["top1"], 1.0),
                    "greedy_match": gap_closed(b["greedy_match"], a["greedy_match"], t["greedy_match"])}}
        runs.write_json(out_dir / "quality.json", table)
    return table


def compare_selection(config, eval_rows: int = 16) -> dict:
    """KL per token of the teacher cut to student.layers by student.select = kl and = even, both scored on rows
    the selection did not see (the rows after its first select_rows); the kl choice's time."""
    _, teacher = build.load_teacher(config)
    rows, _ = data.run_rows(config, teacher)
    start = time.time()
    kept = build.kept_layers(config, teacher, rows)
    seconds = time.time() - start
    s = config.student
    probe = rows[s.select_rows:s.select_rows + eval_rows]
    score = build.selection_scorer(config, teacher, probe, 64, 96)
    n_t = teacher.config.n_layers
    even = select.even_layers(n_t, s.layers)
    return {"kl_layers": list(kept), "kl": score(select.keep_mask(n_t, kept)), "even_layers": list(even),
            "even": score(select.keep_mask(n_t, even)), "select_s": round(seconds, 1), "eval_rows": len(probe),
            "eval_tokens": score.tokens}


def _fmt(x, spec):
    return "-" if x is None or x != x else format(x, spec)


BEGIN, END = "<!-- quality table (scripts/quality.py writes this section) -->", "<!-- end of quality table -->"


def with_section(document: str, section: str) -> str:
    """document with its quality-table section (between BEGIN and END) replaced by section, or section put after
    the document's title when it has none: regenerating the table keeps the rest of docs/RESULTS.md."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in document and END in document.split(BEGIN, 1)[1]:
        head, rest = document.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    lines = document.splitlines()
    if lines and lines[0].startswith("# "):
        return "\n".join([lines[0], "", block, *lines[1:]]).rstrip() + "\n"
    return f"# Results\n\n{block}\n\n{document}".rstrip() + "\n"


def results_markdown(table: dict, command: str, machine: str) -> str:
    """The quality table's section of docs/RESULTS.md."""
    lines = [f"## Distillation quality ({table['budget']} budget)", "",
             f"Generated by `{command}` on {machine}, {time.strftime('%Y-%m-%d')}. Evaluation: the first "
             f"{table['eval_rows']} rows of `{table['eval_data']}` (not a training source). Gap closed = (after - "
             "before) / (teacher - before).", "",
             "| recipe | model | KL/token | top-1 | greedy-match | ppl | accuracy | KL gap closed | top-1 gap closed "
             "| train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in table["recipes"].items():
        for model in ("teacher", "before", "after"):
            m = r["metrics"][model]
            gap = r["gap"] if model == "after" else {}
            lines.append(f"| {name} | {model} | {_fmt(m['kl'], '.4f')} | {_fmt(m['top1'], '.3f')} | "
                         f"{_fmt(m['greedy_match'], '.2f')} | {_fmt(m.get('ppl'), '.2f')} | "
                         f"{_fmt(m.get('accuracy'), '.3f')} | {_fmt(gap.get('kl'), '.0%')} | "
                         f"{_fmt(gap.get('top1'), '.0%')} | {r['train_s'] if model == 'after' else ''} |")
    return "\n".join(lines) + "\n"
