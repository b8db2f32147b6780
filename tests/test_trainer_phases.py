"""The loop's named phases one at a time (trainer.setup / one_step / observe / record / periodic / finish), on a
tiny GGUF teacher: what each changes in the run, checked against an independent recomputation."""
import math
import time

import jax
import numpy as np
import pytest
from fixtures import make_hf_model, write_gguf
from test_trainer import tiny_config

from so8t_jax import audit, data
from so8t_jax.checkpoint import Checkpointer
from so8t_jax import trainer as tr


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    return write_gguf(make_hf_model("llama", root / "hf", num_hidden_layers=3), root / "teacher.Q8_0.gguf", "Q8_0")


def _config(teacher, out, **kw):
    return tiny_config(teacher, out, **{"policy.lmbda": 0.0, "train.steps": 3, "train.sample_every": 0,
                                        "train.eval_every": 0, "train.checkpoint_every": 2, **kw})


def test_setup_builds_the_run_and_records_its_start(tiny_teacher, tmp_path):
    run = tr.setup(_config(tiny_teacher, tmp_path))
    assert run.steps == 3 and run.step == 0 and run.host["position"] == 0 and run.resumed_from is None
    assert run.student.config.n_layers == 2 and run.teacher.config.n_layers == 3
    # the student holds the teacher layers student.select (kl) chose: hidden terms pair them so
    kept = run.host["student_layers"]
    assert len(kept) == 2 and run.loss_cfg.layer_map == tuple(enumerate(kept))
    teacher_q = np.asarray(run.teacher.params["layers"]["q"])
    np.testing.assert_array_equal(run.student.params["layers"]["q"], teacher_q[kept])
    assert set(run.state.params) == {"student"}
    assert run.policy.eos_ids and run.policy.pad_id >= 0
    assert [e["kind"] for e in audit.show(run.run_dir)] == ["run_start"]
    assert run.snapshots.latest(target=run.state)[0] == 0  # the healthy step-0 state to roll back to
    run.logger.close()


def test_one_step_runs_the_position_batch(tiny_teacher, tmp_path):
    run = tr.setup(_config(tiny_teacher, tmp_path))
    before = jax.tree_util.tree_map(np.asarray, run.state.params)
    batch = tr.step_batch(run, 0)
    np.testing.assert_array_equal(batch["input_ids"], run.batcher.batch(0)["input_ids"])
    metrics, tokens = tr.one_step(run, 0)
    assert run.step == 1 and tokens == int(batch["attention_mask"].sum())
    labels = batch["labels"]
    assert metrics["num_targets"] == float((labels[:, 1:] != data.IGNORE_INDEX).sum())
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["loss"] > 0
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), run.state.params, before)
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # the update was applied
    run.logger.close()


def test_observe_accepts_a_healthy_step_and_rolls_back_a_nan_one(tiny_teacher, tmp_path):
    run = tr.setup(_config(tiny_teacher, tmp_path))
    assert tr.next_position(run) == 0
    metrics, _ = tr.one_step(run, 0)
    assert tr.observe(run, 0, metrics)
    tr.record(run, metrics, 10)
    assert tr.next_position(run) == 1
    assert [{k: h[k] for k in ("step", "loss")} for h in run.host["history"]] == [{"step": 1, "loss": metrics["loss"]}]
    assert run.host["tokens"] == 10 and abs(run.host["history"][0]["time"] - time.time()) < 60
    tr.one_step(run, 1)
    bad = dict(metrics, loss=float("nan"), grad_norm=float("nan"))
    assert not tr.observe(run, 1, bad)
    # back at the step-0 snapshot, with the lr scale halved and the offending position to be skipped
    assert run.step == 0 and run.host["position"] == 0 and float(run.state.lr_scale) == 0.5
    assert run.host["history"] == [] and run.rollback.should_skip(1)
    assert [tr.next_position(run) for _ in range(2)] == [0, 2]  # the bad batch is skipped from now on
    assert [e["kind"] for e in audit.show(run.run_dir)][-2:] == ["anomaly", "rollback"]
    run.logger.close()


