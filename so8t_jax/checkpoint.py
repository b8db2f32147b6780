"""Orbax checkpoints of the full training state: periodic (keep K), best (by an eval metric) and final.

Layout under a run's orbax folder:   orbax/steps/<step>/{state,meta}   orbax/best/<step>/...   orbax/final/<step>/...
`state` is any pytree (TrainState, PRNG keys, numpy scalars) saved with StandardSave; `meta` is a JSON dict
(data position, rng seed, rollback counts, ...). A restore against a target gives the target's structure,
dtypes, shapes and shardings back bitwise; typed PRNG keys are stored as their key_data and re-wrapped.

Atomicity is Orbax's: a step is written to `<step>.orbax-checkpoint-tmp-<time>` and renamed when complete,
so a killed save leaves only a tmp folder, which Orbax never lists; nothing here re-implements that.
Saves are asynchronous (arrays are copied to host before `save` returns, so the caller may donate them);
`wait()`, `close()` and every restore first wait for pending saves to finish.
State saved under pmap must be un-replicated first (x[0]); NamedSharding (mesh) states save as they are.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


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


class Store:
    """One Orbax CheckpointManager folder: numbered steps, the newest `keep` kept."""

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3):
        if keep is not None and keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self._mngr = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def save(self, step: int, state, meta: dict | None = None) -> bool:
        """Write `state` (+ JSON `meta`) as `step`. A step at or before an existing one replaces it and every
        later step: those belong to a trajectory a rollback abandoned (Orbax would otherwise skip the save)."""
        step = int(step)
        self._mngr.wait_until_finished()
        for old in sorted(self._mngr.all_steps()):
            if old >= step:
                self._mngr.delete(old)
        tree = jax.tree_util.tree_map(_encode, state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(_jsonable(meta or {})))
        return bool(self._mngr.save(step, args=args, force=True))

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
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
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
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

    def wait(self) -> None:
        for store in (self.steps, self._best, self._final):
            if store is not None:
                store.wait()

    def close(self) -> None:
        for store in (self.steps, self._best, self._final):
            if store is not None:
                store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["Checkpointer", "Store"]
