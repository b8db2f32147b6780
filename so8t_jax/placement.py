"""Where the step runs: one device (jit), jax.pmap over the local devices, or jit over a device Mesh.

`Placement` hides the difference from the loop: it builds the compiled step for `parallel.mode`, puts the
state, teacher and batches on their devices, and hands back single (unreplicated) states for checkpoints.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from so8t_jax import so8t
from so8t_jax.completions import PolicyConfig
from so8t_jax.train_step import make_step


def jit_step(step):
    """Single device (or whatever jit's default placement is): donated state."""
    return jax.jit(step, donate_argnums=(0,))


def make_mesh(devices=None, axis_name="data") -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(-1), (axis_name,))


def _teacher_spec(x, n: int, axis_name: str):
    """Shard a teacher array's largest axis divisible by the device count (FSDP-style), else replicate."""
    dims = sorted(range(x.ndim), key=lambda i: -x.shape[i])
    for i in dims:
        if x.shape[i] % n == 0 and x.shape[i] >= n:
            spec = [None] * x.ndim
            spec[i] = axis_name
            return P(*spec)
    return P()


def _batch_spec(x, accum: bool, axis_name: str) -> P:
    """A batch leaf's rows over the data axis: [B, ...] on axis 0, [A, B, ...] (accumulation) on axis 1."""
    if x.ndim == 0:
        return P()
    return P(None, axis_name) if accum else P(axis_name)


def _placer(mesh: Mesh, axis_name: str, accum: bool, shard_teacher: bool):
    """place(state, teacher, batch): each given tree on its sharding (None passes through); the state
    replicated, the teacher replicated or sharded, the batch's rows split over the data axis."""
    n = mesh.devices.size
    replicated = NamedSharding(mesh, P())

    def place(state, teacher, batch):
        if state is not None:
            state = jax.device_put(state, replicated)
        if teacher is not None:
            teacher = jax.device_put(teacher, jax.tree_util.tree_map(
                lambda x: NamedSharding(mesh, _teacher_spec(x, n, axis_name)) if shard_teacher else replicated,
                teacher))
        if batch is not None:
            batch = jax.device_put(batch, jax.tree_util.tree_map(
                lambda x: NamedSharding(mesh, _batch_spec(x, accum, axis_name)), batch))
        return state, teacher, batch
    return place


def pmap_step(s_cfg, t_cfg, loss_cfg, optim_cfg, mesh: Mesh | None = None, axis_name="data",
              policy: PolicyConfig | None = None, gate_cfg: so8t.GateConfig | None = None):
    """parallel.mode=pmap: the per-device step body (counts, gradients and terms summed with lax.psum) run on
    every local device, as jit(shard_map) over a 1-D mesh: jax's current form of pmap. The state and the
    teacher are replicated and placed once (jax.pmap with in_axes=None re-sent the whole teacher to every
    device each step), the batch's rows are split over the devices. Returns (step, optimizer, place)."""
    mesh = make_mesh(jax.local_devices(), axis_name) if mesh is None else mesh
    step, optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, axis_name=axis_name, policy=policy,
                                gate_cfg=gate_cfg)
    accum = optim_cfg.grad_accum_steps > 1

    def sharded(state, teacher, batch, rng):
        specs = jax.tree_util.tree_map(lambda x: _batch_spec(x, accum, axis_name), batch)
        # check_vma off: the sampler's while_loop starts from constants (device-invariant) and carries per-device
        # tokens; the outputs are replicated by construction (every term and gradient goes through psum).
        return jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), specs, P()), out_specs=(P(), P()),
                             check_vma=False)(state, teacher, batch, rng)

    return jax.jit(sharded, donate_argnums=(0,)), optimizer, _placer(mesh, axis_name, accum, shard_teacher=False)


def mesh_step(s_cfg, t_cfg, loss_cfg, optim_cfg, mesh: Mesh, shard_teacher: bool = True, axis_name="data",
              policy: PolicyConfig | None = None, gate_cfg: so8t.GateConfig | None = None):
    """jax.jit over a Mesh (GSPMD): state replicated, batch split on the data axis, teacher params optionally
    sharded across devices (XLA gathers them layer by layer) so a teacher larger than one device fits.
    Returns (step, optimizer, place) where place(state, teacher, batch) puts arrays on their shardings."""
    step, optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, policy=policy, gate_cfg=gate_cfg)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))
    return jitted, optimizer, _placer(mesh, axis_name, optim_cfg.grad_accum_steps > 1, shard_teacher)


class Placement:
    """The compiled step for `parallel.mode` (single | pmap | mesh) and the moves of state, teacher and batches
    onto its devices. run(state, teacher, batch, rng) -> (state, metrics); states are global arrays in
    every mode (replicated over the devices in pmap and mesh), so checkpoints see one layout."""

    def __init__(self, mode: str, s_cfg, t_cfg, loss_cfg, optim_cfg, policy: PolicyConfig,
                 gate_cfg: so8t.GateConfig | None = None, shard_teacher: bool = False):
        self.mode = mode
        kw = dict(policy=policy, gate_cfg=gate_cfg)
        self.place = None
        if mode == "pmap":
            self.step, self.optimizer, self.place = pmap_step(s_cfg, t_cfg, loss_cfg, optim_cfg, **kw)
        elif mode == "mesh":
            self.step, self.optimizer, self.place = mesh_step(s_cfg, t_cfg, loss_cfg, optim_cfg, make_mesh(),
                                                              shard_teacher=shard_teacher, **kw)
        else:
            step, self.optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, **kw)
            self.step = jit_step(step)

    def to_device(self, state, teacher):
        """The state (and teacher, when given) on the mode's devices."""
        if self.place is not None:
            state, teacher, _ = self.place(state, teacher, None)
        return state, teacher

    def run(self, state, teacher, batch, rng):
        if self.place is not None:
            _, _, batch = self.place(None, None, batch)
        return self.step(state, teacher, batch, rng)
