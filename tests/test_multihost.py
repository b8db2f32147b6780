"""Several hosts: two processes on localhost (CPU, 4 fake devices each, jax's gloo collectives, started by
scripts/train.py's --coordinator / --num_processes / --process_id or their environment variables) train as one
process with 8 devices does: the same final parameters (1e-5), losses and audit events; one writer (process 0)
of the audit log, TensorBoard, results, student/ and exports. Each run is its own process: jax.distributed
cannot start inside the test session (its 8 devices are already up)."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from crash_driver import NAN_POSITION
from fixtures import make_hf_model

from so8t_jax import audit, data, distributed
from so8t_jax.config import ConfigError
from so8t_jax.runs import check_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import smoke  # noqa: E402

TIMEOUT = 600


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_hf_model("llama", tmp_path_factory.mktemp("multihost") / "teacher", num_hidden_layers=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **extra}


def _train_args(teacher, out, *extra) -> list[str]:
    return ["--config", "smoke.py", "--teacher", str(teacher), "--output", str(out), "--samples", "24",
            "--config.student.layers=2", "--config.policy.max_new_tokens=8", "--config.train.batch_size=8",
            "--config.parallel.mode=mesh", "--config.eval.at_end=False", "--config.export.formats=()", *extra]


def _runs(tmp_path, teacher, extra, nan: bool = False) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """Process 0 (flags) and process 1 (environment variables) of one run, and the same run in one process with
    8 devices, all at once. Returns (two-process run folder, one-process run folder, {name: stdout})."""
    script = [str(ROOT / "tests/crash_driver.py"), "run", "--nan", str(NAN_POSITION), "--"] if nan else \
        [str(ROOT / "scripts/train.py")]
    port, logs, procs = _free_port(), {}, {}
    launch = {"p0": (_train_args(teacher, tmp_path / "two", *extra) + ["--coordinator", f"localhost:{port}",
                                                                        "--num_processes", "2", "--process_id", "0"],
                     _env(4)),
              "p1": (_train_args(teacher, tmp_path / "two", *extra),
                     _env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")),
              "one": (_train_args(teacher, tmp_path / "one", *extra), _env(8))}
    try:
        for name, (args, env) in launch.items():
            logs[name] = open(tmp_path / f"{name}.log", "w+")
            procs[name] = subprocess.Popen([sys.executable, *script, *args], cwd=ROOT, env=env, stdout=logs[name],
                                           stderr=subprocess.STDOUT)
        codes = {name: p.wait(timeout=TIMEOUT) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    out = {}
    for name, f in logs.items():
        f.seek(0)
        out[name] = f.read()
        f.close()
    assert codes == {"p0": 0, "p1": 0, "one": 0}, "\n\n".join(f"{k}: {v[-3000:]}" for k, v in out.items())
    return tmp_path / "two" / "smoke", tmp_path / "one" / "smoke", out


def _final_state(run_dir: pathlib.Path) -> dict:
    """orbax/final's state as numpy (targets from its metadata: a restore needs no mesh of the saving run's)."""
    path = next(p for p in (run_dir / "orbax/final").iterdir() if p.name.isdigit()) / "state"
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.metadata(path).item_metadata.tree
        return ckpt.restore(path, jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), tree))


def _written_by_one(two: pathlib.Path, one: pathlib.Path, logs: dict) -> None:
    """The two-process run folder holds what the one-process run's holds, written once: one audit log (its
    chain verifies, the same events), one TensorBoard file, the same results; process 1 printed no summary."""
    def files(run):  # Orbax's own files (checkpoints, student/params) differ with the number of processes
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and
                      p.relative_to(run).parts[0] not in ("orbax", "snapshots", "tensorboard") and
                      p.relative_to(run).parts[:2] != ("student", "params"))
    assert files(two) == files(one) and "distillation_results.json" in files(two)
    assert len(list((two / "tensorboard").iterdir())) == 1  # each writer names its events file by host and pid
    assert audit.verify(two).ok and audit.verify(one).ok
    kinds = [(e["kind"], e["payload"].get("step")) for e in audit.show(two)]
    assert kinds == [(e["kind"], e["payload"].get("step")) for e in audit.show(one)]
    r2, r1 = (json.loads((run / "distillation_results.json").read_text()) for run in (two, one))
    assert r2["steps"] == r1["steps"]
    for key in ("first", "last", "min"):
        assert r2["loss"][key] == pytest.approx(r1["loss"][key], rel=1e-5, abs=1e-6)
    assert '"steps"' in logs["p0"] and '"steps"' not in logs["p1"]


def _assert_same_params(two: pathlib.Path, one: pathlib.Path) -> None:
    a, b = _final_state(two), _final_state(one)
    assert int(a["step"]) == int(b["step"]) > 0
    leaves = jax.tree_util.tree_leaves_with_path(b["params"])
    assert len(leaves) > 5
    for (path, want), got in zip(leaves, jax.tree_util.tree_leaves(a["params"])):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # ~80 s of two processes plus the reference run: CI runs it with the slow tests
def test_fsdp_over_two_processes_equals_one_process_on_policy(tmp_path, teacher):
    """FSDP over the 8 devices of both processes (each holds half of every weight and moment), every completion
    sampled by the student (lmbda = 1): the parameters after 3 steps equal the one-process run's."""
    two, one, logs = _runs(tmp_path, teacher, [
        "--steps", "3", "--config.parallel.data=1", "--config.parallel.fsdp=8", "--config.policy.lmbda=1.0",
        "--config.train.eval_every=0", "--config.train.sample_every=0", "--config.data.heldout_fraction=0",
        "--config.train.checkpoint_every=2", "--config.stability.snapshot_every=2"])
    _assert_same_params(two, one)
    _written_by_one(two, one, logs)


