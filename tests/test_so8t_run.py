"""configs/so8t_kd.py end to end on the real SmolLM2 teacher (smoke size, through scripts/train.py): every
objective non-zero and finite, alpha at its schedule's end, the gates folded into a plain student that
transformers runs with the gated model's logits, heads beside the export, and the safety head above the
majority-class rate on held-out labelled rows of a user dataset (JSONL with allow / escalate / deny)."""
import collections
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import so8t_jax
from so8t_jax import audit, data, so8t
from so8t_jax import model as model_lib
from so8t_jax.build import make_student
from so8t_jax.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24
TERMS = ("kd", "ce", "hidden", "so8t", "pet", "safety", "verification")


# one real-size SO8T run (SmolLM2 teacher, ~2.5 min on 2 cores) shared by the module: with the slow tests in CI
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("so8t_run")
    rows = [r for r in data.builtin_diverse(1200, seed=3) if r.safety_label >= 0]
    dataset = root / "safety.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": r.prompt, "completion": r.completion,
                                           "safety_label": so8t.SAFETY_LABELS[r.safety_label]},
                                          ensure_ascii=False) + "\n" for r in rows))
    cmd = [sys.executable, str(ROOT / "scripts/train.py"), "--config", "so8t_kd.py", "--output", str(root),
           "--steps", str(STEPS), "--config.student.layers=2", f"--config.data.source={dataset}",
           "--config.data.heldout_fraction=0.25", "--config.data.max_prompt_len=64",
           "--config.data.prompt_buckets=(64,)", "--config.policy.max_new_tokens=8", "--config.train.eval_every=0",
           "--config.train.sample_every=0", "--config.train.checkpoint_every=100", "--config.eval.rows=8",
           "--config.export.formats=('hf',)", "--config.loss.pet_weight=0.05", "--config.optim.warmup_steps=2",
           "--config.optim.learning_rate=1e-4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = root / "so8t-kd-smollm2"
    return run_dir, json.loads((run_dir / "distillation_results.json").read_text())


def test_every_term_nonzero_finite_and_logged(run):
    run_dir, r = run
    m = r["final_metrics"]
    for k in TERMS:
        assert np.isfinite(m[f"loss/{k}"]) and m[f"loss/{k}"] > 0, k
    assert r["steps"] == STEPS and r["config"]["so8t"]["gates"] is True
    assert m["so8t/alpha"] == pytest.approx(1.6, abs=1e-5)  # the last step runs at alpha_end
    assert m["so8t/rotation_angle"] > 0
    events = b"".join(p.read_bytes() for p in (run_dir / "tensorboard").rglob("events*"))
    for tag in ("so8t/alpha", "so8t/rotation_angle", *(f"loss/{k}" for k in TERMS)):
        assert tag.encode() in events, tag
    card = (run_dir / "README.md").read_text()
    assert "SO8T structure" in card and "safety" in card and "ECE" in card
    assert audit.verify(run_dir).ok


def test_end_of_run_evaluation_reports_the_heads(run):
    """The trainer's teacher / before / after evaluation scores the heads of both students (8 rows here)."""
    _, r = run
    models = r["evaluation"]["models"]
    assert models["teacher"]["safety_accuracy"] is None  # the teacher has no heads
    for name in ("before", "after"):
        assert 0.0 <= models[name]["safety_accuracy"] <= 1.0
        assert 0.0 <= models[name]["verifier_ece"] <= 1.0
    assert models["after"]["kl"] < models["before"]["kl"]


def test_folded_student_and_export_equal_the_gated_model(run):
    run_dir, _ = run
    ckpt = Checkpointer(run_dir / "orbax")
    state, _ = ckpt.restore(kind="final")
    ckpt.close()
    gated = state["params"]["student"]  # restored without a target: plain dicts
    assert so8t.has_gates(gated) and so8t.has_heads(gated)
    student = so8t_jax.load(run_dir / "student")
    assert not so8t.has_gates(student.params) and so8t.has_heads(student.params)
    tokens = np.asarray([student.tokenizer("The capital of France is Paris. 日本の首都は東京です。")["input_ids"]])
    ours = np.asarray(model_lib.forward(gated, student.config, jnp.asarray(tokens)).logits)
    np.testing.assert_allclose(np.asarray(student.logits(tokens)), ours, atol=2e-4)
    hf_dir = run_dir / "export/hf"
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=5e-4)
    exported = so8t_jax.load(hf_dir)
    for head in so8t.HEADS:
        for k in ("w", "b"):
            np.testing.assert_array_equal(np.asarray(exported.params[head][k]), np.asarray(gated[head][k]))


def _safety_accuracy(m, enc):
    b = data.Batcher(enc, len(enc), 0, (64,), 8, 0).batch(0)
    hidden = model_lib.forward(m.params, m.config, jnp.asarray(b["prompt_ids"]),
                               mask_BxT=jnp.asarray(b["prompt_mask"]), logits=False).hidden
    logits = np.asarray(so8t.safety_logits(m.params, hidden, jnp.asarray(b["prompt_mask"])))
    return float(np.mean(np.argmax(logits, -1) == b["safety_label"]))


def test_safety_head_beats_majority_class_on_heldout_rows(run):
    run_dir, r = run
    from ml_collections import ConfigDict
    config = ConfigDict(r["config"])
    student = so8t_jax.load(run_dir / "student")
    rows = data.load_rows(config.data.source)
    _, heldout = data.split_heldout(rows, config.data.heldout_fraction, config.seed)
    enc = data.encode_rows(heldout, tokenizer=student.tokenizer, max_prompt_len=64, max_completion_len=8,
                           eos_id=None, chat=True)
    counts = collections.Counter(e.safety_label for e in enc)
    majority = max(counts.values()) / len(enc)
    assert len(enc) >= 60 and min(counts) >= 0
    teacher = so8t_jax.load(so8t_jax.loading.smollm2_gguf())
    before = _safety_accuracy(make_student(config, teacher), enc)
    after = _safety_accuracy(student, enc)
    print(f"safety accuracy on {len(enc)} held-out rows: before {before:.3f}, after {after:.3f}, "
          f"majority class {majority:.3f}")
    assert after > majority + 0.1 and after > before + 0.1
