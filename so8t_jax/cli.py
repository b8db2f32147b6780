"""Flag parsing for scripts/train.py: an ml_collections config file (a path or a bare name in configs/),
`--config.key=value` overrides, and the seed runner's shortcuts."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import sqlite3
import sys

from so8t_jax.config import ConfigError, set_path
from so8t_jax.rows import DataError
from so8t_jax.weights.common import WeightsError

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
SHORTCUTS = {"teacher": "teacher.path", "output": "output_dir", "steps": "train.steps", "epochs": "train.epochs",
             "run_name": "run_name"}


def resolve_config_path(value: str) -> str:
    """`configs/gkd.py`, `gkd.py` or `gkd` (a bare name that is not a file is looked up in configs/)."""
    path = pathlib.Path(value.split(":")[0])
    if path.exists():
        return value
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / (path.name + ".py")):
        if candidate.exists():
            return str(candidate) + value[len(value.split(":")[0]):]
    raise SystemExit(f"--config: no config file {value!r} (looked in {CONFIG_DIR})")


def _fix_config_arg(argv: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            out.append("--config=" + resolve_config_path(a.split("=", 1)[1]))
        elif i > 0 and argv[i - 1] == "--config":
            out.append(resolve_config_path(a))
        else:
            out.append(a)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        out.insert(1, f"--config={CONFIG_DIR / 'gkd.py'}")  # before any --config.key override
    return out


def error_line(e: BaseException, run_dir: pathlib.Path) -> str:
    """The one line `error: ...` printed for a known failure: the message names the key, file or row and the
    problem; an OS error (disk full, file too large, ...) also its errno name, an SQLite error the audit log."""
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.errno in errno.errorcode:
        text = f"{text} ({errno.errorcode[e.errno]})"
    elif isinstance(e, sqlite3.Error):
        text = f"audit log {run_dir / 'audit.sqlite'}: {text}"
    return f"error: {text}"


def _quiet_unraisable(u) -> None:
    """After a failed background save, tensorstore's callbacks find Orbax's event loop closed, once per array:
    noise that would bury the error line. Everything else goes to the default hook."""
    if not (u.exc_type is RuntimeError and "Event loop is closed" in str(u.exc_value)):
        sys.__unraisablehook__(u)


def run_train(argv: list[str]) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("teacher", None, "teacher GGUF file or HF folder (teacher.path)")
    flags.DEFINE_string("output", None, "output folder (output_dir); the run writes <output>/<run_name>/")
    flags.DEFINE_integer("steps", None, "training steps (train.steps)")
    flags.DEFINE_integer("epochs", None, "epochs over the training rows (train.epochs)")
    flags.DEFINE_integer("samples", None, "number of builtin:diverse prompts")
    flags.DEFINE_string("run_name", None, "run folder name (run_name)")
    flags.DEFINE_bool("resume", None, "continue from the run's latest checkpoint (train.resume)")
    flags.DEFINE_bool("debug", False, "show the traceback of a configuration, weights or data error")
    flags.DEFINE_string("coordinator", None, "several processes (hosts): process 0's host:port, or auto (Slurm, "
                        "Open MPI, ...) ($JAX_COORDINATOR_ADDRESS)")
    flags.DEFINE_integer("num_processes", None, "several processes: how many ($JAX_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "several processes: this one's index, 0 writes ($JAX_PROCESS_ID)")
    argv = _fix_config_arg(argv)
    # sys_argv: the --config.key overrides are found in the argv given (by default in sys.argv, which differs
    # when run_train is called from Python)
    config_flags.DEFINE_config_file("config", None, "ml_collections config file or name in configs/",
                                    lock_config=True, sys_argv=argv)
    FLAGS = flags.FLAGS

    def main(_):
        import logging as py_logging

        from absl import logging

        from so8t_jax import distributed
        try:  # before any JAX computation
            distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
        except (ValueError, RuntimeError) as e:  # a missing / bad setting, or no coordinator to reach
            if FLAGS.debug:
                raise
            raise SystemExit(f"error: several processes: {' '.join(str(e).split())}") from None
        from so8t_jax.audit import AuditError
        from so8t_jax.checkpoint import CheckpointError
        from so8t_jax.trainer import TrainingStopped, train
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        py_logging.getLogger("absl").setLevel(py_logging.WARNING)
        if not FLAGS.debug:  # a failed background save: Orbax logs each thread's traceback; the error line says it
            py_logging.getLogger("absl").addFilter(
                lambda r: r.levelno < py_logging.ERROR or f"{os.sep}orbax{os.sep}" not in r.pathname)
            sys.unraisablehook = _quiet_unraisable
        config = FLAGS.config
        with config.unlocked():
            for flag, key in SHORTCUTS.items():
                value = getattr(FLAGS, flag)
                if value is not None:
                    set_path(config, key, value)
            if FLAGS.samples is not None:
                config.data.source = f"builtin:diverse:{FLAGS.samples}"
            if FLAGS.resume is not None:
                config.train.resume = FLAGS.resume
        try:
            results = train(config)
        except (ConfigError, WeightsError, DataError, TrainingStopped, AuditError, CheckpointError, OSError,
                sqlite3.Error) as e:
            if FLAGS.debug:
                raise
            # one line, no traceback (a failed save: the last good checkpoint is intact; a rerun resumes from it)
            raise SystemExit(error_line(e, pathlib.Path(config.output_dir) / config.run_name)) from None
        if not distributed.is_writer():
            return
        summary = {k: results[k] for k in ("run", "steps", "compression_ratio", "loss", "wall_time_s",
                                           "tokens_per_s")}
        summary["heldout_loss_final"] = results["evaluation"].get("heldout_loss_final")
        print(json.dumps(summary, indent=2))
        if results["evaluation"].get("table"):
            print(results["evaluation"]["table"])
        print(f"outputs: {pathlib.Path(config.output_dir) / config.run_name}")

    if str(CONFIG_DIR.parent) not in sys.path:
        sys.path.insert(0, str(CONFIG_DIR.parent))
    try:
        app.run(main, argv=argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else (print(e.code, file=sys.stderr) or 2)
    return 0
