"""Where the step runs: one device (jit), jax.pmap over the local devices, or jit over a device Mesh.

`Placement` hides the difference from the loop: it builds the compiled step for `parallel.mode`, puts the
state, teacher and batches on their devices, and hands back single (unreplicated) states for checkpoints.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from so8t_jax import so8t
from so8t_jax.completions import PolicyConfig
from so8t_jax.train_step import make_step


def jit_step(step):
    """Single device (or whatever jit's default placement is): donated state."""
    return jax.jit(step, donate_argnums=(0,))


def pmap_step(s_cfg, t_cfg, loss_cfg, optim_cfg, axis_name="data", policy: PolicyConfig | None = None,
              gate_cfg: so8t.GateConfig | None = None):
    """jax.pmap over local devices: state replicated, teacher broadcast, batch split on a leading device
    axis ([n_dev, B/n_dev, ...], see `shard_for_pmap`), gradients summed with lax.psum."""
    step, optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, axis_name=axis_name, policy=policy,
                                gate_cfg=gate_cfg)
    return jax.pmap(step, axis_name=axis_name, in_axes=(0, None, 0, None), donate_argnums=(0,)), optimizer


def replicate(tree, n_devices: int):
    """A copy per device on a new leading axis: the state layout pmap expects."""
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n_devices, *x.shape)), tree)


def shard_for_pmap(batch, n_devices: int):
    """[B, ...] (or [A, B, ...] with accumulation) -> [n_dev, B/n_dev, ...] (or [n_dev, A, B/n_dev, ...])."""
    def one(x, batch_axis):
        b = x.shape[batch_axis]
        if b % n_devices:
            raise ValueError(f"batch of {b} rows does not split over {n_devices} devices")
        shape = x.shape[:batch_axis] + (n_devices, b // n_devices) + x.shape[batch_axis + 1:]
        return jnp.moveaxis(x.reshape(shape), batch_axis, 0)

    accum = batch["input_ids"].ndim == 3
    return jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(x, (n_devices,)) if x.ndim == 0 else one(x, 1 if accum else 0), batch)


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


def mesh_step(s_cfg, t_cfg, loss_cfg, optim_cfg, mesh: Mesh, shard_teacher: bool = True, axis_name="data",
              policy: PolicyConfig | None = None, gate_cfg: so8t.GateConfig | None = None):
    """jax.jit over a Mesh: state replicated, batch split on the data axis, teacher params optionally sharded
    across devices (XLA gathers them layer by layer) so a teacher larger than one device fits.
    Returns (step, optimizer, place) where place(state, teacher, batch) puts arrays on their shardings."""
    step, optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, policy=policy, gate_cfg=gate_cfg)
    n = mesh.devices.size
    replicated = NamedSharding(mesh, P())

    def batch_sharding(x):
        if x.ndim == 0:
            return replicated
        return NamedSharding(mesh, P(None, axis_name) if x.ndim == 3 else P(axis_name))

    def teacher_sharding(teacher):
        return jax.tree_util.tree_map(
            lambda x: NamedSharding(mesh, _teacher_spec(x, n, axis_name)) if shard_teacher else replicated, teacher)

    def place(state, teacher, batch):
        """Put each given tree on its sharding (None passes through)."""
        if state is not None:
            state = jax.device_put(state, replicated)
        if teacher is not None:
            teacher = jax.device_put(teacher, teacher_sharding(teacher))
        if batch is not None:
            batch = jax.device_put(batch, jax.tree_util.tree_map(batch_sharding, batch))
        return state, teacher, batch

    jitted = jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))
    return jitted, optimizer, place


class Placement:
    """The compiled step for `parallel.mode` (single | pmap | mesh) and the moves of state, teacher and batches
    onto its devices. run(state, teacher, batch, rng) -> (state, metrics) with metrics of one device."""

    def __init__(self, mode: str, s_cfg, t_cfg, loss_cfg, optim_cfg, policy: PolicyConfig,
                 gate_cfg: so8t.GateConfig | None = None, shard_teacher: bool = False):
        self.mode = mode
        kw = dict(policy=policy, gate_cfg=gate_cfg)
        if mode == "pmap":
            self.n = jax.local_device_count()
            self.step, self.optimizer = pmap_step(s_cfg, t_cfg, loss_cfg, optim_cfg, **kw)
        elif mode == "mesh":
            self.step, self.optimizer, self.place = mesh_step(s_cfg, t_cfg, loss_cfg, optim_cfg, make_mesh(),
                                                              shard_teacher=shard_teacher, **kw)
        else:
            step, self.optimizer = make_step(s_cfg, t_cfg, loss_cfg, optim_cfg, **kw)
            self.step = jit_step(step)

    def to_device(self, state, teacher):
        """The state (and teacher, when given) on the mode's devices: replicated for pmap, placed for mesh."""
        if self.mode == "pmap":
            return replicate(state, self.n), teacher
        if self.mode == "mesh":
            state, teacher, _ = self.place(state, teacher, None)
        return state, teacher

    def host_state(self, state):
        """The single (unreplicated) state, for checkpoints and evaluation."""
        return jax.tree_util.tree_map(lambda x: x[0], state) if self.mode == "pmap" else state

    def run(self, state, teacher, batch, rng):
        if self.mode == "pmap":
            state, metrics = self.step(state, teacher, shard_for_pmap(batch, self.n), rng)
            return state, jax.tree_util.tree_map(lambda x: x[0], metrics)
        if self.mode == "mesh":
            _, _, batch = self.place(None, None, batch)
        return self.step(state, teacher, batch, rng)
