"""Evaluation: every metric against hand-computed values, evaluate_models against a float64 numpy reference
built from full-forward logits, and evaluate_run + scripts/evaluate.py on a real tiny run."""
import json
import math
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import make_hf_model, write_gguf

import so8t_jax
from so8t_jax import data, evaluate, sampling
from so8t_jax import model as model_lib
from so8t_jax.build import student_from_teacher
from so8t_jax.evaluate import evaluate_models, evaluate_run, format_table
from so8t_jax.loading import encode_prompt
from so8t_jax.metrics import (
    answer_accuracy,
    expected_calibration_error,
    extract_answer,
    greedy_match_length,
    perplexity,
    safety_accuracy,
    token_kl,
    top1_agreement,
)
from so8t_jax.trainer import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import smoke  # noqa: E402

EOS, PAD = 2, 0  # the fixture tokenizer's <|im_end|> and <|endoftext|>
SETTINGS = dict(max_prompt_len=24, max_new_tokens=6, prompt_buckets=(16, 24), batch_size=4, eos_ids=(EOS,),
                pad_id=PAD)


# ------------------------------------------------------------------------------------------- metrics


def test_token_kl_and_agreement_by_hand():
    t = np.log([[[0.5, 0.5, 1e-30], [0.2, 0.3, 0.5], [0.7, 0.2, 0.1]]])
    s = np.log([[[0.25, 0.75, 1e-30], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]]])
    s[0, 2] = np.nan  # a masked position's contents never matter
    mask = np.array([[1, 1, 0]])
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl1 = 0.2 * math.log(0.2 / 0.1) + 0.3 * math.log(0.3 / 0.6) + 0.5 * math.log(0.5 / 0.3)
    assert token_kl(t, s, mask) == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    assert token_kl(t, t, mask) == 0.0
    assert token_kl(t, s, np.zeros((1, 3))) != token_kl(t, s, np.zeros((1, 3)))  # NaN: nothing to average
    # argmaxes: teacher (0 (tie -> first), 2, 0); student (1, 1, -)
    s[0, 2] = np.log([0.6, 0.2, 0.2])
    assert top1_agreement(t, s, np.ones((1, 3))) == pytest.approx(1 / 3)
    assert top1_agreement(t, s, mask) == 0.0
    assert top1_agreement(t, t, mask) == 1.0


def test_perplexity_with_shift_and_ignored_labels():
    logits = np.log([[[0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.3, 0.7]]])
    labels = np.array([[-100, 0, 1, -100]])  # targets 0 (from position 0) and 1 (from position 1)
    assert perplexity(logits, labels) == pytest.approx(math.exp(-(math.log(0.5) + math.log(0.8)) / 2), rel=1e-6)
    two_rows = np.concatenate([logits, logits[:, ::-1]])
    labels2 = np.array([[-100, 0, 1, -100], [1, 1, -100, -100]])  # row 1: target 1 under [0.3, 0.7]
    nll = -(math.log(0.5) + math.log(0.8) + math.log(0.7)) / 3
    assert perplexity(two_rows, labels2) == pytest.approx(math.exp(nll), rel=1e-6)


@pytest.mark.parametrize("teacher,student,expected", [
    ([5, 6, 2, 0], [5, 6, 2, 0], 3),   # equal: their length, EOS included
    ([5, 6, 7, 2], [5, 9, 7, 2], 1),
    ([9, 6, 2, 0], [5, 6, 2, 0], 0),
    ([5, 6, 2, 0], [5, 6, 7, 8], 2),   # the teacher stops where the student goes on
    ([5, 6, 0, 0], [5, 6, 7, 8], 2),   # no EOS: trailing padding ends the teacher
    ([5, 6, 7, 8], [5, 6, 7, 8], 4),   # no EOS, no padding: the whole row
    ([5, 6, 7, 8], [5, 6, 2, 8], 2),
    ([5, 0, 7, 2], [5, 0, 7, 2], 4),   # a pad id inside a sequence is a token
])
def test_greedy_match_length(teacher, student, expected):
    assert greedy_match_length([teacher], [student], eos_ids=(EOS,), pad_id=PAD).tolist() == [expected]


def test_greedy_match_length_batched_and_ragged():
    t = np.array([[5, 6, 2, 0], [5, 6, 7, 8]])
    s = np.array([[5, 6, 2, 0], [5, 1, 7, 8]])
    assert greedy_match_length(t, s, (EOS,), PAD).tolist() == [3, 1]
    assert greedy_match_length([[1, 2, 3], [4]], [[1, 2], [4, 5]]).tolist() == [2, 1]


