"""Kill / fault-injection driver for tests/test_crash.py and `scripts/bench.py crash`: scripts/train.py's command
line run with faults injected by wrapping library and product functions from outside (the product has no test
hooks), the checks a crashed run's folder must pass, and the random sweep.

    python tests/crash_driver.py run [--kill EVENT@N ...] [--kill-after S] [--fsize EVENT@N:BYTES] [--nan POS] \
        -- TRAIN_ARGS ...
    python tests/crash_driver.py sweep [--seeds 3] [--kills 6] [--out DIR]     # JSON lines, the last a summary

--kill EVENT@N      SIGKILL the run at the Nth occurrence of EVENT in its process (EVENTS below)
--kill-after S      SIGKILL after S seconds (a random moment: the caller draws S)
--fsize EVENT@N:B   at the Nth EVENT, RLIMIT_FSIZE = B bytes with SIGXFSZ ignored: from then on every write past
                    B bytes in any file fails with EFBIG, as on a disk that fills up
--nan POS           every student weight NaN before the step at data position POS: a deterministic fault that
                    the stability monitor rolls back (given to every run of a test, the reference included)

With $CRASH_EVENTS set, each event is appended to that file as a line "EVENT N" ("kill EVENT N" / "fsize EVENT N"
when acting on it). Runs are forked from a server process (`Zygote`) that has imported everything once but not
started JAX: each run is a fresh process as far as the run can tell, without 4 s of imports each.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
EVENTS = {
    "step": "a training step was dispatched (its computation in flight)",
    "rollback": "the stability monitor rolled the run back (its checkpoint of the restored state in flight)",
    "save:KIND": "checkpoint.Store.save called for KIND = steps | snapshots | best | final (before writing)",
    "item:KIND": "Orbax committed one item (state or meta) inside a still uncommitted KIND step folder",
    "write:KIND": "every file of a KIND step folder written, before Orbax's commit rename (KIND also: student)",
    "commit:KIND": "right after that rename (before the trainer records it)",
    "audit": "an audit row inserted, its transaction not committed (also audit:ROW_KIND: audit:checkpoint, ...)",
    "export:hf": "the HF export's safetensors written in its temporary folder",
    "export:gguf": "the GGUF export written under its temporary name, before the rename",
    "results": "distillation_results.json's temporary file written, before the rename",
}
TMP = ".orbax-checkpoint-tmp"
NAN_POSITION = 3  # with checkpoint_every = snapshot_every = 2: the rollback goes back over a checkpoint


# ------------------------------------------------------------------------------------------------ one run


class Injector:
    def __init__(self, kills: set, fsize: dict, log_path: str | None):
        self.kills, self.fsize, self.counts = kills, fsize, {}
        self.lock = threading.Lock()
        self.log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log_path else None

    def note(self, line: str) -> None:
        if self.log is not None:
            os.write(self.log, (line + "\n").encode())

    def fire(self, event: str) -> None:
        with self.lock:  # Orbax commits in a background thread
            n = self.counts[event] = self.counts.get(event, 0) + 1
        self.note(f"{event} {n}")
        if (event, n) in self.fsize:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize[event, n], hard))
            self.note(f"fsize {event} {n}")
        if (event, n) in self.kills:
            self.note(f"kill {event} {n}")
            os.kill(os.getpid(), signal.SIGKILL)


def _parse_at(spec: str) -> tuple[str, int]:
    event, _, n = spec.rpartition("@")
    if not event or not n.isdigit():
        raise SystemExit(f"crash_driver: expected EVENT@N, got {spec!r}")
    return event, int(n)


def _orbax_kind(final: pathlib.Path) -> tuple[str, str]:
    """(what, kind) of an Orbax folder being committed: an item inside a step folder, or a step folder."""
    if final.name == "params":  # save_converted's StandardCheckpointer: RUN/student (its temporary folder)
        return "write", "student"
    if TMP in final.parent.name:
        return "item", final.parent.parent.name
    return "write", final.parent.name


def install(inj: Injector, nan_position: int | None) -> None:
    """Wrap the functions whose calls are EVENTS (in this process only)."""
    import sqlite3

    import gguf
    from orbax.checkpoint._src.path import atomicity

    from so8t_jax import checkpoint, trainer
    from so8t_jax.weights import export

    dispatch, observe, setup, store_save = trainer.dispatch, trainer.observe, trainer.setup, checkpoint.Store.save
    finalize, connect, save_file = atomicity.AtomicRenameTemporaryPath.finalize, sqlite3.connect, export.save_file
    gguf_close, replace = gguf.GGUFWriter.close, os.replace

    def dispatch_(run, pos):
        out = dispatch(run, pos)
        inj.fire("step")
        return out

    def observe_(run, pos, metrics, step=None):
        healthy = observe(run, pos, metrics, step)
        if not healthy:
            inj.fire("rollback")
        return healthy

    def setup_(config, hooks=None):
        def before_step(pos, state):
            import jax
            import numpy as np
            if pos != nan_position:
                return state
            return state.replace(params=jax.tree_util.tree_map(lambda x: x * np.nan, state.params))
        return setup(config, hooks if nan_position is None else trainer.Hooks(before_step=before_step))

    def store_save_(self, step, state, meta=None):
        inj.fire(f"save:{os.path.basename(self.directory)}")
        return store_save(self, step, state, meta)

    async def finalize_(self, *args, **kwargs):
        what, kind = _orbax_kind(pathlib.Path(str(self.get_final())))
        inj.fire(f"{what}:{kind}")
        out = await finalize(self, *args, **kwargs)
        if what == "write":
            inj.fire(f"commit:{kind}")
        return out

    class Conn:  # the audit log's connection: sees its INSERT and the COMMIT after it
        def __init__(self, conn):
            self._conn, self._kind = conn, None

        def execute(self, sql, params=()):
            if sql.startswith("INSERT INTO events"):
                self._kind = params[2]
            elif sql == "COMMIT" and self._kind is not None:
                kind, self._kind = self._kind, None
                inj.fire("audit")
                inj.fire(f"audit:{kind}")
            return self._conn.execute(sql, params)

        def __getattr__(self, name):
            return getattr(self._conn, name)

    def save_file_(*args, **kwargs):
        out = save_file(*args, **kwargs)
        inj.fire("export:hf")
        return out

    def gguf_close_(self):
        gguf_close(self)
        inj.fire("export:gguf")

    def replace_(src, dst, *args, **kwargs):
        if os.path.basename(dst) == "distillation_results.json":
            inj.fire("results")
        return replace(src, dst, *args, **kwargs)

    trainer.dispatch, trainer.observe, trainer.setup, checkpoint.Store.save = dispatch_, observe_, setup_, store_save_
    atomicity.AtomicRenameTemporaryPath.finalize = finalize_
    sqlite3.connect = lambda *a, **k: Conn(connect(*a, **k))
    export.save_file, gguf.GGUFWriter.close, os.replace = save_file_, gguf_close_, replace_


def run_main(argv: list[str]) -> int:
    """One run: driver flags, `--`, then scripts/train.py's arguments."""
    if "--" not in argv:
        raise SystemExit("crash_driver: the training arguments follow --")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="crash_driver.py run")
    p.add_argument("--kill", action="append", default=[])
    p.add_argument("--kill-after", type=float)
    p.add_argument("--fsize", action="append", default=[])
    p.add_argument("--nan", type=int)
    a = p.parse_args(argv[:split])
    if a.kill_after is not None:
        timer = threading.Timer(a.kill_after, lambda: os.kill(os.getpid(), signal.SIGKILL))
        timer.daemon = True  # a run that ends first exits without waiting for it
        timer.start()
    fsize = {_parse_at(spec.rpartition(":")[0]): int(spec.rpartition(":")[2]) for spec in a.fsize}
    if fsize:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    install(Injector(set(map(_parse_at, a.kill)), fsize, os.environ.get("CRASH_EVENTS")), a.nan)
    from so8t_jax.cli import run_train
    return run_train(["train.py", *argv[split + 1:]])


