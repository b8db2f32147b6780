"""Sequence-level KD (policy.seq_kd) with the teacher's generations made once and cached.

Sampling the teacher inside every step costs a full teacher generation per step, and every epoch would pay it
again. Instead the teacher completes every training prompt once before training (seeded per row, in batches),
the completions are saved under `<output_dir>/.seq_kd_cache/<key>.npz` and replace the rows' dataset
completions; the step then trains on them as dataset completions (mixed with the student's own samples at
rate lmbda). The key is a sha256 of everything the completions depend on: the teacher's weights (tree
digest), the prompts' token ids, the sampling settings, the end ids and the seed. A changed teacher or dataset
therefore misses the cache and generates afresh; a rerun, a resumed run or another run with the same teacher
and data reuses it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pathlib
import zipfile
from collections.abc import Sequence

import jax
import numpy as np

from so8t_jax import audit, runs, sampling
from so8t_jax.completions import PolicyConfig

# decode is latency-bound: on the 2-core CPU a SmolLM2-135M decode step of 64 rows took 0.45 s, one of 16 0.23 s
GENERATE_BATCH = 64
PAD_MULTIPLE = 32  # each batch is left-padded to its longest prompt rounded up to this: few compiled shapes


def cache_key(teacher_digest: str, prompts: Sequence[Sequence[int]], policy: PolicyConfig, seed: int) -> str:
    h = hashlib.sha256()
    settings = {"temperature": policy.temperature, "top_k": policy.top_k, "top_p": policy.top_p, "seed": seed,
                "max_new_tokens": policy.max_new_tokens, "eos_ids": list(policy.eos_ids), "pad_id": policy.pad_id}
    h.update(json.dumps({"teacher": teacher_digest, "settings": settings}, sort_keys=True).encode())
    for p in prompts:
        h.update(np.asarray(p, np.int32).tobytes() + b"|")
    return h.hexdigest()[:32]


def generate(params, cfg, prompts: Sequence[Sequence[int]], policy: PolicyConfig, seed: int,
             batch_size: int = GENERATE_BATCH) -> list[tuple[int, ...]]:
    """The teacher's completion of each prompt (ending with its end id unless cut at max_new_tokens), a pure
    function of (params, prompts, policy, seed), in the prompts' order. Prompts are batched by length (shortest
    first) so a batch of short prompts is not padded to the longest of all: prefill and every decode step's
    attention cost what the batch's own prompts need."""
    sampler = sampling.Sampler(policy.temperature, policy.top_k, policy.top_p)
    fn = sampling.make_sample_fn(cfg, policy.max_new_tokens, sampler, policy.eos_ids, policy.pad_id)
    key = jax.random.fold_in(jax.random.key(seed), 0x5E9)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[tuple[int, ...]] = [()] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chunk = [prompts[i] for i in rows]
        chunk += [chunk[-1]] * (batch_size - len(rows))  # one batch size for every batch
        width = sampling.bucket_length(len(chunk[-1]), PAD_MULTIPLE)
        tokens, mask = sampling.left_pad(chunk, width, policy.pad_id)
        res = fn(params, tokens, mask, jax.random.fold_in(key, start // batch_size))
        toks, lengths = np.asarray(res.tokens_BxN), np.asarray(res.lengths_B)
        for r, i in enumerate(rows):
            out[i] = tuple(int(t) for t in toks[r, :lengths[r]])
    return out


def _save(path: pathlib.Path, completions: Sequence[tuple[int, ...]]) -> None:
    """Atomic (runs.write_bytes): a killed run leaves no half-written cache to be read as valid."""
    lengths = np.asarray([len(c) for c in completions], np.int64)
    flat = np.asarray([t for c in completions for t in c], np.int32)
    buf = io.BytesIO()
    np.savez(buf, lengths=lengths, tokens=flat)
    runs.write_bytes(path, buf.getvalue())


def _load(path: pathlib.Path, n: int) -> list[tuple[int, ...]] | None:
    try:
        with np.load(path) as z:
            lengths, flat = z["lengths"], z["tokens"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing or unreadable: generate again
    if len(lengths) != n or lengths.sum() != len(flat):
        return None
    ends = np.cumsum(lengths)
    return [tuple(int(t) for t in flat[e - k:e]) for e, k in zip(ends, lengths)]


def teacher_completions(params, cfg, prompts, policy: PolicyConfig, seed: int, cache_dir) -> tuple[list, dict]:
    """(completions, {"key", "path", "hit"}): from the cache when its key matches, else generated and saved."""
    key = cache_key(audit.tree_digest(params), prompts, policy, seed)
    path = pathlib.Path(cache_dir) / f"{key}.npz"
    cached = _load(path, len(prompts))
    if cached is not None:
        return cached, {"key": key, "path": str(path), "hit": True}
    completions = generate(params, cfg, prompts, policy, seed)
    _save(path, completions)
    return completions, {"key": key, "path": str(path), "hit": False}


def relabel(encoded, params, cfg, policy: PolicyConfig, seed: int, cache_dir, report: dict | None = None):
    """The encoded rows with the teacher's completions (what data.prepare trains on under seq_kd); the cache's
    key, path and whether it hit go into `report`."""
    completions, info = teacher_completions(params, cfg, [e.prompt_ids for e in encoded], policy, seed, cache_dir)
    if report is not None:
        report.update(info)
    return [dataclasses.replace(e, completion_ids=c) for e, c in zip(encoded, completions)]


def step_policy(policy: PolicyConfig) -> PolicyConfig:
    """The step's policy once the teacher's completions are the dataset's: no generation by the teacher."""
    return dataclasses.replace(policy, seq_kd=False)
