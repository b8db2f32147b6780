"""Crash consistency of a run: SIGKILL at chosen moments (inside a step, during an Orbax checkpoint or snapshot
write, during an audit append, right after a rollback, while student/, the results or the exports are written),
then the same command again: the run ends with every byte of its final state, student and exports equal to an
uninterrupted run's, the audit chain verifies, and after every kill nothing half-written reads as valid. A save
that fails (a file grows past RLIMIT_FSIZE: EFBIG, as on a full disk) is one `error:` line, the last good
checkpoint stays, and the rerun resumes from it to the same end.

Runs go through tests/crash_driver.py (faults injected by wrapping functions from outside; runs forked from
a server that imported everything once). Every run has the same NaN fault at one data position (but the
fault-free rerun in test_a_rollback_is_durable), so each rolls back once, the uninterrupted reference
included. The longer random sweep is `scripts/bench.py crash` (figures in docs/BENCHMARKS.md) and
test_random_kill_sweep (slow).
"""
import errno
import json
import os
import signal

import pytest
from crash_driver import (NAN_POSITION, Zygote, differences, half_written, leftovers, run_main, sweep,
                          train_args)
from fixtures import make_hf_model

from so8t_jax import audit
from so8t_jax.checkpoint import TMP_SUFFIX, CheckpointError, Store
from so8t_jax.cli import error_line
from so8t_jax.runs import write_json

