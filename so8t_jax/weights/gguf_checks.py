"""Checks of a GGUF file's metadata before config_from_gguf (weights/gguf.py) turns it into a ModelConfig:
every size, count and length it reads is an integer bounded by what the file holds, every float finite, token ids
integers, the rope factor tensors short, finite and positive. Unchecked, a corrupt count reaches a loop or an
allocation first (a flipped bit in block_count once made the loader loop for minutes)."""
from __future__ import annotations

import math

import numpy as np

from so8t_jax.weights import common

_INTS, _FLOATS, _STRING = (0, 1, 2, 3, 4, 5, 10, 11), (6, 12), 8  # GGUF value types
_U32_MAX = (1 << 32) - 1
_TOKEN_IDS = tuple(f"tokenizer.ggml.{t}_token_id" for t in ("bos", "eos", "eot", "eom", "padding", "unknown", "sep",
                                                            "mask"))
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight")


def _int_key(f, key: str, low: int, high: int, why: str) -> int | None:
    """The integer at metadata `key` (None when absent, or a per-layer array of numbers, which config_from_gguf
    names) once its type and its range [low, high] are checked."""
    value = f.metadata.get(key)
    if value is None or isinstance(value, np.ndarray):
        return None
    if f.value_types[key] not in _INTS:
        raise common.WeightsError(f.path, f"metadata {key!r} must be an integer, got GGUF value type "
                                          f"{f.value_types[key]} ({value!r:.40})")
    if not low <= value <= high:
        raise common.WeightsError(f.path, f"metadata {key!r} = {value} is out of range: at least {low} and at most "
                                          f"{high} ({why})")
    return int(value)


def _float_key(f, key: str, positive: bool) -> None:
    value = f.metadata.get(key)
    if value is None or isinstance(value, np.ndarray):
        return
    if f.value_types[key] not in _INTS + _FLOATS:
        raise common.WeightsError(f.path, f"metadata {key!r} must be a number, got GGUF value type "
                                          f"{f.value_types[key]} ({value!r:.40})")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise common.WeightsError(f.path, f"metadata {key!r} = {value} must be a finite number "
                                          f"{'> 0' if positive else '>= 0'}")


def check_metadata(f) -> None:
    """Raise (WeightsError) before config_from_gguf reads the metadata of `f` (a weights.gguf.GGUFFile) where a
    value it uses is of the wrong type or beyond what the file holds: block_count above the number of tensors,
    embedding_length other than token_embd's rows, head counts above embedding_length, rope.dimension_count above
    the head size, other sizes and counts above the number of values in the file, vocab_size above its bytes."""
    arch = f.metadata.get("general.architecture")
    if not isinstance(arch, str):
        return  # config_from_gguf names the problem
    a = arch + "."
    elements = sum(math.prod(t[1]) for t in f.tensors.values())
    everything = f"the file's tensors hold {elements} values"

    def count(suffix, low=1, high=None, why=everything):
        return _int_key(f, a + suffix, low, elements if high is None else high, why)

    count("block_count", high=len(f.tensors), why=f"each layer has its own tensors; the file holds {len(f.tensors)}")
    d = count("embedding_length")
    embd = f.tensors.get("token_embd.weight")
    if d is not None and embd is not None and d != embd[1][-1]:
        raise common.WeightsError(f.path, f"metadata {a}embedding_length = {d} but token_embd.weight has rows of "
                                          f"{embd[1][-1]}")
    heads = count("attention.head_count", high=d, why=f"{a}embedding_length") if d else count("attention.head_count")
    count("attention.head_count_kv", high=heads, why=f"{a}attention.head_count") if heads else \
        count("attention.head_count_kv")
    key_length = count("attention.key_length")
    count("attention.value_length")
    count("feed_forward_length")
    head_dim = key_length or d
    count("rope.dimension_count", high=head_dim, why="the head size") if head_dim else count("rope.dimension_count")
    count("vocab_size", high=len(f.data), why=f"the file has {len(f.data)} bytes")
    experts = count("expert_count", low=0)
    count("expert_used_count", low=0, high=experts, why=f"{a}expert_count") if experts is not None else \
        count("expert_used_count", low=0)
    for suffix, low in (("context_length", 1), ("rope.scaling.original_context_length", 1),
                        ("attention.sliding_window", 0)):
        count(suffix, low, _U32_MAX, "uint32")
    for key in _TOKEN_IDS:
        _int_key(f, key, 0, _U32_MAX, "uint32")
    for suffix in ("rope.freq_base", "rope.freq_base_swa", "rope.scaling.factor", "rope.scaling.attn_factor"):
        _float_key(f, a + suffix, positive=True)
    for suffix in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        _float_key(f, a + suffix, positive=False)
    if a + "rope.scaling.type" in f.metadata and f.value_types[a + "rope.scaling.type"] != _STRING:
        raise common.WeightsError(f.path, f"metadata {a + 'rope.scaling.type'!r} must be a string")
    if d is not None:
        _check_rope_tensors(f, max(key_length or 0, d) // 2)


def _check_rope_tensors(f, half: int) -> None:
    """rope_freqs / LongRoPE factor tensors (divisors of the rotary frequencies, read into the config): one
    dimension of at most head_size / 2, every value finite and > 0."""
    for name in _ROPE_TENSORS:
        if name not in f.tensors:
            continue
        shape = f.tensors[name][1]
        if len(shape) != 1 or shape[0] > half:
            raise common.WeightsError(f.path, f"tensor {name!r} (rope frequency factors) has shape {shape}: expected "
                                              f"one dimension of at most {half} (head size / 2)")
        v = f.read(name)
        if not (np.isfinite(v).all() and (v > 0).all()):
            raise common.WeightsError(f.path, f"tensor {name!r} (rope frequency factors) must be finite and > 0, "
                                              f"got {v.tolist()}")