# ------------------------------------------------------------------------------------------------ runs


def child_env(cache_dir) -> dict:
    """One CPU device, a persistent compilation cache shared by the runs (each compiles nothing new)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def serve(warm: str | None) -> None:
    """The zygote: import everything once (JAX not started: forking is safe), then fork one run per request
    line {"args", "log", "events", "timeout"} and answer {"rc", "seconds"} (rc -9: killed)."""
    sys.modules.setdefault("torch", None)  # the suite's oracle only; tensorboardX would import it (3 s a run)
    import gguf  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import tensorboardX  # noqa: F401

    import so8t_jax.cli  # noqa: F401
    import so8t_jax.trainer  # noqa: F401
    if warm:  # transformers' lazy imports behind AutoTokenizer
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(warm)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        start = time.perf_counter()
        out.flush()
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ["CRASH_EVENTS"] = req["events"]
                rc = run_main(req["args"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported in the run's log
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        deadline, status = time.monotonic() + req["timeout"], None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(st)
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "timeout"
            else:
                time.sleep(0.01)
        out.write(json.dumps({"rc": status, "seconds": round(time.perf_counter() - start, 2)}) + "\n")
        out.flush()


class Zygote:
    """Client of `serve`: run(driver_args, train_args, tag) -> (rc, seconds, events); logs beside `work`."""

    def __init__(self, work: pathlib.Path, cache_dir: pathlib.Path, warm: str | None = None):
        self.work, self.n = pathlib.Path(work), 0
        self.work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "serve"] + (["--warm", warm] if warm else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=child_env(cache_dir))

    def run(self, driver_args: list[str], train_args: list[str], timeout: float = 300) -> tuple:
        self.n += 1
        log, events = self.work / f"run{self.n}.log", self.work / f"run{self.n}.events"
        req = {"args": [*driver_args, "--", *train_args], "log": str(log), "events": str(events), "timeout": timeout}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the crash driver's server died (exit {self.proc.wait()})")
        res = json.loads(answer)
        lines = events.read_text().splitlines() if events.exists() else []
        return res["rc"], res["seconds"], lines, log

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def train_args(teacher, out, seed: int, *extra: str) -> list[str]:
    """A tiny run: 2-layer student, 6 steps, checkpoints and snapshots every 2 steps, both exports."""
    return ["--config", "smoke.py", "--teacher", str(teacher), "--output", str(out), "--steps", "6",
            "--samples", "24", f"--config.seed={seed}", "--config.student.layers=2",
            "--config.policy.max_new_tokens=8", "--config.policy.lmbda=0.0", "--config.train.checkpoint_every=2",
            "--config.stability.snapshot_every=2", "--config.train.eval_every=0", "--config.train.sample_every=0",
            "--config.eval.at_end=False", "--config.data.heldout_fraction=0", "--config.export.gguf_type=F32",
            *extra]


# ------------------------------------------------------------------------------------------------ checks


def _stores(run_dir: pathlib.Path) -> list[pathlib.Path]:
    return [d for d in (run_dir / "orbax/steps", run_dir / "orbax/best", run_dir / "orbax/final",
                        run_dir / "snapshots") if d.is_dir()]


def half_written(run_dir: pathlib.Path) -> list[str]:
    """What in a (killed) run folder would be read as valid but is not: every Orbax step listed restores, the
    audit chain verifies, results JSON parses, student/ and the exports load. [] when all is well."""
    from so8t_jax import audit, load
    from so8t_jax.checkpoint import Store
    problems = []

    def check(what, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            problems.append(f"{what}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    for d in _stores(run_dir):
        store = Store(d, keep=None)
        for step in store.all_steps():
            check(f"{d.relative_to(run_dir)}/{step}", lambda s=step, st=store: st.restore(s))
        store.close()
    if (run_dir / "audit.sqlite").exists():
        result = audit.verify(run_dir)
        problems += [f"audit: {p}" for p in result.problems]
    for name in ("distillation_results.json", "evaluation/metrics.json"):
        if (run_dir / name).exists():
            check(name, lambda n=name: json.loads((run_dir / n).read_text()))
    for path in [run_dir / "student", run_dir / "export/hf", *sorted(run_dir.glob("export/*.gguf"))]:
        if path.exists():
            check(str(path.relative_to(run_dir)), lambda p=path: load(p))
    return problems


def leftovers(run_dir: pathlib.Path) -> list[str]:
    """Temporary files and folders of killed writes still in a run folder (a finished run has none)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if TMP in p.name or ".tmp" in p.name or p.name.startswith(".") or p.name.endswith("-journal"))