NAN = ["--nan", str(NAN_POSITION)]
# Each chain: one killed run per kill point, in this order, on the same run folder (EVENT@N: the Nth EVENT of
# that run's process; crash_driver.EVENTS says what each is). Background saves commit when they commit, so a run
# may start fresh or from one of a few checkpoints (2 before the rollback = 2A, the rollback's own = 2B, 4, 6):
# each kill point below occurs from every start its predecessor can leave.
KILL_CHAINS = {
    0: ("step@3",               # fresh; killed with the step-2 checkpoint (2A) maybe still being written
        "rollback@1",           # fresh or 2A; killed right after the rollback, its checkpoint (2B) in flight
        "write:snapshots@1",    # fresh or 2B; a snapshot fully written, not yet renamed
        "audit:checkpoint@1",   # fresh, 2B or 4; a checkpoint committed, its audit row not
        "export:gguf@1"),       # any; runs to the end, killed in the GGUF export
    1: ("write:steps@1",        # fresh; the step-2 checkpoint fully written, not yet renamed
        "audit:rollback@1",     # fresh; killed inside the rollback's audit append
        "item:steps@2",         # fresh or 2A; a checkpoint's items committed, the step folder not
        "results@1",            # fresh; runs to the end, killed before the results JSON is renamed in
        "write:student@1"),     # 6; killed while student/ is rewritten
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    teacher = make_hf_model("llama", root / "teacher", num_hidden_layers=3)
    zygote = Zygote(root / "logs", root / "jax_cache", warm=str(teacher))
    refs = {}

    def reference(seed):
        """One uninterrupted run per seed, shared by the tests."""
        if seed not in refs:
            rc, _, _, log = zygote.run(NAN, train_args(teacher, root / f"ref{seed}", seed))
            assert rc == 0, log.read_text()[-3000:]
            refs[seed] = root / f"ref{seed}" / "smoke"
        return refs[seed]
    yield teacher, zygote, reference
    zygote.close()


def killed_run(zygote, driver_args, args) -> list[str]:
    """Run with a kill point; assert the process really died there. Returns its events."""
    rc, _, events, log = zygote.run(driver_args, args)
    assert rc == -signal.SIGKILL, f"not killed ({rc}): {log.read_text()[-3000:]}"
    assert events[-1].startswith("kill "), events[-3:]
    return events


@pytest.mark.parametrize("seed", sorted(KILL_CHAINS))
def test_killed_runs_resume_to_the_uninterrupted_result(env, tmp_path, seed):
    teacher, zygote, reference = env
    ref = reference(seed)
    run_dir, args = tmp_path / "smoke", train_args(teacher, tmp_path, seed)
    for kill in KILL_CHAINS[seed]:
        events = killed_run(zygote, ["--kill", kill, *NAN], args)
        event, n = kill.rsplit("@", 1)
        assert events[-1] == f"kill {event} {n}"
        assert half_written(run_dir) == [], f"after a kill at {kill}"
    rc, _, _, log = zygote.run(NAN, args)
    assert rc == 0, log.read_text()[-3000:]
    assert differences(ref, run_dir) == []
    assert leftovers(run_dir) == []  # the temporaries of the killed writes are gone
    assert audit.verify(run_dir).ok
    kinds = [e["kind"] for e in audit.show(run_dir)]
    assert kinds[-1] == audit.RUN_END and kinds.count(audit.RUN_END) == 1
    assert kinds.count("resume") >= 2 and kinds.count(audit.ROLLBACK) >= 2  # the rollback was lived more than once
    results = json.loads((run_dir / "distillation_results.json").read_text())
    assert results["rollbacks"] == 1 and results["resumed_from"] == 6  # the run was killed in finish: resumed there


def test_a_rollback_is_durable(env, tmp_path):
    """A rollback is checkpointed at once (the restored state as its step, with the lr scale halved and the
    bad batch on the skip list). Killed when that checkpoint is committed, then rerun WITHOUT the fault (a
    transient one): the run resumes from it, at step 2, and ends where the reference ends. Without it the
    only checkpoints are periodic ones: one from before the rollback would train on the batch again, at the
    full lr scale."""
    teacher, zygote, reference = env
    run_dir, args = tmp_path / "smoke", train_args(teacher, tmp_path, 0)
    killed_run(zygote, ["--kill", "commit:steps@2", *NAN], args)
    assert [e["kind"] for e in audit.show(run_dir)].count(audit.ROLLBACK) == 1
    rc, _, _, log = zygote.run([], args)
    assert rc == 0, log.read_text()[-3000:]
    assert differences(reference(0), run_dir) == []
    assert audit.show(run_dir, kind="resume")[-1]["payload"]["step"] == 2


@pytest.mark.parametrize("at,limit,folders", [
    # the step-4 snapshot and checkpoint fail in the background: whichever is waited for first reports
    ("save:steps@3", 1 << 18, ("snapshots", "orbax/steps")),
    ("commit:final@1", 1 << 16, ("student",)),   # student/, written at the end
])
def test_a_failed_save_is_one_error_and_the_rerun_resumes(env, tmp_path, at, limit, folders):
    teacher, zygote, reference = env
    run_dir, args = tmp_path / "smoke", train_args(teacher, tmp_path, 0)
    before = {}
    if folders == ("student",):  # a student/ from an earlier run: a failed rewrite must leave it whole
        rc, _, _, log = zygote.run(NAN, args)
        assert rc == 0, log.read_text()[-3000:]
        before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "student").iterdir()}
    rc, _, events, log = zygote.run(["--fsize", f"{at}:{limit}", *NAN], args)
    text = log.read_text()
    assert rc == 2 and f"fsize {at.replace('@', ' ')}" in events, text[-3000:]
    error = text.strip().splitlines()[-1]
    assert any(error.startswith(f"error: {run_dir / f}: saving") for f in folders), error
    assert "(EFBIG: File too large)" in error and error.count("\n") == 0
    assert "Traceback" not in text
    assert half_written(run_dir) == []
    store = Store(run_dir / "orbax/steps", keep=None)
    last_good = 6 if before else 2
    assert store.latest_step() == last_good  # the last good checkpoint, intact
    store.close()
    if before:
        assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "student").iterdir()} == before
    rc, _, _, log = zygote.run(NAN, args)
    assert rc == 0, log.read_text()[-3000:]
    assert differences(reference(0), run_dir) == [] and leftovers(run_dir) == []
    resumes = audit.show(run_dir, kind="resume")
    assert resumes[-1]["payload"]["step"] == last_good


