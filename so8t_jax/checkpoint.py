"""Orbax checkpoints of the full training state: periodic (keep K), best (by an eval metric) and final.

Layout under a run's orbax folder:   orbax/steps/<step>/{state,meta}   orbax/best/<step>/...   orbax/final/<step>/...
`state` is any pytree (TrainState, PRNG keys, numpy scalars) saved with StandardSave; `meta` is a JSON dict
(data position, rng seed, rollback counts, ...). A restore against a target gives the target's structure,
dtypes, shapes and shardings back bitwise; typed PRNG keys are stored as their key_data and re-wrapped.

Atomicity of a save is Orbax's: a step is written to `<step>.orbax-checkpoint-tmp` and renamed when complete,
so a killed save leaves only a tmp folder, which Orbax never lists (and replaces when it saves that step
again; `discard_uncommitted` removes the rest once a run owns the folder). Deleting is atomic here: a step
is renamed out of Orbax's sight before its files go, so a killed delete never leaves a half-deleted step
that would be listed (and restored) as complete. That is why pruning to the newest `keep` is done here,
after each save has committed, and not by Orbax's max_to_keep (which deletes in place).
Saves are asynchronous (arrays are copied to host before `save` returns, so the caller may donate them);
`wait()`, `close()` and every restore first wait for pending saves to finish. A save that fails (disk full,
file too large, ...) raises CheckpointError naming the folder, the step, the OS error and the last complete
step, from `save` or from the `wait` / `close` / next `save` that finds the background write failed.
State saved under pmap must be un-replicated first (x[0]); NamedSharding (mesh) states save as they are.
"""
from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from so8t_jax import distributed


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _encode(x):
    """A leaf Orbax can store: typed keys -> key_data, numpy scalars -> 0-d arrays."""
    if _is_key(x):
        return jax.random.key_data(x)
    if isinstance(x, (np.generic, bool)):
        return np.asarray(x)
    return x


def _abstract(x):
    """The restore target of one leaf: shape, dtype and sharding (concrete or already abstract)."""
    if _is_key(x):
        return _abstract(jax.random.key_data(x) if isinstance(x, jax.Array) else jax.eval_shape(jax.random.key_data, x))
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    if isinstance(x, (np.ndarray, np.generic, bool)):
        return np.zeros(np.shape(x), np.asarray(x).dtype)
    return x  # python int / float: Orbax restores the scalar


def _decode(target, restored):
    if _is_key(target):  # an abstract key has no public impl accessor; its dtype carries it
        impl = jax.random.key_impl(target) if isinstance(target, jax.Array) else target.dtype._impl
        return jax.random.wrap_key_data(restored, impl=impl)
    if isinstance(target, np.generic):
        return type(target)(restored)
    if isinstance(target, (bool, int, float)):
        return type(target)(np.asarray(restored).item())
    return restored


def _jsonable(meta: dict) -> dict:
    """numpy / jax scalars -> python, so JsonSave accepts them (and the JSON stays readable)."""
    def conv(v):
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(v).tolist()
        return v
    return json.loads(json.dumps(conv(dict(meta))))


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's marker of an uncommitted folder (atomicity_types.TMP_DIR_SUFFIX)


class CheckpointError(RuntimeError):
    """Training state or a model could not be written (disk full, file too large, permissions, ...). The
    message is one line: the folder, what was being saved, the OS error (errno name and text), what is kept
    (the last complete step there), and what Orbax / tensorstore said (the file it was writing). A rerun
    resumes from the last complete checkpoint."""

    def __init__(self, directory, cause: BaseException, step: int | None = None, kept: str | None = None):
        self.directory, self.step, self.errno = str(directory), step, _errno_of(cause)
        what = f"{errno.errorcode.get(self.errno, self.errno)}: {os.strerror(self.errno)}" if self.errno else \
            type(cause).__name__
        saving = "saving" + (f" step {step}" if step is not None else "")
        super().__init__(f"{directory}: {saving} failed ({what}); " + (f"kept: {kept}; " if kept else "")
                         + " ".join(str(cause).split()))


