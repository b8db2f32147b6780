"""The runner end to end: outputs, SIGKILL + resume (bitwise), NaN rollback, audit, config errors, default job."""
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from fixtures import make_hf_model, write_gguf

import so8t_jax
from so8t_jax import audit
from so8t_jax.checkpoint import Checkpointer
from so8t_jax.config import ConfigError
from so8t_jax.runs import check_config
from so8t_jax.trainer import Hooks, TrainingStopped, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import smoke  # noqa: E402


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    return write_gguf(make_hf_model("llama", root / "hf", num_hidden_layers=3), root / "teacher.Q8_0.gguf", "Q8_0")


def tiny_config(teacher, out, **overrides):
    c = smoke.get_config()
    c.teacher.path = str(teacher)
    c.output_dir = str(out)
    c.student.layers = 2
    c.data.source = "builtin:diverse:40"
    c.policy.max_new_tokens = 8
    c.train.steps = 6
    c.eval.at_end = False        # switched on where a test looks at them
    c.export.formats = ()
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return c


def _cli(teacher, out, *extra, **kw):
    cmd = [sys.executable, str(ROOT / "scripts/train.py"), "--config", "smoke.py", "--teacher", str(teacher),
           "--output", str(out), "--config.student.layers=2", "--samples", "40",
           "--config.policy.max_new_tokens=8", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _final_params(run_dir):
    ckpt = Checkpointer(run_dir / "orbax")
    state, meta = ckpt.restore(kind="final")
    ckpt.close()
    return state, meta


def test_smoke_run_writes_every_output(tiny_teacher, tmp_path):
    results = train(tiny_config(tiny_teacher, tmp_path, **{"eval.at_end": True, "export.formats": ("hf", "gguf")}))
    run = tmp_path / "smoke"
    for name in ("README.md", "audit.sqlite", "distillation_results.json", "orbax/steps", "orbax/best",
                 "orbax/final", "snapshots", "tensorboard", "student/so8t_config.json", "export/hf/config.json",
                 "export/hf/model.safetensors", "export/student-Q8_0.gguf", "evaluation/metrics.json"):
        assert (run / name).exists(), name
    models = results["evaluation"]["models"]
    assert set(models) == {"teacher", "before", "after"} and models["teacher"]["kl"] == pytest.approx(0, abs=1e-6)
    assert models["after"]["kl"] > 0 and "after" in (run / "README.md").read_text()
    on_disk = json.loads((run / "distillation_results.json").read_text())
    assert on_disk["steps"] == 6 and on_disk == json.loads(json.dumps(results, default=str))
    assert on_disk["teacher"]["layers"] == 3 and on_disk["student"]["layers"] == 2
    assert on_disk["compression_ratio"] > 1.0 and np.isfinite(on_disk["loss"]["last"])
    assert len(on_disk["evaluation"]["heldout_loss_history"]) == 2
    assert "so8t_jax.load" in (run / "README.md").read_text()
    assert any(f.name.startswith("events.out.tfevents") for f in (run / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (run / "orbax/steps").iterdir() if p.name.isdigit()) == [3, 6]
    result = audit.verify(run)
    assert result.ok, result.problems
    kinds = [e["kind"] for e in audit.show(run)]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and kinds.count("checkpoint") == 2
    assert "export" in kinds and kinds.count("eval") == 3  # two held-out losses, then the final evaluation
    # the student folder is a model so8t_jax loads, equal to the final training state
    student = so8t_jax.load(run / "student")
    final, _ = _final_params(run)
    jax.tree_util.tree_map(np.testing.assert_array_equal, student.params, final["params"]["student"])
    assert so8t_jax.generate(student, ["Hello"], max_new_tokens=4)[0] is not None
    # tampering with the run's own audit log is caught by the script, naming the row
    with sqlite3.connect(run / "audit.sqlite") as db:
        db.execute("UPDATE events SET payload = replace(payload, '3', '4') WHERE kind = 'checkpoint'")
    res = subprocess.run([sys.executable, str(ROOT / "scripts/audit.py"), "verify", str(run)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "seq" in res.stdout and "changed" in res.stdout


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_teacher, tmp_path):
    steps = ["--steps", "8", "--config.train.checkpoint_every=2", "--config.train.eval_every=4",
             "--config.eval.at_end=False", "--config.export.formats=()"]
    full = _cli(tiny_teacher, tmp_path / "full", *steps, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    cmd = [sys.executable, str(ROOT / "scripts/train.py"), "--config", "smoke.py", "--teacher", str(tiny_teacher),
           "--output", str(tmp_path / "killed"), "--config.student.layers=2", "--samples", "40",
           "--config.policy.max_new_tokens=8", *steps]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step4 = tmp_path / "killed/smoke/orbax/steps/4"
    deadline = time.time() + 600
    while not step4.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert step4.exists(), "the run never wrote its step-4 checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed/smoke/orbax/final").exists()  # really killed before the end

    resumed = _cli(tiny_teacher, tmp_path / "killed", *steps, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r = json.loads((tmp_path / "killed/smoke/distillation_results.json").read_text())
    assert r["resumed_from"] in (2, 4, 6) and r["steps"] == 8
    a, _ = _final_params(tmp_path / "full/smoke")
    b, _ = _final_params(tmp_path / "killed/smoke")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a["params"], b["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, a["opt_state"], b["opt_state"])
    assert audit.verify(tmp_path / "killed/smoke").ok


def nan_params_at(position):
    """A fault the test installs: before the step at `position`, every student weight becomes NaN, so that step's
    loss and gradients are non-finite (the compiled step computes them; nothing is faked downstream)."""
    def before_step(pos, state):
        if pos != position:
            return state
        return state.replace(params=jax.tree_util.tree_map(lambda x: x * np.nan, state.params))
    return Hooks(before_step=before_step)


def test_nan_gradients_roll_back_and_back_off(tiny_teacher, tmp_path):
    cfg = tiny_config(tiny_teacher, tmp_path, **{"stability.snapshot_every": 1, "policy.lmbda": 0.0,
                                                 "train.steps": 6})
    results = train(cfg, hooks=nan_params_at(3))
    run = tmp_path / "smoke"
    assert results["rollbacks"] == 1 and results["steps"] == 6
    event = results["rollback_events"][0]
    assert event["action"] == "rollback" and event["batch_id"] == 3
    final, meta = _final_params(run)
    assert float(final["lr_scale"]) == 0.5
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(final["params"]))
    events = audit.show(run)
    anomaly = [e for e in events if e["kind"] == "anomaly"]
    rollback = [e for e in events if e["kind"] == "rollback"]
    assert anomaly and anomaly[0]["payload"]["anomaly"]["kind"] in ("nonfinite_loss", "nonfinite_grad")
    assert rollback and rollback[0]["payload"]["lr_scale"] == 0.5 and rollback[0]["payload"]["skipped_position"] == 3
    assert audit.verify(run).ok
    # the lr really backed off after the rollback
    assert meta["position"] == 7  # 6 steps + the skipped batch


def test_nan_every_step_stops_after_max_rollbacks(tiny_teacher, tmp_path):
    cfg = tiny_config(tiny_teacher, tmp_path, **{"stability.max_rollbacks": 0, "policy.lmbda": 0.0})
    before = set(threading.enumerate())
    with pytest.raises(TrainingStopped, match="stopped after 0 rollbacks"):
        train(cfg, hooks=nan_params_at(2))
    deadline = time.time() + 10
    while set(threading.enumerate()) - before and time.time() < deadline:
        time.sleep(0.1)
    assert not [t.name for t in set(threading.enumerate()) - before]  # no saver thread outlives the failed run
    assert [e["kind"] for e in audit.show(tmp_path / "smoke")][-1] == "run_end"


@pytest.mark.parametrize("init", ["random", "path"])
def test_other_students(tiny_teacher, tmp_path, init):
    overrides = {"student.init": init, "train.steps": 2, "train.sample_every": 0, "policy.lmbda": 0.0}
    if init == "path":  # an existing smaller model with the teacher's tokenizer
        overrides["student.path"] = str(make_hf_model("llama", tmp_path / "small", seed=5, num_hidden_layers=1))
    results = train(tiny_config(tiny_teacher, tmp_path / "run", **overrides))
    assert results["steps"] == 2 and np.isfinite(results["loss"]["last"])
    assert results["student"]["layers"] == (1 if init == "path" else 2)
    assert results["student"]["params"] < results["teacher"]["params"]


@pytest.mark.parametrize("mode", ["pmap", "mesh"])
def test_parallel_modes_match_single_device(tiny_teacher, tmp_path, mode):
    overrides = {"policy.lmbda": 0.0, "train.steps": 3, "train.batch_size": 8, "train.sample_every": 0}
    single = train(tiny_config(tiny_teacher, tmp_path / "single", **overrides))
    multi = train(tiny_config(tiny_teacher, tmp_path / mode, **overrides, **{"parallel.mode": mode,
                                                                           "parallel.shard_teacher": True}))
    a, _ = _final_params(tmp_path / "single/smoke")
    b, _ = _final_params(tmp_path / mode / "smoke")
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5), a["params"], b["params"])
    assert multi["steps"] == single["steps"] == 3


@pytest.mark.parametrize("key,value,message", [
    ("loss.jsd_beta", 1.5, "jsd_beta must be in \\[0, 1\\]"),
    ("loss.ce_weight", -0.1, "ce_weight must be >= 0"),
    ("policy.lmbda", 2.0, "lmbda must be in \\[0, 1\\]"),
    ("policy.top_p", 0.0, "top_p"),
    ("teacher.path", "/nonexistent/teacher.gguf", "teacher.path '/nonexistent/teacher.gguf' does not exist"),
    ("parallel.mode", "fsdp", "parallel.mode must be one of"),
    ("student.init", "magic", "student.init must be one of"),
    ("train.batch_size", 0, "train.batch_size must be >= 1"),
    ("data.heldout_fraction", 1.0, "heldout_fraction must be in \\[0, 1\\)"),
    ("optim.schedule", "step", "schedule must be one of"),
    ("optim.min_lr", 1.0, "min_lr"),
    ("stability.lr_backoff", 0.0, "lr_backoff"),
    ("teacher.dtype", "int8", "teacher.dtype must be one of"),
])
def test_config_errors(key, value, message):
    c = smoke.get_config()
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = getattr(node, p)
    setattr(node, leaf, value)
    with pytest.raises(ConfigError, match=message):
        check_config(c)


def test_unknown_config_key():
    c = smoke.get_config()
    c.loss.tempreature = 2.0
    with pytest.raises(ConfigError, match="unknown key 'loss.tempreature' \\(did you mean 'loss.temperature'\\?\\)"):
        check_config(c)


def test_cli_config_error_is_clear_and_fast(tiny_teacher, tmp_path):
    start = time.time()
    res = _cli(tiny_teacher, tmp_path, "--config.policy.lmbda=1.5", timeout=300)
    assert res.returncode != 0 and res.stderr.strip().splitlines() == [
        "error: config: policy.lmbda must be in [0, 1], got 1.5"]  # one line, no traceback
    res = _cli(tiny_teacher, tmp_path, "--config.loss.no_such_key=1", timeout=300)
    assert res.returncode != 0 and "no_such_key" in res.stderr
    res = _cli(tiny_teacher, tmp_path, "--config.parallel.mode=mesh", "--config.train.batch_size=4", timeout=300)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: config: train.batch_size must be a multiple of the 8 devices parallel.mode=mesh splits it over, "
        "got 4 (use 8 or parallel.mode=single)"]
    res = _cli(tiny_teacher, tmp_path, "--config.parallel.mode=mesh", "--config.train.batch_size=4", "--debug",
               timeout=300)
    assert res.returncode != 0 and "Traceback" in res.stderr  # --debug shows where it came from
    assert time.time() - start < 200
    assert not (tmp_path / "smoke").exists()  # nothing was written


@pytest.mark.parametrize("mode", ["pmap", "mesh"])
def test_parallel_modes_check_batch_divisibility(mode):
    c = smoke.get_config()
    c.parallel.mode, c.train.batch_size = mode, 12
    with pytest.raises(ConfigError, match=f"train.batch_size must be a multiple of the 8 devices parallel.mode={mode}"
                                          " splits it over, got 12 \\(use 8"):
        check_config(c)
    c.train.batch_size = 16
    check_config(c)
    c.parallel.mode, c.train.batch_size = "single", 12
    check_config(c)


def test_bad_teacher_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "teacher.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    res = _cli(bad, tmp_path / "out", timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]


@pytest.mark.slow  # ~2 min on 2 cores: CI runs it with the slow tests
def test_default_job_runs_on_smollm2(tmp_path):
    """The default job (configs/gkd.py: SmolLM2 GGUF teacher, 8-layer student, builtin prompts, on-policy GKD)
    with short overrides."""
    cmd = [sys.executable, str(ROOT / "scripts/train.py"), "--output", str(tmp_path), "--steps", "2",
           "--samples", "24", "--config.policy.max_new_tokens=8", "--config.train.batch_size=2",
           "--config.data.max_prompt_len=64", "--config.data.prompt_buckets=(64,)", "--config.train.eval_every=2",
           "--config.train.eval_batches=1", "--config.train.sample_every=0", "--config.data.heldout_fraction=0.2",
           "--config.eval.rows=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "gkd-smollm2"
    r = json.loads((run / "distillation_results.json").read_text())
    assert r["teacher"]["layers"] == 30 and r["student"]["layers"] == 8 and r["steps"] == 2
    assert r["config"]["policy"]["lmbda"] == 0.5 and r["config"]["loss"]["jsd_beta"] == 0.5
    assert np.isfinite(r["loss"]["last"]) and r["compression_ratio"] > 1.5
    for name in ("README.md", "audit.sqlite", "orbax/final", "student/so8t_config.json", "tensorboard",
                 "export/hf/model.safetensors", "export/student-Q8_0.gguf", "evaluation/metrics.json"):
        assert (run / name).exists(), name
    assert audit.verify(run).ok
