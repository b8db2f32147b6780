"""The quality table's pieces (gap closed, GSM8K rows, the markdown) and, slow, one smoke-budget table."""
import json
import pathlib
import subprocess
import sys

import pytest

from so8t_jax import data, quality
from so8t_jax.defaults import get_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gap_closed():
    assert quality.gap_closed(15.0, 3.0, 0.0) == pytest.approx(0.8)      # KL: 15 -> 3 of the way to 0
    assert quality.gap_closed(0.2, 0.6, 1.0) == pytest.approx(0.5)       # top-1: 0.2 -> 0.6 of the way to 1
    assert quality.gap_closed(0.5, 0.4, 0.5) is None                     # nothing to close
    assert quality.gap_closed(1.0, 0.0, 5.0) == pytest.approx(-0.25)     # worse than before


def test_gsm8k_rows_become_prompt_completion_answer(tmp_path):
    src = tmp_path / "gsm.jsonl"
    src.write_text(json.dumps({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}) + "\n")
    rows = data.load_rows(str(quality.gsm8k_rows(src, tmp_path / "rows.jsonl")))
    assert rows[0].prompt == "What is 2+3?" and rows[0].completion == "2+3=5\n#### 5" and rows[0].answer == "5"
    other = tmp_path / "trl.jsonl"
    other.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    assert quality.gsm8k_rows(other, tmp_path / "x.jsonl") == other  # TRL rows pass through


def test_recipes_differ_only_in_the_completion_source(tmp_path):
    configs = {name: quality.recipe_config(get_config(), name, "cpu", tmp_path) for name in quality.RECIPES}
    flat = {name: c.to_dict() for name, c in configs.items()}
    for name, c in configs.items():
        assert c.train.steps == 150 and c.policy.max_new_tokens == 64 and c.run_name == f"quality-cpu-{name}"
    assert configs["kd"].policy.lmbda == 0 and configs["on_policy"].policy.lmbda == 1.0
    assert configs["gkd"].policy.lmbda_schedule == "linear" and configs["seq_kd"].policy.seq_kd
    gkd, gkd_seq = flat["gkd"], flat["gkd_seq_kd"]  # the same recipe but for where offline completions come from
    assert gkd_seq["policy"] == {**gkd["policy"], "seq_kd": True} and gkd_seq["loss"] == gkd["loss"]
    assert flat["kd"]["student"] == flat["gkd"]["student"] and flat["kd"]["data"] == flat["seq_kd"]["data"]
    # teacher-written prompts have no completions: the recipes with offline steps train on the teacher's
    base = get_config()
    base.data.source = "teacher:64"
    written = {name: quality.recipe_config(base.copy_and_resolve_references(), name, "cpu", tmp_path)
               for name in quality.RECIPES}
    assert [name for name, c in written.items() if c.policy.seq_kd] == ["kd", "gkd", "seq_kd", "gkd_seq_kd"]


def test_results_section_is_replaced_and_the_rest_kept():
    doc = "# Results\n\n## Older section\n\nkept\n"
    once = quality.with_section(doc, "## Distillation quality\n\n| a |\n")
    assert once.startswith("# Results\n\n" + quality.BEGIN + "\n## Distillation quality\n\n| a |\n" + quality.END)
    assert once.endswith("## Older section\n\nkept\n")
    twice = quality.with_section(once, "## Distillation quality\n\n| b |\n")
    assert "| a |" not in twice and "| b |" in twice and twice.count(quality.BEGIN) == 1
    assert twice.replace("| b |", "| a |") == once  # only the section changed
    assert quality.with_section("", "## T\n").startswith("# Results\n\n" + quality.BEGIN)


@pytest.mark.slow
def test_smoke_table(tmp_path):
    """Two recipes at the smoke budget with the real SmolLM2 teacher: the table and RESULTS-style markdown."""
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}={a + b}\n#### "
                                         f"{a + b}"}) + "\n" for a, b in [(2, 3), (4, 5), (6, 1), (7, 7)]))
    res = subprocess.run([sys.executable, str(ROOT / "scripts/quality.py"), "--budget", "smoke", "--eval-data",
                          str(evals), "--out", str(tmp_path / "q"), "--recipes", "kd,seq_kd", "--results",
                          str(tmp_path / "RESULTS.md")], capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    table = json.loads((tmp_path / "q/quality.json").read_text())
    assert list(table["recipes"]) == ["kd", "seq_kd"]
    for r in table["recipes"].values():
        m = r["metrics"]
        assert m["teacher"]["kl"] == 0.0 and m["before"]["kl"] > m["after"]["kl"] > 0  # training moved it
        assert r["gap"]["kl"] > 0 and len(r["student_layers"]) == 2
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| kd | after |" in text and "| seq_kd | teacher |" in text


def test_finished_recipes_are_kept_and_only_missing_ones_trained(tmp_path, monkeypatch):
    """quality.json rows of the same budget and evaluation are reused (training forbidden); a missing recipe, a
    different budget or --fresh trains."""
    from so8t_jax import trainer
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"prompt": "Hi", "completion": " there"}) + "\n")
    row = {"metrics": {}, "gap": {"kl": 0.5}, "train_s": 1.0}
    (tmp_path / "quality.json").write_text(json.dumps(
        {"budget": "smoke", "eval_data": str(evals), "eval_rows": 4, "recipes": {"kd": row}}))

    class Trained(Exception):
        pass

    def forbidden(config):
        raise Trained(config.run_name)
    monkeypatch.setattr(trainer, "train", forbidden)
    table = quality.run_quality("smoke", evals, tmp_path, ("kd",))
    assert table["recipes"] == {"kd": row}
    for kwargs in ({"recipes": ("kd", "gkd")}, {"recipes": ("kd",), "fresh": True}, {"recipes": ("kd",),
                                                                                      "eval_rows": 3}):
        with pytest.raises(Trained):
            quality.run_quality("smoke", evals, tmp_path, **kwargs)