def _errno_of(e: BaseException | None) -> int | None:
    """The OS error number of an exception or its causes: OSError.errno, or tensorstore's os_error_code."""
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = re.search(r"os_error_code='?(\d+)", str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def discard_uncommitted(directory: str | os.PathLike) -> list[str]:
    """Remove the tmp folders that killed saves or deletes left in an Orbax folder (never listed as steps,
    but they hold disk space). Only the process that owns the folder (the run) may call this: it would also
    remove a save in progress. Returns the names removed."""
    directory = pathlib.Path(directory)
    gone = sorted(p.name for p in directory.iterdir() if TMP_SUFFIX in p.name) if directory.is_dir() else []
    for name in gone:
        shutil.rmtree(directory / name, ignore_errors=True)
    return gone


class Store:
    """One Orbax CheckpointManager folder: numbered steps, the newest `keep` kept."""

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3):
        if keep is not None and keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        self._pending: int | None = None  # the step an unfinished background save writes
        # no max_to_keep: Orbax would delete old steps in place; _prune does it atomically. With several
        # processes, saves of two folders in flight at once (a snapshot and a checkpoint of one step) wait at
        # Orbax barriers named by the step: the folder in their names keeps them apart
        self._mngr = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            create=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=self.directory)))

    def save(self, step: int, state, meta: dict | None = None) -> bool:
        """Write `state` (+ JSON `meta`) as `step`. A step at or before an existing one replaces it and every
        later step: those belong to a trajectory a rollback abandoned (Orbax would otherwise skip the save)."""
        step = int(step)
        for old in self.all_steps():  # waits for the previous save
            if old >= step:
                self._remove(old)
        tree = jax.tree_util.tree_map(_encode, state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(_jsonable(meta or {})))
        self._pending = step
        try:
            return bool(self._mngr.save(step, args=args, force=True))
        except Exception as e:  # noqa: BLE001 - any failure to write becomes one clear error
            self._pending = None
            raise CheckpointError(self.directory, e, step, self._kept()) from e

    def all_steps(self) -> list[int]:
        """The committed steps, newest `keep` (after waiting for a background save)."""
        self.wait()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        self.wait()
        return self._mngr.latest_step()

    def restore(self, step: int | None = None, target=None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: the latest). With `target` (a concrete or jax.eval_shape tree of
        the saved structure) the result has its pytree type, dtypes, shapes and shardings; without, nested
        dicts of arrays as Orbax stored them."""
        self.wait()
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if target is None:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
            return out["state"], dict(out["meta"])
        abstract = jax.tree_util.tree_map(_abstract, target)
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return jax.tree_util.tree_map(_decode, target, out["state"]), dict(out["meta"])

    def meta(self, step: int | None = None) -> dict | None:
        """The JSON meta of `step` (default latest) without reading any array; None when there is no step."""
        self.wait()
        step = self.latest_step() if step is None else int(step)
        if step is None:
            return None
        return dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def wait(self) -> None:
        """Wait for the background save; CheckpointError if it failed. Then prune to the newest `keep`."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the background write failed: one clear error
            step, self._pending = self._pending, None
            self._mngr.reload()  # the failed step is not in the folder
            raise CheckpointError(self.directory, e, step, self._kept()) from e
        self._pending = None
        if self.keep is not None:
            for old in sorted(self._mngr.all_steps())[:-self.keep]:
                self._remove(old)

    def _kept(self) -> str:
        last = self._mngr.latest_step()
        return f"step {last} (the last complete one there)" if last is not None else "no step"

    def discard_after(self, step: int) -> list[int]:
        """Delete the steps after `step` (atomically, newest first); returns them."""
        self.wait()
        later = [s for s in self.all_steps() if s > int(step)]
        for s in reversed(later):
            self._remove(s)
        return later

    def discard_uncommitted(self) -> list[str]:
        """Remove tmp folders of killed saves (see the module function); the caller must own the folder. With
        several processes the writer removes them and the others wait for it."""
        self.wait()
        gone = discard_uncommitted(self.directory) if distributed.is_writer() else []
        distributed.barrier(f"discard {self.directory}")
        return gone

    def _remove(self, step: int) -> None:
        """Delete a committed step: renamed to a tmp name first (one atomic rename: Orbax stops listing it),
        then its files removed. Killed in between, the tmp folder is what remains. With several processes
        the writer deletes and the others wait for it (the folder is shared, as Orbax requires)."""
        path = pathlib.Path(self.directory) / str(step)
        trash = path.with_name(f"{step}{TMP_SUFFIX}-deleted")
        if path.exists() and distributed.is_writer():
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(path, trash)
            shutil.rmtree(trash)
        distributed.barrier(f"remove {path}")
        self._mngr.reload()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mngr.close()


