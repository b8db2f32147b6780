"""What GGUF and HF import share: the error type and the assembly of file tensors into stacked params."""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax.config import ModelConfig
from so8t_jax.weights import names


class WeightsError(ValueError):
    """A model file or folder cannot be read: names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def required_tensors(cfg: ModelConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """File tensor name -> expected shape (HF layout) for every tensor the config needs."""
    out = {}
    for entry in names.entries(cfg):
        shape = names.hf_shape(cfg, entry.ours)
        layers = range(cfg.n_layers) if entry.per_layer else [None]
        for i in layers:
            out[names.file_name(entry, fmt, i)] = shape
    return out


def check_tensors(path, cfg: ModelConfig, fmt: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise before any data is read if a tensor is missing or disagrees with the config."""
    if cfg.n_layers > len(shapes):  # before the loop over the layers the config claims (a corrupt count)
        raise WeightsError(path, f"the config claims {cfg.n_layers} layers but the file holds only {len(shapes)} "
                                 f"tensors")
    for name, want in required_tensors(cfg, fmt).items():
        if name not in shapes:
            raise WeightsError(path, f"missing tensor {name!r} (needed by the {cfg.family} config)")
        if tuple(shapes[name]) != tuple(want):
            raise WeightsError(path, f"tensor {name!r} has shape {tuple(shapes[name])} but the metadata "
                                     f"implies {tuple(want)}")


def check_finite(path, name: str, w: np.ndarray) -> None:
    """Raise if tensor `name` (read from `path`) holds NaN or inf. One vectorised pass (a sum, ~1 ns a value):
    NaN and inf propagate through it, so a finite sum proves every value finite; only a non-finite sum (a broken
    tensor, or finite values summing past float32's range) pays for the element-wise check."""
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isfinite(np.sum(w)):
            return
    bad = ~np.isfinite(w)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(bad.argmax()), w.shape))
        raise WeightsError(path, f"tensor {name!r} holds {int(bad.sum())} non-finite values (NaN or inf; the first "
                                 f"at index {first}): a corrupt file or a broken model (allow_nonfinite=True, "
                                 f"config teacher.allow_nonfinite, loads it anyway)")


def assemble(cfg: ModelConfig, fmt: str, read: Callable[[str], np.ndarray], dtype=jnp.float32,
             shardings: Callable | None = None) -> dict:
    """Read every tensor through `read(file_name) -> float array in HF layout` into the stacked param tree.

    Reading (dequantizing) and re-laying out run on a thread pool: numpy releases the GIL in both.
    shardings: optional (our path "layers/q", global shape) -> jax Sharding (sharding.loader_shardings). Each
    param is then built straight into its shards (_assemble_sharded): no whole model on the host or one device.
    """
    jobs = [(entry, i) for entry in names.entries(cfg)
            for i in (range(cfg.n_layers) if entry.per_layer else [None])]

    def work(job):
        entry, i = job
        leaf = entry.ours.split("/")[-1]
        parts = names.split_fused(cfg, leaf, read(names.file_name(entry, fmt, i)))
        return {part: names.to_ours(cfg, part, w, fmt) for part, w in parts.items()}

    if shardings is not None:
        return _assemble_sharded(cfg, jobs, work, dtype, shardings)
    params: dict = {"layers": {}}
    stacks: dict[str, np.ndarray] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for (_, i), parts in zip(jobs, pool.map(work, jobs)):
            for part, w in parts.items():
                if i is None:
                    params[part] = jnp.asarray(w, dtype)
                    continue
                if part not in stacks:
                    stacks[part] = np.empty((cfg.n_layers, *w.shape), np.float32)
                stacks[part][i] = w
    for part, stack in stacks.items():
        params["layers"][part] = jnp.asarray(stack, dtype)
    return params


def _bounds(index: tuple, shape) -> tuple:
    """A shard's index (a tuple of slices, as jax gives it) as ((start, stop), ...): hashable, None-free."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _assemble_sharded(cfg: ModelConfig, jobs, work, dtype, shardings: Callable) -> dict:
    """assemble's sharded path, one file entry at a time (a stacked tensor, e.g. every layer's q): its layers
    are read once each (on the pool) and copied into one host buffer per distinct shard of this process's
    devices, in the target dtype; jax.make_array_from_callback puts each buffer on its devices, and the
    buffers go before the next entry. Peak host memory: about one stacked tensor (plus the layers in flight),
    not the model; no device ever holds more than its shards."""
    params: dict = {"layers": {}}
    entries: dict = {}
    for entry, i in jobs:
        entries.setdefault(entry.ours, []).append((entry, i))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for entry_jobs in entries.values():
            built: dict = {}  # part -> (path, shape, sharding, {bounds: buffer})
            for (_, i), parts in zip(entry_jobs, pool.map(work, entry_jobs)):
                for part, w in parts.items():
                    if part not in built:
                        path, shape = (part, w.shape) if i is None else (f"layers/{part}", (cfg.n_layers, *w.shape))
                        sharding = shardings(path, shape)
                        bounds = {_bounds(ix, shape) for ix in sharding.addressable_devices_indices_map(shape).values()}
                        built[part] = (path, shape, sharding, {b: np.empty([hi - lo for lo, hi in b], jnp.dtype(dtype))
                                                               for b in bounds})
                    for b, buf in built[part][3].items():
                        if i is None:
                            buf[...] = w[tuple(slice(lo, hi) for lo, hi in b)]
                        elif b[0][0] <= i < b[0][1]:
                            buf[i - b[0][0]] = w[tuple(slice(lo, hi) for lo, hi in b[1:])]
            for path, shape, sharding, bufs in built.values():
                array = jax.make_array_from_callback(shape, sharding, lambda ix, s=shape, b=bufs: b[_bounds(ix, s)])
                if "/" in path:
                    params["layers"][path.split("/")[1]] = array
                else:
                    params[path] = array
    return params
