"""Where the step runs: one device (jit), jax.pmap over the local devices, or jit over a device Mesh.

`Placement` hides the difference from the loop: it builds the compiled step for `parallel.mode`, puts the
state, teacher and batches on their devices, and hands back global arrays for checkpoints. Every placement
goes through the logical axis table of sharding.py: in mesh mode the student, its Adam moments and the teacher
are sharded FSDP / tensor style and the batch split over data x fsdp; pmap replicates everything but the batch.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from so8t_jax import distributed, sharding, so8t
from so8t_jax.completions import PolicyConfig
from so8t_jax.sharding import ParallelConfig
from so8t_jax.train_step import make_step


def jit_step(step):
    """Single device (or whatever jit's default placement is): donated state."""
    return jax.jit(step, donate_argnums=(0,))


def make_mesh(devices=None, axis_name="data") -> Mesh:
    """A 1-D mesh (pmap's, or a data-parallel mesh): every device on `axis_name`."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(-1), (axis_name,))


def structure(tree) -> tuple:
    """A tree's structure and leaf shapes: what its shardings depend on."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(np.shape(x) for x in leaves)


def _put(tree, shardings):
    """jax.device_put(tree, shardings), skipped when every leaf is already there (a 40x cheaper check than
    device_put's own no-op: it runs every step in mesh mode). With several processes (hosts) every process
    holds the same host value (the same seed, the same data position) and builds only the shards of its own
    devices from it: device_put cannot write to another process's devices."""
    leaves, targets = jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)
    if all(getattr(x, "sharding", None) == s for x, s in zip(leaves, targets)):
        return tree
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def local_shards(x, s):
        if getattr(x, "sharding", None) == s:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
    return jax.tree_util.tree_map(local_shards, tree, shardings)


def _put_batch(batch, sharding, local_rows: bool):
    """Every batch leaf with `sharding`. With several processes a process gives either the whole batch (the same
    on every process, as `_put`'s trees) or, `local_rows`, only the rows of its own devices (Placement.local_rows):
    each builds the shards of its devices from what it holds."""
    if jax.process_count() == 1:
        return jax.device_put(batch, jax.tree_util.tree_map(lambda _: sharding, batch))
    whole = None if local_rows else jax.tree_util.tree_map(np.shape, batch)  # None: inferred from the local rows
    return jax.make_array_from_process_local_data(sharding, batch, whole)


class Placer:
    """place(state, teacher, batch, local_rows=False): each given tree on its NamedShardings from the logical
    table under `rules` (the state) and `t_rules` (the teacher); the batch's rows over the batch axes (the
    whole batch, or with local_rows this process's rows of it: see _put_batch); None passes through. A tree
    already on its shardings is not copied (device_put of an array to its own sharding is the array itself)."""

    def __init__(self, mesh: Mesh, accum: bool, rules: dict, t_rules: dict | None = None):
        self.mesh, self.accum, self.rules, self.t_rules = mesh, accum, rules, t_rules or rules
        self._cache: dict = {}

    def state(self, state):
        return self._cached("state", state, lambda: sharding.state_shardings(state, self.mesh, self.rules))

    def teacher(self, teacher):
        return self._cached("teacher", teacher, lambda: sharding.param_shardings(teacher, self.mesh, self.t_rules))

    def _cached(self, kind: str, tree, make):
        """Shardings by (kind, tree structure, shapes): worked out once per run, not every step."""
        key = (kind, *structure(tree))
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def batch(self) -> NamedSharding:
        """One sharding for every batch leaf (a tree prefix): rows on axis 0, or 1 with accumulation."""
        return sharding.batch_sharding(self.mesh, self.rules, self.accum)

    def __call__(self, state, teacher, batch, local_rows: bool = False):
        if state is not None:
            state = _put(state, self.state(state))
        if teacher is not None:
            teacher = _put(teacher, self.teacher(teacher))
        if batch is not None:
            batch = _put_batch(batch, self.batch(), local_rows)
        return state, teacher, batch


def pmap_step(s_cfg, t_cfg, loss_cfg, optim_cfg, mesh: Mesh | None = None, axis_name="data",
              policy: PolicyConfig | None = None, gate_cfg: so8t.GateConfig | None = None):
    """parallel.mode=pmap: the per-device step body (counts, gradients and terms summed with lax.psum) run on
    every local device, as jit(shard_map) over a 1-D mesh: jax's current form of pmap. The state and the
    teacher are replicated and placed once, by the same Placer as mesh mode (jax.pmap with in_axes=None re-sent
    the whole teacher to every device each step); the batch's rows are split over the devices.
    Returns (step, optimizer, place)."""
    mesh = make_mesh(jax.local_devices(), axis_name) if mesh is None else mesh
    step, optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, axis_name=axis_name, policy=policy,
                                gate_cfg=gate_cfg)
    place = Placer(mesh, optim_cfg.grad_accum_steps > 1, sharding.replicated_rules((axis_name,)))
    rows = place.batch().spec

    def sharded(state, teacher, batch, rng):
        # check_vma off: the sampler's while_loop starts from constants (device-invariant) and carries per-device
        # tokens; the outputs are replicated by construction (every term and gradient goes through psum).
        return jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), rows, P()), out_specs=(P(), P()),
                             check_vma=False)(state, teacher, batch, rng)

    return jax.jit(sharded, donate_argnums=(0,)), optimizer, place


