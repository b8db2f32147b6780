"""Training stability: per-group weight norms, an anomaly monitor, healthy snapshots and a rollback policy.

The numeric part (`group_norms`, `update_ratios`) is pure and jittable: the step computes it when
`Monitor.wants_norms(step)`. Everything else runs on the host on plain floats read from the step metrics.

Trainer loop (sketch):

    monitor = Monitor(cfg, group_norms(state.params)); policy = RollbackPolicy(cfg)
    snapshots = SnapshotKeeper(run_dir / "snapshots", cfg.keep_snapshots)
    snapshots.save(0, state, meta)                               # the initial state is healthy by definition
    ...
    anomalies = monitor.check(step, metrics, norms)               # norms: group_norms(...) or None
    if anomalies:
        decision = policy.on_anomaly(anomalies, step, batch_id=data_pos)
        if decision.action == "stop": raise RuntimeError(decision.message)
        snap_step, state, meta = snapshots.latest(target=state)
        state = state.replace(lr_scale=jnp.asarray(decision.lr_scale, jnp.float32))
        # rewind the data to meta's position; skip batches with policy.should_skip(batch_id)
    elif step % cfg.snapshot_every == 0:
        snapshots.save(step, state, {..., "monitor": monitor.state_dict(), "policy": policy.state_dict()})
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax.checkpoint import Store
from so8t_jax.defaults import DEFAULTS

ANOMALY_KINDS = ("nonfinite_loss", "nonfinite_grad", "loss_spike", "grad_explosion", "norm_collapse",
                 "norm_explosion")


# ------------------------------------------------------------------------------------------ norms (jittable)


def _name(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def group_norms(params) -> dict[str, jax.Array]:
    """float32 L2 norm of every parameter leaf, by its '/'-joined name ("student/" dropped, so "embed",
    "final_norm", "lm_head", "proj"). Leaves under "layers" are stacked on a leading layer axis and get one
    norm PER LAYER: "layers/q" -> [n_layers]; `flatten_norms` spells those "layers/q/3" on the host.
    The SO8T gate's so8t_alpha is left out: it is scheduled, not learned."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = _name(path)
        if parts and parts[0] == "student":
            parts = parts[1:]
        if parts == ["so8t_alpha"]:  # scheduled, not learned: it crosses 0 on purpose
            continue
        x32 = jnp.asarray(x).astype(jnp.float32)
        per_layer = "layers" in parts[:-1] and x32.ndim >= 1
        axes = tuple(range(1 if per_layer else 0, x32.ndim))
        out["/".join(parts) or "params"] = jnp.sqrt(jnp.sum(x32 * x32, axis=axes))
    return out


def update_ratios(params, updates) -> dict[str, jax.Array]:
    """||update|| / ||param|| per group (and per layer), the usual health gauge (~1e-3 for a sane lr)."""
    p, u = group_norms(params), group_norms(updates)
    return {k: u[k] / jnp.maximum(p[k], 1e-12) for k in p}


def flatten_norms(norms) -> dict[str, float]:
    """Host floats: a [n_layers] entry "layers/q" becomes "layers/q/0", "layers/q/1", ...; scalars stay."""
    flat = {}
    for name, value in jax.device_get(dict(norms)).items():
        arr = np.asarray(value, np.float64)
        if arr.ndim == 0:
            flat[name] = float(arr)
        else:
            flat.update({f"{name}/{i}": float(v) for i, v in enumerate(arr.reshape(-1))})
    return flat


# ------------------------------------------------------------------------------------------ config


_D = DEFAULTS.stability


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
    """A factor or threshold of 0 switches its check off."""
    every_n: int = _D.every_n                  # record group norms every N steps (loss and grad norm: every step)
    spike_factor: float = _D.spike_factor      # loss > k x median of the last `window` healthy losses
    window: int = _D.window
    min_history: int = _D.min_history          # no spike / explosion verdicts before this many healthy steps
    max_grad_norm_factor: float = _D.max_grad_norm_factor  # grad norm > factor x its running median
    max_grad_norm: float = _D.max_grad_norm    # absolute grad-norm ceiling
    collapse_eps: float = _D.collapse_eps      # a group's norm < eps x its initial norm
    explode_factor: float = _D.explode_factor  # a group's norm > factor x its initial norm
    snapshot_every: int = _D.snapshot_every
    keep_snapshots: int = _D.keep_snapshots
    lr_backoff: float = _D.lr_backoff          # lr_scale multiplier per rollback
    max_rollbacks: int = _D.max_rollbacks

    def __post_init__(self):
        def need(ok, key, rule):
            if not ok:
                raise ValueError(f"stability.{key} must be {rule}, got {getattr(self, key)!r}")
        for key in ("every_n", "window", "min_history", "snapshot_every", "keep_snapshots"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, key, "an integer >= 1")
        need(self.min_history <= self.window, "min_history", f"<= window ({self.window})")
        for key in ("spike_factor", "max_grad_norm_factor", "explode_factor"):
            need(getattr(self, key) == 0 or getattr(self, key) > 1, key, "0 (off) or > 1")
        need(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0: off)")
        need(0 <= self.collapse_eps < 1, "collapse_eps", "in [0, 1)")
        need(0 < self.lr_backoff <= 1, "lr_backoff", "in (0, 1]")
        need(isinstance(self.max_rollbacks, int) and self.max_rollbacks >= 0, "max_rollbacks", "an integer >= 0")