class Checkpointer:
    """Periodic (`keep` newest), best (one, by a metric) and final checkpoints under `directory` (RUN/orbax)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.directory = os.path.abspath(os.fspath(directory))
        self.steps = Store(os.path.join(self.directory, "steps"), keep)
        self._best: Store | None = None
        self._final: Store | None = None

    def _store(self, kind: str) -> Store:
        if kind == "steps":
            return self.steps
        if kind not in ("best", "final"):
            raise ValueError(f"checkpoint kind must be 'steps', 'best' or 'final', got {kind!r}")
        if getattr(self, f"_{kind}") is None:  # created on first use, so a run without evals has no best/
            setattr(self, f"_{kind}", Store(os.path.join(self.directory, kind), keep=1))
        return getattr(self, f"_{kind}")

    def save(self, step: int, state, meta: dict | None = None, force: bool = False) -> bool:
        """Periodic save. `force` is accepted for symmetry with Orbax; every call writes (the trainer decides
        the period), replacing steps >= `step` left by an abandoned trajectory."""
        del force
        return self.steps.save(step, state, meta)

    def save_best(self, step: int, state, meta: dict | None, metric: float, mode: str = "min") -> bool:
        """Keep `state` in best/ if `metric` beats the stored best (strictly); returns whether it was saved.
        The metric travels in the meta ("best_metric", "best_mode"), so a resumed run compares against it."""
        if mode not in ("min", "max"):
            raise ValueError(f"save_best mode must be 'min' or 'max', got {mode!r}")
        metric = float(metric)
        if not math.isfinite(metric):
            return False
        current = self.best_metric()
        if current is not None and not (metric < current if mode == "min" else metric > current):
            return False
        store = self._store("best")
        store.save(step, state, {**(meta or {}), "best_metric": metric, "best_mode": mode})
        store.wait()  # a single slot: never leave the best half-replaced behind an async save
        return True

    def best_metric(self) -> float | None:
        meta = self._store("best").meta()
        return None if meta is None else float(meta["best_metric"])

    def save_final(self, state, meta: dict | None = None, step: int | None = None) -> None:
        """The end-of-run state in final/ (step defaults to state.step, else 0); written synchronously."""
        if step is None:
            step = int(np.asarray(state.step)) if hasattr(state, "step") else 0
        store = self._store("final")
        store.save(step, state, meta)
        store.wait()

    def latest_step(self, kind: str = "steps") -> int | None:
        return self._store(kind).latest_step()

    def all_steps(self, kind: str = "steps") -> list[int]:
        return self._store(kind).all_steps()

    def restore(self, step: int | None = None, target=None, kind: str = "steps") -> tuple[Any, dict]:
        """(state, meta) from steps/ (default), best/ or final/; see `Store.restore`."""
        return self._store(kind).restore(step, target)

    def discard_uncommitted(self) -> list[str]:
        """Remove the tmp folders killed saves left in steps/, best/ and final/ ("kind/name" of each); only the
        run that owns the folder may call this (see `discard_uncommitted`)."""
        self.wait()
        gone = [f"{kind}/{name}" for kind in ("steps", "best", "final")
                for name in discard_uncommitted(os.path.join(self.directory, kind))] if distributed.is_writer() else []
        distributed.barrier(f"discard {self.directory}")
        return gone

    def wait(self) -> None:
        for store in (self.steps, self._best, self._final):
            if store is not None:
                store.wait()

    def close(self) -> None:
        """Close every store (each waits for its pending save); the first CheckpointError is raised after."""
        error = None
        for store in (self.steps, self._best, self._final):
            if store is not None:
                try:
                    store.close()
                except CheckpointError as e:
                    error = error or e
        if error is not None:
            raise error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["CheckpointError", "Checkpointer", "Store", "discard_uncommitted"]