class MeshStep:
    """The step under jax.jit over a Mesh (GSPMD) with in / out shardings from the logical table: the state's
    shardings in and out (the updated state stays sharded, donated in place), the teacher's, the batch's rows,
    a replicated rng and replicated metrics. XLA inserts the gathers and reductions. Compiled once per
    (state, teacher) structure; `jitted(state, teacher)` is the jax.jit object (for .lower)."""

    def __init__(self, step, place: Placer):
        self.step, self.place = step, place
        self._jitted: dict = {}

    def jitted(self, state, teacher):
        key = (*structure(state), *structure(teacher))
        if key not in self._jitted:
            s_sh, t_sh = self.place.state(state), self.place.teacher(teacher)
            replicated = NamedSharding(self.place.mesh, P())
            self._jitted[key] = jax.jit(self.step, donate_argnums=(0,),
                                        in_shardings=(s_sh, t_sh, self.place.batch(), replicated),
                                        out_shardings=(s_sh, replicated))
        return self._jitted[key]

    def __call__(self, state, teacher, batch, rng):
        return self.jitted(state, teacher)(state, teacher, batch, rng)


def mesh_step(s_cfg, t_cfg, loss_cfg, optim_cfg, mesh: Mesh, shard_teacher: bool = True,
              policy: PolicyConfig | None = None, gate_cfg: so8t.GateConfig | None = None,
              rules: dict | None = None):
    """parallel.mode=mesh: jax.jit over `mesh` (axes data / fsdp / tensor, or a 1-D data mesh), every sharding
    from sharding.py's table under `rules` (default sharding.RULES); the teacher's width is also split over
    `data` when shard_teacher. Returns (step, optimizer, place) where place(state, teacher, batch) puts
    arrays on their shardings."""
    step, optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, policy=policy, gate_cfg=gate_cfg)
    rules = sharding.RULES if rules is None else rules
    place = Placer(mesh, optim_cfg.grad_accum_steps > 1, rules, sharding.teacher_rules(rules, shard_teacher))
    return MeshStep(step, place), optimizer, place


class Placement:
    """The compiled step for `parallel.mode` (single | pmap | mesh) and the moves of state, teacher and batches
    onto its devices. run(state, teacher, batch, rng) -> (state, metrics); states are global arrays in
    every mode (replicated over the devices in pmap, sharded by the logical table in mesh), so checkpoints
    see one layout and restore onto another device count (Orbax reshards to the target's shardings)."""

    def __init__(self, mode: str, s_cfg, t_cfg, loss_cfg, optim_cfg, policy: PolicyConfig,
                 gate_cfg: so8t.GateConfig | None = None, parallel: ParallelConfig | None = None):
        self.mode, self._rows = mode, {}
        parallel = ParallelConfig(mode=mode) if parallel is None else parallel
        kw = dict(policy=policy, gate_cfg=gate_cfg)
        self.place = None
        if mode == "pmap":
            self.step, self.optimizer, self.place = pmap_step(s_cfg, t_cfg, loss_cfg, optim_cfg, **kw)
        elif mode == "mesh":
            self.step, self.optimizer, self.place = mesh_step(s_cfg, t_cfg, loss_cfg, optim_cfg,
                                                              parallel.mesh(),
                                                              shard_teacher=parallel.shard_teacher, **kw)
        else:
            step, self.optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, **kw)
            self.step = jit_step(step)

    def local_rows(self, rows: int, accum: int = 1) -> np.ndarray | None:
        """The positions in a step's batch of `accum` x `rows` rows (accumulation-major) that this process
        builds and places: its devices' rows (several processes, mesh mode); None: every row."""
        if self.place is None or jax.process_count() == 1:
            return None
        key = (rows, accum)
        if key not in self._rows:
            shape = (accum, rows) if accum > 1 else (rows,)
            local = distributed.local_rows(self.place.batch(), shape, axis=len(shape) - 1)
            self._rows[key] = (np.arange(accum)[:, None] * rows + local).reshape(-1)
        return self._rows[key]

    def to_device(self, state, teacher):
        """The state (and teacher, when given) on the mode's devices. In single mode they are committed to the
        device: a state restored by Orbax (resume, rollback) is, and a fresh one must match it or the step
        compiles again (the compile key includes whether each input is committed)."""
        if self.place is not None:
            state, teacher, _ = self.place(state, teacher, None)
        else:
            state, teacher = jax.device_put((state, teacher), jax.devices()[0])
        return state, teacher

    def run(self, state, teacher, batch, rng):
        """One step on `batch`: the rows `local_rows` names (every row with one process). The batch is placed
        each step; in mesh mode the state too (a no-op unless a hook replaced it with arrays of another
        sharding, which jit's in_shardings would refuse)."""
        if self.mode == "mesh":
            state, _, batch = self.place(state, None, batch, local_rows=True)
        elif self.place is not None:
            batch = self.place(None, None, batch, local_rows=True)[2]
        return self.step(state, teacher, batch, rng)