# ------------------------------------------------------------------------------------------ monitor


@dataclasses.dataclass(frozen=True)
class Anomaly:
    kind: str        # one of ANOMALY_KINDS
    step: int
    detail: str
    value: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _finite(x: float) -> bool:
    return math.isfinite(x)


class Monitor:
    """Judges each step's host metrics ("loss", "grad_norm") and, when given, its group norms.

    Only healthy steps enter the running windows, so an anomalous value never moves the median it is judged
    against. Groups whose initial norm is 0 (zero-initialised biases) have no ratio and are not judged.
    Without `initial_norms`, the first norms passed to `check` become the reference.
    """

    def __init__(self, cfg: StabilityConfig, initial_norms=None):
        self.cfg = cfg
        self.initial: dict[str, float] = flatten_norms(initial_norms) if initial_norms is not None else {}
        self.losses: collections.deque = collections.deque(maxlen=cfg.window)
        self.grad_norms: collections.deque = collections.deque(maxlen=cfg.window)
        self.num_anomalies = 0

    def wants_norms(self, step: int) -> bool:
        return int(step) % self.cfg.every_n == 0

    @property
    def history(self) -> dict[str, list[float]]:
        """The running windows of healthy values (oldest first), for logging."""
        return {"loss": list(self.losses), "grad_norm": list(self.grad_norms)}

    def medians(self) -> dict[str, float]:
        return {k: float(np.median(v)) for k, v in self.history.items() if v}

    def _over_median(self, value: float, history, factor: float) -> float | None:
        """The median of `history` when value > factor x that median (factor 0: off; needs min_history)."""
        if factor and len(history) >= self.cfg.min_history:
            med = float(np.median(history))
            if value > factor * med:
                return med
        return None

    def check(self, step: int, metrics: dict, norms=None) -> list[Anomaly]:
        cfg, step, found = self.cfg, int(step), []
        loss = float(metrics["loss"]) if "loss" in metrics else None
        grad = float(metrics["grad_norm"]) if "grad_norm" in metrics else None
        if loss is not None:
            if not _finite(loss):
                found.append(Anomaly("nonfinite_loss", step, f"loss is {loss}", loss))
            elif (med := self._over_median(loss, self.losses, cfg.spike_factor)) is not None:
                found.append(Anomaly("loss_spike", step, f"loss {loss:.6g} > {cfg.spike_factor:g} x median "
                                     f"{med:.6g} of the last {len(self.losses)} healthy steps", loss))
        if grad is not None:
            if not _finite(grad):
                found.append(Anomaly("nonfinite_grad", step, f"grad norm is {grad}", grad))
            elif cfg.max_grad_norm and grad > cfg.max_grad_norm:
                found.append(Anomaly("grad_explosion", step,
                                     f"grad norm {grad:.6g} > max_grad_norm {cfg.max_grad_norm:g}", grad))
            elif (med := self._over_median(grad, self.grad_norms, cfg.max_grad_norm_factor)) is not None:
                found.append(Anomaly("grad_explosion", step, f"grad norm {grad:.6g} > "
                                     f"{cfg.max_grad_norm_factor:g} x median {med:.6g}", grad))
        if norms is not None:
            found += self._check_norms(step, flatten_norms(norms))
        if found:
            self.num_anomalies += len(found)
        else:
            if loss is not None:
                self.losses.append(loss)
            if grad is not None:
                self.grad_norms.append(grad)
        return found

    def _check_norms(self, step: int, flat: dict[str, float]) -> list[Anomaly]:
        cfg, found = self.cfg, []
        if not self.initial:
            self.initial = dict(flat)
            return found
        for name, value in flat.items():
            ref = self.initial.get(name, 0.0)
            if not ref > 0:
                continue
            ratio = value / ref if _finite(value) else value
            if not _finite(value) or (cfg.explode_factor and value > cfg.explode_factor * ref):
                found.append(Anomaly("norm_explosion", step, f"{name} norm {value:.6g} = {ratio:.3g} x its "
                                     f"initial {ref:.6g} (limit {cfg.explode_factor:g} x)", value))
            elif cfg.collapse_eps and value < cfg.collapse_eps * ref:
                found.append(Anomaly("norm_collapse", step, f"{name} norm {value:.6g} = {ratio:.3g} x its "
                                     f"initial {ref:.6g} (limit {cfg.collapse_eps:g} x)", value))
        return found

    def state_dict(self) -> dict:
        return {"initial_norms": dict(self.initial), "losses": list(self.losses),
                "grad_norms": list(self.grad_norms), "num_anomalies": self.num_anomalies}

    def load_state_dict(self, state: dict) -> None:
        self.initial = {k: float(v) for k, v in state["initial_norms"].items()}
        self.losses = collections.deque(map(float, state["losses"]), maxlen=self.cfg.window)
        self.grad_norms = collections.deque(map(float, state["grad_norms"]), maxlen=self.cfg.window)
        self.num_anomalies = int(state["num_anomalies"])