def _leaves(tree) -> list:
    import jax
    import numpy as np
    return [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _same_bytes(what: str, a, b) -> list[str]:
    la, lb = _leaves(a), _leaves(b)
    if [k for k, _ in la] != [k for k, _ in lb]:
        return [f"{what}: different trees"]
    return [f"{what}{k}: differs" for (k, x), (_, y) in zip(la, lb)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes()]


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def differences(ref: pathlib.Path, run: pathlib.Path) -> list[str]:
    """How a finished run differs from the uninterrupted reference: the final training state (parameters,
    optimizer, step, lr scale: every byte), student/'s parameters, the exported files, the results (losses,
    metrics, rollbacks, tokens) and the digest of the final parameters in the audit log's run_end."""
    import orbax.checkpoint as ocp

    from so8t_jax import audit
    from so8t_jax.checkpoint import Checkpointer
    diffs = []
    states = []
    for d in (ref, run):
        ckpt = Checkpointer(d / "orbax")
        states.append(ckpt.restore(kind="final")[0])
        ckpt.close()
    diffs += _same_bytes("final state", *states)
    with ocp.StandardCheckpointer() as c:
        diffs += _same_bytes("student/params", c.restore(ref / "student/params"), c.restore(run / "student/params"))
    for f in sorted(p.relative_to(ref) for p in (ref / "export").rglob("*") if p.is_file()):
        if not (run / f).is_file() or _digest(ref / f) != _digest(run / f):
            diffs.append(f"{f}: differs or missing")
    keys = ("steps", "loss", "final_metrics", "rollbacks", "rollback_events", "tokens", "evaluation", "student")
    r = [json.loads((d / "distillation_results.json").read_text()) for d in (ref, run)]
    for k in keys:
        a, b = r[0].get(k), r[1].get(k)
        if k == "student":
            a, b = {**a, "path": None}, {**b, "path": None}
        if a != b:
            diffs.append(f"results {k}: {a!r} != {b!r}")
    ends = [[e["payload"]["digest"] for e in audit.show(d, kind=audit.RUN_END)][-1:] for d in (ref, run)]
    if ends[0] != ends[1]:
        diffs.append(f"audit run_end digest {ends[1]} != {ends[0]}")
    return diffs


# ------------------------------------------------------------------------------------------------ sweep


def sweep(seeds: int, kills: int, out: pathlib.Path):
    """Per seed: an uninterrupted reference run, then `kills` runs of the same command each killed at a random
    moment (alternately after a random time within the reference's duration and at a random event); when a
    run finishes instead (its moment never came), it is compared with the reference and the next kills start
    over in a new folder; the last folder's run is finished by the command once more. Every killed folder is
    checked by `half_written`, every finished run compared with the reference. Yields one JSON-ready row per
    run, then a summary ("resumes": resume events in the audit logs of the finished runs)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import make_hf_model

    from so8t_jax import audit
    out.mkdir(parents=True, exist_ok=True)
    teacher = make_hf_model("llama", out / "teacher", num_hidden_layers=3)
    zyg = Zygote(out / "logs", out / "jax_cache", warm=str(teacher))
    events = ["step@2", "step@5", "rollback@1", "save:steps@2", "item:steps@1", "write:steps@2", "commit:steps@1",
              "write:snapshots@2", "item:snapshots@2", "audit@3", "audit:checkpoint@1", "audit:rollback@1",
              "item:final@1", "write:final@1", "write:student@1", "commit:student@1", "export:hf@1", "export:gguf@1",
              "audit:export@1", "results@1", "results@2"]
    totals = {"seeds": seeds, "runs": 0, "kills": 0, "resumes": 0, "finished": 0, "bitwise_equal": 0,
              "half_written_problems": 0, "leftovers_after_finish": 0, "errors": 0}
    start = time.perf_counter()
    nan = ["--nan", str(NAN_POSITION)]
    zyg.run(nan, train_args(teacher, out / "warmup", 0))  # compiles: the references' durations are then warm ones
    for seed in range(seeds):
        rng = random.Random(seed)
        ref = out / f"seed{seed}" / "ref"
        rc, ref_seconds, _, log = zyg.run(nan, train_args(teacher, ref, seed))
        if rc != 0:
            raise RuntimeError(f"reference run failed ({rc}): {log.read_text()[-2000:]}")
        chain, pending, i = 0, False, 0  # a chain: one run folder, killed again and again until a run finishes
        while i < kills or pending:
            kill = [] if i >= kills else ["--kill", rng.choice(events)] if i % 2 else \
                ["--kill-after", f"{rng.uniform(0.0, ref_seconds):.2f}"]
            killed = out / f"seed{seed}" / f"chain{chain}"
            rc, seconds, lines, log = zyg.run(kill + nan, train_args(teacher, killed, seed))
            row = {"seed": seed, "chain": chain, "run": i, "kill": " ".join(kill), "rc": rc, "seconds": seconds,
                   "killed_at": next((x[5:] for x in lines if x.startswith("kill ")), None)}
            totals["runs"] += 1
            run_dir, i, pending = killed / "smoke", i + 1, True
            if rc == -signal.SIGKILL:
                totals["kills"] += 1
                row["problems"] = half_written(run_dir) if run_dir.exists() else []
                totals["half_written_problems"] += len(row["problems"])
            elif rc == 0:  # compared with the reference; the next kills start a new chain
                totals["finished"] += 1
                totals["resumes"] += len(audit.show(run_dir, kind="resume"))
                row["differences"] = differences(ref / "smoke", run_dir)
                row["leftovers"] = leftovers(run_dir)
                totals["bitwise_equal"] += not row["differences"]
                totals["leftovers_after_finish"] += len(row["leftovers"])
                chain, pending = chain + 1, False
            else:  # an error or a timeout: reported, and the next kills start over
                totals["errors"] += 1
                row["log"] = log.read_text()[-1500:]
                chain, pending = chain + 1, False
            yield row
    zyg.close()
    yield {"summary": True, **totals, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str]) -> int:
    if argv[:1] == ["run"]:
        sys.modules.setdefault("torch", None)
        return run_main(argv[1:])
    if argv[:1] == ["serve"]:
        serve(argv[2] if argv[1:2] == ["--warm"] else None)
        return 0
    p = argparse.ArgumentParser(prog="crash_driver.py sweep")
    p.add_argument("what", choices=["sweep"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one, removed after)")
    a = p.parse_args(argv)
    out = pathlib.Path(a.out) if a.out else pathlib.Path(__import__("tempfile").mkdtemp(prefix="crash-sweep-"))
    try:
        for row in sweep(a.seeds, a.kills, out):
            print(json.dumps(row), flush=True)
    finally:
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # configs/, fixtures
    sys.exit(main(sys.argv[1:]))