@pytest.mark.slow
def test_data_parallel_over_two_processes_with_rollback_evaluation_and_export(tmp_path, teacher):
    """Data parallel (student replicated on all 8 devices), on-policy half the time, a NaN fault that the
    stability monitor rolls back (the snapshot restored on both processes), held-out loss, samples, and at the
    end the student, an HF export and the evaluation, written and run by process 0 alone."""
    two, one, logs = _runs(tmp_path, teacher, [
        "--steps", "6", "--config.policy.lmbda=0.5", "--config.train.checkpoint_every=2",
        "--config.stability.snapshot_every=2", "--config.train.eval_every=3", "--config.train.sample_every=3",
        "--config.eval.at_end=True", "--config.eval.rows=4", '--config.export.formats=("hf",)'], nan=True)
    _assert_same_params(two, one)
    _written_by_one(two, one, logs)
    assert [e["kind"] for e in audit.show(two, kind="rollback")] == ["rollback"]
    m2, m1 = (json.loads((run / "evaluation/metrics.json").read_text())["models"] for run in (two, one))
    for name in ("teacher", "before", "after"):
        assert m2[name]["kl"] == pytest.approx(m1[name]["kl"], abs=1e-4) and m2[name]["top1"] == m1[name]["top1"]
    assert (two / "export/hf/model.safetensors").is_file()


def test_settings_from_flags_or_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings(environ={}) is None  # nothing set: one process, no jax.distributed
    assert distributed.settings(environ=env) == {"coordinator": "h0:1234", "num_processes": 4, "process_id": 3}
    assert distributed.settings("h1:99", 2, 0, environ=env) == {"coordinator": "h1:99", "num_processes": 2,
                                                                "process_id": 0}  # a flag wins over its variable
    assert distributed.settings("auto", environ={}) == {"coordinator": None, "num_processes": None,
                                                        "process_id": None}  # jax detects the cluster
    with pytest.raises(ValueError, match=r"need --num_processes \(or \$JAX_NUM_PROCESSES\), --process_id \(or "
                                         r"\$JAX_PROCESS_ID\) as well as the --coordinator given"):
        distributed.settings("h0:1234", environ={})
    with pytest.raises(ValueError, match="must be host:port"):
        distributed.settings("h0", 2, 0, environ={})
    with pytest.raises(ValueError, match=r"--process_id must be in \[0, --num_processes\): got process_id 2 of 2"):
        distributed.settings("h0:1", 2, 2, environ={})
    with pytest.raises(ValueError, match=r"--num_processes \(or \$JAX_NUM_PROCESSES\) must be an integer, got 'x'"):
        distributed.settings(environ={**env, "JAX_NUM_PROCESSES": "x"})
    assert distributed.initialize(environ={}) is False and distributed.is_writer()


def test_one_process_helpers_change_nothing():
    tree = {"a": jax.numpy.arange(3.0), "b": np.ones(2)}
    assert distributed.gathered(tree) is tree and distributed.local_rows(None, (8,)) is None
    np.testing.assert_array_equal(distributed.host(tree["a"]), [0.0, 1.0, 2.0])
    distributed.barrier("nothing to wait for")
    assert distributed.writer(dict, a=1) == {"a": 1}  # the one process writes
    none = distributed.NoWriter()  # what the other processes hold
    assert none.append("run_start", step=1) is None and none.close() is None


def test_several_processes_need_mesh_mode(monkeypatch):
    c = smoke.get_config()
    c.train.batch_size = 8
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for mode in ("single", "pmap"):
        c.parallel.mode = mode
        with pytest.raises(ConfigError, match=f"config: parallel.mode={mode} runs on one process's devices; with 2 "
                                              "processes \\(hosts\\) use parallel.mode=mesh"):
            check_config(c)
    c.parallel.mode = "mesh"
    check_config(c)


def test_a_process_builds_its_rows_of_the_whole_batch():
    """Batcher.batch(step, part): the rows at `part` of the whole batch, padded to the whole batch's bucket
    (one row with a long prompt elsewhere in the batch still sets every share's width)."""
    enc = [data.Encoded(list(range(1, 3 + (20 if i == 5 else i % 4))), [7, 8, 9], -1) for i in range(16)]
    b = data.Batcher(enc, batch_size=8, seed=0, prompt_buckets=(8, 32), completion_len=4, pad_id=0)
    for step in range(3):
        whole = b.batch(step)
        for part in ([0, 1, 2, 3], [4, 5, 6, 7], [1, 6]):
            share = b.batch(step, part)
            assert share.keys() == whole.keys()
            for k in whole:
                np.testing.assert_array_equal(share[k], whole[k][part], err_msg=k)
    assert {b.batch(s)["prompt_ids"].shape[1] for s in range(3)} == {8, 32}  # both buckets occur