# ------------------------------------------------------------------------------------------ snapshots


class SnapshotKeeper:
    """The last `keep` HEALTHY states in RUN/snapshots (Orbax, same format as checkpoints). The trainer
    calls `save` only on states the monitor passed, so `latest` is always a state to roll back to."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.store = Store(directory, keep)

    def save(self, step: int, state, meta: dict | None = None) -> bool:
        return self.store.save(step, state, meta)

    def steps(self) -> list[int]:
        return self.store.all_steps()

    def latest(self, target=None) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest snapshot (restored like `target`), or None when there is none."""
        step = self.store.latest_step()
        if step is None:
            return None
        state, meta = self.store.restore(step, target)
        return step, state, meta

    def resume_at(self, step: int, state, meta: dict) -> None:
        """A run resumed from its checkpoint of `step` (state and meta as restored): snapshots after `step` go.
        They belong to steps the run recomputes (bitwise the same) or to a trajectory a rollback abandoned,
        never a state to roll back to from `step`. When no snapshot at or before `step` is left
        (keep_snapshots pruned them), the resumed state, which was healthy when checkpointed, becomes one."""
        self.store.discard_after(step)
        if not self.steps():
            self.save(step, state, meta)

    def discard_uncommitted(self) -> list[str]:
        """Remove tmp folders of killed snapshot saves (only the run owning the folder may)."""
        return self.store.discard_uncommitted()

    def wait(self) -> None:
        self.store.wait()

    def close(self) -> None:
        self.store.close()


# ------------------------------------------------------------------------------------------ rollback policy


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str                  # "rollback" | "stop"
    lr_scale_factor: float       # multiply the current lr_scale by this (1.0 on stop)
    skip_batch: bool = True
    message: str = ""
    lr_scale: float = 1.0        # the cumulative lr_scale to set on the restored state (backoff ** rollbacks)


class RollbackPolicy:
    """Rollback on every anomaly until `max_rollbacks` have been spent, then stop."""

    def __init__(self, cfg: StabilityConfig):
        self.cfg = cfg
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.skipped: list = []      # batch ids to skip when the data is replayed (JSON-able)
        self.events: list[dict] = []

    def should_skip(self, batch_id) -> bool:
        return batch_id in self.skipped

    def on_anomaly(self, anomalies: list[Anomaly], step: int, batch_id=None) -> Decision:
        if not anomalies:
            raise ValueError("on_anomaly needs at least one anomaly")
        step = int(step)
        what = "; ".join(f"{a.kind} ({a.detail})" for a in anomalies)
        kinds = [a.kind for a in anomalies]
        if self.rollbacks >= self.cfg.max_rollbacks:
            self.events.append({"step": step, "action": "stop", "kinds": kinds})
            return Decision("stop", 1.0, False, (
                f"stopped after {self.rollbacks} rollbacks: last anomaly {what} at step {step}; lower the learning "
                f"rate (optim.learning_rate) or the clipping threshold (optim.max_grad_norm), check the data "
                f"around this step, or allow more with stability.max_rollbacks"), self.lr_scale)
        self.rollbacks += 1
        self.lr_scale *= self.cfg.lr_backoff
        if batch_id is not None:
            self.skipped.append(batch_id)
        self.events.append({"step": step, "action": "rollback", "kinds": kinds, "batch_id": batch_id})
        return Decision("rollback", self.cfg.lr_backoff, True, (
            f"rollback {self.rollbacks}/{self.cfg.max_rollbacks} at step {step}: {what}; restoring the last healthy "
            f"snapshot, lr scale x{self.cfg.lr_backoff:g} (now {self.lr_scale:g}), skipping the batch"),
            self.lr_scale)

    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "skipped": list(self.skipped),
                "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks = int(state["rollbacks"])
        self.lr_scale = float(state["lr_scale"])
        self.skipped = list(state["skipped"])
        self.events = [dict(e) for e in state["events"]]


__all__ = ["ANOMALY_KINDS", "Anomaly", "Decision", "Monitor", "RollbackPolicy", "SnapshotKeeper", "StabilityConfig",
           "flatten_norms", "group_norms", "update_ratios"]