def test_periodic_checkpoints_and_snapshots_when_due(tiny_teacher, tmp_path):
    run = tr.setup(_config(tiny_teacher, tmp_path, **{"stability.snapshot_every": 2, "train.eval_every": 2,
                                                      "data.heldout_fraction": 0.2}))
    for pos in range(2):
        metrics, tokens = tr.one_step(run, pos)
        tr.record(run, metrics, tokens)
        tr.periodic(run)
    assert run.snapshots.latest(target=run.state)[0] == 2
    assert len(run.host["eval"]) == 1 and math.isfinite(run.host["eval"][0]["heldout_loss"])
    assert run.host["eval"][0]["heldout_loss"] == pytest.approx(tr.heldout_loss(run), rel=1e-6)
    # the periodic save is written in the background and audited only once Orbax has committed it
    assert [e["kind"] for e in audit.show(run.run_dir)][-1] == "eval" and run.unlogged_checkpoint["step"] == 2
    tr.close(run)
    assert run.ckpt.latest_step() == 2
    assert [e["kind"] for e in audit.show(run.run_dir)][-2:] == ["eval", "checkpoint"]


def test_async_loop_equals_the_synchronous_phases(tiny_teacher, tmp_path):
    """train() (step N+1 dispatched before step N is read, batches prefetched, saves in the background) ends
    exactly where one-step-at-a-time phases end: same losses, same parameters, same checkpoints."""
    kw = {"train.steps": 5, "train.checkpoint_every": 2, "stability.snapshot_every": 4, "stability.every_n": 3}
    results = tr.train(_config(tiny_teacher, tmp_path / "async", **kw))
    run = tr.setup(_config(tiny_teacher, tmp_path / "sync", **kw))
    while run.step < run.steps:
        pos = tr.next_position(run)
        metrics, tokens = tr.one_step(run, pos)
        assert tr.observe(run, pos, metrics)
        tr.record(run, metrics, tokens)
        tr.periodic(run)
    sync = tr.finish(run)
    assert results["loss"] == sync["loss"]
    assert results["final_metrics"] == sync["final_metrics"]
    ckpts = {}
    for name in ("async", "sync"):
        ck = Checkpointer(tmp_path / name / "smoke/orbax")
        assert ck.all_steps() == [2, 4, 5]
        ckpts[name] = [ck.restore(step)[0] for step in (2, 4, 5)] + [ck.restore(kind="final")[0]]
        ck.close()
    jax.tree_util.tree_map(np.testing.assert_array_equal, ckpts["async"], ckpts["sync"])
    kinds = [e["kind"] for e in audit.show(tmp_path / "async/smoke")]
    assert kinds.count("checkpoint") == 3 and kinds[-1] == "run_end" and audit.verify(tmp_path / "async/smoke").ok


def test_finish_writes_student_and_results(tiny_teacher, tmp_path):
    run = tr.setup(_config(tiny_teacher, tmp_path, **{"train.steps": 1}))
    metrics, tokens = tr.one_step(run, 0)
    tr.record(run, metrics, tokens)
    results = tr.finish(run)
    assert results["steps"] == 1 and results["loss"]["last"] == metrics["loss"]
    assert (run.run_dir / "student/so8t_config.json").exists() and (run.run_dir / "README.md").exists()
    assert [e["kind"] for e in audit.show(run.run_dir)][-1] == "run_end" and audit.verify(run.run_dir).ok


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_tokens_are_the_ones_trained_on(tiny_teacher, tmp_path, lmbda):
    """tokens (tokens/s, results) count the prompt plus the completion each step trained on: the dataset's
    (lmbda 0) or the student's own samples to where they stopped (lmbda 1), not the dataset's lengths."""
    run = tr.setup(_config(tiny_teacher, tmp_path, **{"policy.lmbda": lmbda}))
    batch = tr.step_batch(run, 0)
    metrics, tokens = tr.one_step(run, 0)
    assert tokens == int(batch["prompt_mask"].sum()) + int(metrics["num_targets"])
    if lmbda == 0.0:
        assert tokens == int(batch["attention_mask"].sum())
    run.logger.close()
