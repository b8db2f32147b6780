"""What GGUF and HF import share: the error type and the assembly of file tensors into stacked params."""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable

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
    for name, want in required_tensors(cfg, fmt).items():
        if name not in shapes:
            raise WeightsError(path, f"missing tensor {name!r} (needed by the {cfg.family} config)")
        if tuple(shapes[name]) != tuple(want):
            raise WeightsError(path, f"tensor {name!r} has shape {tuple(shapes[name])} but the metadata "
                                     f"implies {tuple(want)}")


def assemble(cfg: ModelConfig, fmt: str, read: Callable[[str], np.ndarray], dtype=jnp.float32) -> dict:
    """Read every tensor through `read(file_name) -> float array in HF layout` into the stacked param tree.

    Reading (dequantizing) and re-laying out run on a thread pool: numpy releases the GIL in both.
    """
    jobs = [(entry, i) for entry in names.entries(cfg)
            for i in (range(cfg.n_layers) if entry.per_layer else [None])]

    def work(job):
        entry, i = job
        leaf = entry.ours.split("/")[-1]
        parts = names.split_fused(cfg, leaf, read(names.file_name(entry, fmt, i)))
        return {part: names.to_ours(cfg, part, w, fmt) for part, w in parts.items()}

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
