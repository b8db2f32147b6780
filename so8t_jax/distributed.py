"""Several processes (hosts) in one run: jax.distributed set-up from flags or the environment, which process
writes the run's files, host copies of arrays that span processes, and each process's rows of a batch.

Every process runs the same program on the same config: the same seed, data order and steps, every compiled
computation (steps, held-out loss, samples, digests and weight norms) on the global mesh together. Only the
writer (process 0) writes the audit log, TensorBoard, the results, student/ and the exports, and runs the
end-of-run evaluation (on host copies of the student, without collectives); every process takes part in
Orbax's saves and restores, which Orbax requires (each writes its own shards).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

# jax 0.10.2's jax.distributed.initialize reads JAX_COORDINATOR_ADDRESS itself (and detects Slurm, Open MPI,
# Kubernetes and Cloud TPU); the process count and index have no variable of jax's, so these two are ours.
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
FLAGS = {"coordinator": "--coordinator", "num_processes": "--num_processes", "process_id": "--process_id"}


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, environ=None) -> dict | None:
    """The run's (coordinator, num_processes, process_id), each from its flag or else its environment variable
    (ENV); None when none is set (one process). coordinator="auto": jax detects the cluster (Slurm, Open MPI,
    Kubernetes, Cloud TPU) and the rest. ValueError naming the flag and variable of a missing or bad one."""
    environ = os.environ if environ is None else environ
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    got = {k: (v if v is not None else environ.get(ENV[k]) or None) for k, v in given.items()}
    if all(v is None for v in got.values()):
        return None
    if got["coordinator"] == "auto":
        return {k: (None if k == "coordinator" else _int(k, v)) for k, v in got.items()}
    missing = [f"{FLAGS[k]} (or ${ENV[k]})" for k, v in got.items() if v is None]
    if missing:
        raise ValueError(f"several processes need {', '.join(missing)} as well as the "
                         f"{' and '.join(FLAGS[k] for k, v in got.items() if v is not None)} given")
    host, _, port = str(got["coordinator"]).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{FLAGS['coordinator']} (or ${ENV['coordinator']}) must be host:port (process 0's "
                         f"address and a free port), got {got['coordinator']!r}")
    out = {"coordinator": str(got["coordinator"]), **{k: _int(k, got[k]) for k in ("num_processes", "process_id")}}
    if out["num_processes"] < 1 or not 0 <= out["process_id"] < out["num_processes"]:
        raise ValueError(f"{FLAGS['process_id']} must be in [0, {FLAGS['num_processes']}): got process_id "
                         f"{out['process_id']} of {out['num_processes']} processes")
    return out


def _int(key: str, value) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{FLAGS[key]} (or ${ENV[key]}) must be an integer, got {value!r}") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               environ=None) -> bool:
    """jax.distributed.initialize from `settings`; False (nothing done) for a one-process run. Must run before
    any JAX computation. On CPU the processes' collectives are jax's default, gloo over TCP."""
    s = settings(coordinator, num_processes, process_id, environ)
    if s is None:
        return False
    jax.distributed.initialize(coordinator_address=s["coordinator"], num_processes=s["num_processes"],
                               process_id=s["process_id"])
    return True


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0; the only process of a one-process run)."""
    return jax.process_index() == 0


class NoWriter:
    """What a process other than the writer holds in place of a writer of the run's files (the audit log,
    the progress logger): every method does nothing and returns None."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def writer(make, *args, **kwargs):
    """make(*args, **kwargs) on the writer process; a NoWriter on the others."""
    return make(*args, **kwargs) if is_writer() else NoWriter()


def barrier(name: str) -> None:
    """Every process waits here until all arrive (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _spans_processes(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def host(x) -> np.ndarray:
    """A leaf as a numpy array on this host; an array spread over several processes' devices is gathered
    (a collective: every process must call this for the same arrays, in the same order)."""
    if _spans_processes(x):  # jax.device_get refuses an array with shards on another process's devices
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gathered(tree):
    """The tree with every array spread over several processes' devices gathered into a numpy array on
    this host (a collective, as `host`); every other leaf as it is (with one process: the tree itself)."""
    if jax.process_count() == 1:
        return tree
    return jax.tree_util.tree_map(lambda x: host(x) if _spans_processes(x) else x, tree)


def local_rows(sharding, shape: tuple[int, ...], axis: int = 0) -> np.ndarray | None:
    """The positions along `axis` of the rows this process's devices hold of a `shape` array placed with
    `sharding`, in order (what jax.make_array_from_process_local_data expects this process to supply); None
    when one process holds everything."""
    if jax.process_count() == 1:
        return None
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(*index[axis].indices(shape[axis])))
    return np.array(sorted(rows), np.int64)