def test_a_killed_delete_is_never_listed(tmp_path):
    """A step is renamed out of Orbax's sight before its files go: what a kill there leaves is a tmp folder,
    not listed, removed by the next run (discard_uncommitted), while a finished delete leaves nothing."""
    import numpy as np
    store = Store(tmp_path, keep=2)
    for step in (1, 2, 3):
        store.save(step, {"w": np.full(3, step, np.float32)}, {"step": step})
    assert store.all_steps() == [2, 3] and sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]
    store.close()
    (tmp_path / "3").rename(tmp_path / f"3{TMP_SUFFIX}-deleted")  # killed between the rename and the rmtree
    (tmp_path / f"3{TMP_SUFFIX}-deleted" / "state").mkdir(exist_ok=True)
    store = Store(tmp_path, keep=2)
    assert store.all_steps() == [2] and store.restore()[1] == {"step": 2}
    assert store.discard_uncommitted() == [f"3{TMP_SUFFIX}-deleted"] and sorted(os.listdir(tmp_path)) == ["2"]
    store.close()


def test_resume_drops_snapshots_newer_than_the_checkpoint(tmp_path):
    """Snapshots after the checkpoint a run resumes from are of steps it recomputes or of a trajectory a rollback
    abandoned: never rolled back to. When none at or before the checkpoint is left, the resumed state is one."""
    import numpy as np

    from so8t_jax.stability import SnapshotKeeper

    def state(step):
        return {"w": np.full(2, step, np.float32)}
    keeper = SnapshotKeeper(tmp_path / "a", keep=3)
    for step in (2, 4, 6):
        keeper.save(step, state(step), {"step": step})
    keeper.resume_at(4, state(4), {"step": 4})
    assert keeper.steps() == [2, 4]
    step, restored, meta = keeper.latest()
    assert step == 4 and meta == {"step": 4} and restored["w"].tolist() == [4.0, 4.0]
    keeper.close()
    keeper = SnapshotKeeper(tmp_path / "b", keep=2)
    for step in (7, 8):
        keeper.save(step, state(step), {"step": step})
    keeper.resume_at(6, state(6), {"step": 6})
    assert keeper.steps() == [6] and keeper.latest()[2] == {"step": 6}
    keeper.close()


def test_a_failed_results_write_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    """write_text (results JSON, model card, metrics): a disk that fills up mid-write (ENOSPC from the flush)
    leaves the previous file whole and no temporary; the OSError names the file; cli prints it on one line.
    A temporary left by a killed writer (its pid dead) goes with the next write."""
    path = tmp_path / "distillation_results.json"
    write_json(path, {"steps": 1})
    stale, live = tmp_path / f".{path.name}.999999999.x.tmp", tmp_path / f".{path.name}.{os.getpid()}.y.tmp"
    for temporary in (stale, live):
        temporary.write_text("{")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        write_json(path, {"steps": 2})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert json.loads(path.read_text()) == {"steps": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name])  # stale gone, live kept
    assert error_line(info.value, tmp_path) == \
        f"error: [Errno 28] No space left on device: '{path}' (ENOSPC)"


def test_checkpoint_error_names_the_os_error():
    cause = ValueError('OUT_OF_RANGE: Error writing "a/0": Failed to write 10 bytes: No space left on device '
                       "[os_error_code='28']")
    e = CheckpointError("/run/orbax/steps", cause, 4, "step 2 (the last complete one there)")
    assert e.errno == errno.ENOSPC
    assert str(e).startswith("/run/orbax/steps: saving step 4 failed (ENOSPC: No space left on device); kept: "
                             "step 2 (the last complete one there); OUT_OF_RANGE: Error writing")


def test_driver_rejects_a_malformed_kill_point():
    with pytest.raises(SystemExit, match="EVENT@N"):
        run_main(["--kill", "step", "--"])


@pytest.mark.slow
def test_random_kill_sweep(tmp_path):
    """Kills at random events and random times, 2 seeds x 6 kills (scripts/bench.py crash runs more)."""
    rows = list(sweep(seeds=2, kills=6, out=tmp_path))
    summary = rows[-1]
    assert summary["kills"] >= 6 and summary["finished"] >= 2
    assert summary["bitwise_equal"] == summary["finished"]
    assert summary["half_written_problems"] == 0 and summary["leftovers_after_finish"] == 0
    assert summary["errors"] == 0, [r for r in rows[:-1] if r.get("log")]