@pytest.mark.parametrize("text,answer", [
    ("#### 42", "42"),
    ("12 + 30 = 42.\n#### 42", "42"),
    ("so it is 7.\n#### 42\nQuestion: what is 9?", "42"),  # the rest of the line after ####
    ("#### Paris", "Paris"),
    ("The answer is 3.5.", "3.5"),
    ("-7", "-7"),
    ("5-3 leaves 2, then 5-3", "3"),                       # a minus between digits is not a sign
    ("It costs 1,234 yen, not 99", "99"),
    ("It costs 1,234 yen", "1234"),
    ("答えは４２です。", "42"),                              # full-width digits
    ("The capital of Spain is Madrid.", None),
    ("", None),
    (None, None),
    ("####", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_answer_accuracy_normalises():
    preds = ["42", "3.50", "Paris", None, "1,234", "7", "Friday.", "-0.0"]
    answers = ["42.0", "3.5", "paris", "1", "1234", "8", "friday", "0"]
    assert answer_accuracy(preds, answers) == pytest.approx(6 / 8)
    assert math.isnan(answer_accuracy([], []))
    with pytest.raises(ValueError):
        answer_accuracy(["1"], [])


def test_expected_calibration_error_by_hand():
    conf, correct = [0.92, 0.95, 0.97, 0.55, 0.45], [1, 1, 0, 1, 0]
    # 10 bins: (0.9, 1] mean conf 0.94667 acc 2/3; (0.5, 0.6] 0.55 vs 1; (0.4, 0.5] 0.45 vs 0
    by_hand = 3 / 5 * abs(2 / 3 - (0.92 + 0.95 + 0.97) / 3) + 1 / 5 * 0.45 + 1 / 5 * 0.45
    assert expected_calibration_error(conf, correct) == pytest.approx(by_hand)
    # 2 bins: (0, 0.5] {0.45: acc 0}; (0.5, 1] mean 0.8475 acc 0.75
    assert expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(0.2 * 0.45 + 0.8 * 0.0975)
    assert expected_calibration_error([0.5, 0.5, 0.0], [1, 0, 0]) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error([], []))


def test_safety_accuracy_ignores_unlabelled():
    logits = [[3, 0, 0], [0, 2, 1], [0, 0, 1], [5, 0, 0]]
    assert safety_accuracy(logits, [0, 2, -1, 0]) == pytest.approx(2 / 3)
    assert math.isnan(safety_accuracy(logits, [-1, -1, -1, -1]))


# ------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def teacher_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    return write_gguf(make_hf_model("llama", root / "llama"), root / "teacher.Q8_0.gguf", "Q8_0")


@pytest.fixture(scope="module")
def models(teacher_gguf):
    """A 2-layer teacher and its 1-layer cut: the same shapes as the tiny run below, so that test reuses
    these compiled functions."""
    teacher = so8t_jax.load(teacher_gguf)
    return teacher, {"before": student_from_teacher(teacher, 1, "float32"), "after": teacher}


def test_evaluate_models_orders_teacher_before_after(models):
    teacher, students = models
    rows = [r for r in data.builtin_diverse(6) if r.completion is not None][:5]
    m = evaluate_models(teacher, students, rows, **SETTINGS)
    t, before, after = (m["models"][k] for k in ("teacher", "before", "after"))
    assert list(m["models"]) == ["teacher", "before", "after"]
    assert m["counts"]["rows"] == 5 and m["counts"]["rows_generated"] == 5 and m["counts"]["reference_tokens"] > 5
    for row in (t, after):
        assert row["kl"] == pytest.approx(0.0, abs=1e-6) and row["top1"] == 1.0
        assert row["greedy_match"] == t["greedy_length"] and row["greedy_match_fraction"] == 1.0
        assert row["ppl"] == pytest.approx(t["ppl"], rel=1e-6)
    assert before["kl"] > 1e-3 and before["top1"] < 1.0 and before["greedy_match"] < t["greedy_length"]
    assert before["safety_accuracy"] is None and before["verifier_ece"] is None
    assert len(m["samples"]) == 3 and {"prompt", "teacher", "before", "after"} <= set(m["samples"][0])
    table = format_table(m).splitlines()
    assert table[0].split() == ["model", "KL", "top-1", "ppl", "greedy-match", "accuracy"]
    assert [line.split()[0] for line in table[2:]] == ["teacher", "before", "after"]


def test_a_row_without_a_reference_is_scored_on_the_teachers_greedy_continuation(models):
    """Prompt-only rows (teacher:N, builtin rows without an answer text): KL / top-1 / ppl on the teacher's own
    greedy continuation, equal to the same rows given that continuation as their reference."""
    teacher, students = models
    rows = [data.Row(f"Name {k} colours of the rainbow.", None) for k in (2, 3, 4)]
    got = evaluate_models(teacher, students, rows, **SETTINGS)
    assert got["counts"]["rows_with_reference"] == 0 and got["counts"]["rows_with_teacher_reference"] == 3
    enc = data.encode_rows(rows, teacher.tokenizer, SETTINGS["max_prompt_len"], SETTINGS["max_new_tokens"],
                           eos_id=EOS)
    sample = sampling.make_sample_fn(teacher.config, SETTINGS["max_new_tokens"], sampling.GREEDY, (EOS,), 0)
    refs, n = evaluate._teacher_references(teacher, enc, sample, 4, SETTINGS["prompt_buckets"],
                                           SETTINGS["max_new_tokens"], 0)
    assert n == 3 and all(r.completion_ids for r in refs)
    assert got["counts"]["reference_tokens"] == sum(len(r.completion_ids) for r in refs)
    t, before = got["models"]["teacher"], got["models"]["before"]
    assert t["kl"] == pytest.approx(0.0, abs=1e-6) and t["top1"] == 1.0 and before["kl"] > 1e-3
    # float64 reference: the cut student teacher-forced on each row's prompt + the teacher's continuation
    kls = []
    for r in refs:
        seq, p = list(r.prompt_ids) + list(r.completion_ids), len(r.prompt_ids)
        padded = np.zeros((1, 40), np.int32)
        padded[0, :len(seq)] = seq
        lt, ls = (_log_softmax(np.asarray(m.logits(padded), np.float64)[0, p - 1:len(seq) - 1])
                  for m in (teacher, students["before"]))
        kls += list(np.sum(np.exp(lt) * (lt - ls), -1))
    assert before["kl"] == pytest.approx(np.mean(kls), rel=1e-4)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_evaluate_models_matches_numpy_reference_for_one_row(models):
    """One row (the batch is filled with copies that must not count), with made-up safety and verifier heads
    on a copy of the teacher; every number recomputed in float64 from full-forward logits."""
    teacher, students = models
    tok = teacher.tokenizer
    rng = np.random.default_rng(0)
    d = teacher.config.d_model
    heads = {"safety_head": {"w": jnp.asarray(rng.normal(size=(d, 3))), "b": jnp.asarray(rng.normal(size=3))},
             "verifier": {"w": jnp.asarray(0.1 * rng.normal(size=d)), "b": jnp.asarray(0.2)}}
    headed = so8t_jax.Model(teacher.config, dict(teacher.params, **heads), teacher.source)
    question = "Tom has 12 apples and buys 30 more. How many apples does he have now?"  # > 24 tokens: cut
    row = data.Row(question, "12 + 30 = 42.\n#### 42", safety_label=1, answer="42")
    m = evaluate_models(teacher, {**students, "headed": headed}, [row], **SETTINGS)

    n = SETTINGS["max_new_tokens"]
    prompt = encode_prompt(tok, question)[-SETTINGS["max_prompt_len"]:]
    completion = (tok(row.completion, add_special_tokens=False)["input_ids"] + [EOS])[:n]
    seq = prompt + completion
    p, c = len(prompt), len(completion)
    assert p == SETTINGS["max_prompt_len"]

    def logits(model, ids):  # right-padded to one length: causal, so position t sees only ids[:t + 1]
        padded = np.zeros((1, 40), np.int32)
        padded[0, :len(ids)] = ids
        return np.asarray(model.logits(padded), np.float64)[0, :len(ids)]

    def greedy(model):
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(np.argmax(logits(model, ids)[-1])))
            if ids[-1] == EOS:
                break
        return ids[p:]

    lt = _log_softmax(logits(teacher, seq))[p - 1:p + c - 1]
    g_teacher = greedy(teacher)
    for name, model in (("before", students["before"]), ("headed", headed)):
        ls = _log_softmax(logits(model, seq))[p - 1:p + c - 1]
        got = m["models"][name]
        assert got["kl"] == pytest.approx(np.mean(np.sum(np.exp(lt) * (lt - ls), -1)), rel=1e-4, abs=1e-6)
        agree = np.argmax(lt, -1) == np.argmax(ls, -1)
        assert got["top1"] == pytest.approx(agree.mean())
        assert got["ppl"] == pytest.approx(np.exp(-np.mean(ls[np.arange(c), completion])), rel=1e-4)
        g = greedy(model)
        k = 0
        while k < min(len(g), len(g_teacher)) and g[k] == g_teacher[k]:
            k += 1
        assert got["greedy_match"] == k and got["greedy_length"] == len(g)
        text = tok.decode([t for t in g if t != EOS], skip_special_tokens=True)
        assert got["accuracy"] == float(extract_answer(text) == "42")
    assert m["models"]["before"]["top1"] < 1.0

    hidden = np.asarray(model_lib.forward(headed.params, teacher.config, jnp.asarray([seq])).hidden, np.float64)[0]
    safety_logits = hidden[p - 1] @ np.asarray(heads["safety_head"]["w"], np.float64) + np.asarray(
        heads["safety_head"]["b"], np.float64)
    assert m["models"]["headed"]["safety_accuracy"] == float(np.argmax(safety_logits) == 1)
    conf = 1 / (1 + np.exp(-(hidden[p - 1:p + c - 1] @ np.asarray(heads["verifier"]["w"], np.float64) + 0.2)))
    # the headed model is the teacher: every token agrees, so the ECE is the mean under-confidence
    assert m["models"]["headed"]["verifier_ece"] == pytest.approx(np.mean(1 - conf), rel=1e-4)
    assert m["counts"]["rows"] == 1 and m["counts"]["reference_tokens"] == c
    assert "safety" in format_table(m) and "ECE" in format_table(m)


# ------------------------------------------------------------------------------------------- a run


def test_evaluate_run_and_script_on_a_tiny_run(teacher_gguf, tmp_path):
    c = smoke.get_config()
    c.teacher.path, c.output_dir, c.run_name = str(teacher_gguf), str(tmp_path / "out"), "tiny"
    c.student.layers = 1
    c.data.source, c.data.heldout_fraction = "builtin:diverse:20", 0.2
    c.data.max_prompt_len, c.data.prompt_buckets = SETTINGS["max_prompt_len"], SETTINGS["prompt_buckets"]
    c.policy.lmbda, c.policy.max_new_tokens = 0.0, 6
    c.train.steps, c.train.checkpoint_every, c.train.eval_every, c.train.sample_every = 4, 4, 0, 0
    train(c)
    run = tmp_path / "out/tiny"

    metrics = evaluate_run(run)
    on_disk = json.loads((run / "evaluation/metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert list(on_disk["models"]) == ["teacher", "before", "after"]
    _, heldout = data.split_heldout(data.load_rows("builtin:diverse:20"), 0.2, 0)
    assert on_disk["data"]["heldout_rows"] == len(heldout) == on_disk["counts"]["rows"] == 4
    assert [s["prompt"] for s in on_disk["samples"]] == [r.prompt for r in heldout[:3]]
    assert on_disk["models"]["teacher"]["kl"] == 0.0 and on_disk["models"]["teacher"]["top1"] == 1.0
    for name in ("before", "after"):
        assert on_disk["models"][name]["kl"] > 0 and np.isfinite(on_disk["models"][name]["ppl"])
        assert on_disk["models"][name]["params"] < on_disk["models"]["teacher"]["params"]

    res = subprocess.run([sys.executable, str(ROOT / "scripts/evaluate.py"), str(run), "--rows", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert [line.split()[0] for line in lines[header + 2:header + 5]] == ["teacher", "before", "after"]
    assert json.loads((run / "evaluation/metrics.json").read_text())["counts"]["rows"] == 2
    assert not list((run / "evaluation").glob("*.tmp"))

    # any dataset file: its rows (not the held-out split), GSM8K-style prompt / completion / answer rows
    eval_file = tmp_path / "other.jsonl"
    eval_file.write_text("\n".join(json.dumps({"prompt": f"What is {a} plus {b}?", "completion":
                                               f"{a} + {b} = {a + b}\n#### {a + b}", "answer": str(a + b)})
                                   for a, b in [(2, 3), (10, 7), (4, 4)]) + "\n")
    res = subprocess.run([sys.executable, str(ROOT / "scripts/evaluate.py"), str(run), "--data", str(eval_file),
                          "--rows", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    other = json.loads((run / "evaluation/other/metrics.json").read_text())
    assert other["data"]["source"] == str(eval_file) and other["counts"]["rows"] == 2
    assert other["counts"]["rows_with_answer"] == 2
    assert [s["prompt"] for s in other["samples"]] == ["What is 2 plus 3?", "What is 10 plus 7?"]
    assert other["models"]["teacher"]["kl"] == 0.0 and other["models"]["after"]["kl"] > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "completion": "fine"}\n{"prompt": 3}\n')
    res = subprocess.run([sys.executable, str(ROOT / "scripts/evaluate.py"), str(run), "--data", str(bad)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "bad.jsonl line 2" in res.stderr
    assert "Traceback" not in res.stderr
