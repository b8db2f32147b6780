"""GGUF (llama.cpp) files -> ModelConfig + params, with gguf's own dequantizers.

The header is walked here with bounds checks on every length, count and offset before any tensor data is
touched: gguf.GGUFReader trusts the file (a corrupt count makes it loop or allocate) and spends seconds
building numpy views of a 49k-entry vocabulary. Tensor data is then memory-mapped and dequantized with
gguf.quants, tensor by tensor (on threads, in common.assemble).
"""
from __future__ import annotations

import pathlib
import struct
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from so8t_jax.config import ConfigError, ModelConfig
from so8t_jax.weights import common, names

ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma3")
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4


class _Cursor:
    def __init__(self, path, buf):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise common.WeightsError(self.path, f"truncated file: {what} at byte {self.pos} needs {n} bytes, "
                                                 f"file has {self.size}")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, keep_arrays: bool) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise common.WeightsError(self.path, f"metadata {what!r} has unknown value type {vtype}")
        itype, count = self.scalar("<I", what), self.scalar("<Q", what)
        if itype in _SCALARS:  # fixed-size items: bounds-check the whole array at once, no per-item loop
            size = struct.calcsize(_SCALARS[itype])
            start = self.take(count * size, what)
            return np.frombuffer(self.buf, _SCALARS[itype], count, start) if keep_arrays else count
        if itype == _STRING:
            items = [self.string(what) for _ in range(count)] if keep_arrays else None
            if not keep_arrays:
                for _ in range(count):
                    self.take(self.scalar("<Q", what), what)
            return items if keep_arrays else count
        raise common.WeightsError(self.path, f"metadata {what!r}: arrays of type {itype} are not supported")


class GGUFFile:
    """Validated header of a GGUF file: `metadata` (small values; token lists as counts) and `tensors`."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise common.WeightsError(self.path, "no such file")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r") if self.path.stat().st_size else b""
        cur = _Cursor(self.path, self.data)
        magic = bytes(self.data[:4])
        if magic != b"GGUF":
            raise common.WeightsError(self.path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.take(4, "magic")
        version = cur.scalar("<I", "version")
        if version not in (2, 3):
            raise common.WeightsError(self.path, f"unsupported GGUF version {version}")
        n_tensors, n_kv = cur.scalar("<Q", "tensor count"), cur.scalar("<Q", "metadata count")
        if n_tensors > cur.size // 24 or n_kv > cur.size // 12:  # each entry needs at least that many bytes
            raise common.WeightsError(self.path, f"truncated or corrupt header: {n_tensors} tensors / {n_kv} metadata "
                                                 f"entries cannot fit in {cur.size} bytes")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.scalar("<I", key)
            self.metadata[key] = cur.value(vtype, key, keep_arrays=not key.startswith("tokenizer.ggml."))
        self.tensors: dict[str, tuple[gguf.GGMLQuantizationType, tuple[int, ...], int, int]] = {}
        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.scalar("<I", name)
            if not 1 <= n_dims <= _MAX_DIMS:
                raise common.WeightsError(self.path, f"tensor {name!r} has {n_dims} dimensions")
            dims = [cur.scalar("<Q", name) for _ in range(n_dims)]
            raw_type, offset = cur.scalar("<I", name), cur.scalar("<Q", name)
            infos.append((name, dims, raw_type, offset))
        alignment = int(self.metadata.get("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise common.WeightsError(self.path, f"general.alignment {alignment} is not a power of two")
        data_start = -(-cur.pos // alignment) * alignment
        for name, dims, raw_type, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(raw_type)
            except ValueError:
                raise common.WeightsError(self.path, f"tensor {name!r} has unknown tensor type {raw_type}") \
                    from None
            if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
                    and qtype not in gguf.quants._type_traits:
                raise common.WeightsError(self.path, f"tensor {name!r} has type {qtype.name}, which gguf "
                                                     f"cannot dequantize")
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if any(d <= 0 for d in dims) or dims[0] % block:
                raise common.WeightsError(self.path, f"tensor {name!r} dims {dims} do not fit {qtype.name} "
                                                     f"blocks of {block}")
            n_bytes = int(np.prod(dims, dtype=object)) // block * type_size
            start = data_start + offset
            if start + n_bytes > cur.size:
                raise common.WeightsError(self.path, f"tensor {name!r} ({n_bytes} bytes at offset {start}) "
                                                     f"points past the end of the file ({cur.size} bytes)")
            self.tensors[name] = (qtype, tuple(reversed(dims)), start, n_bytes)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: t[1] for name, t in self.tensors.items()}

    def read(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32, in HF layout ([out, in] for matrices)."""
        qtype, shape, start, n_bytes = self.tensors[name]
        raw = self.data[start:start + n_bytes]
        if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raw = raw.reshape(*shape[:-1], -1)
        return gguf.quants.dequantize(raw, qtype).reshape(shape)


def _meta(f: GGUFFile, key: str, default=None, required=False):
    value = f.metadata.get(key, default)
    if required and value is None:
        raise common.WeightsError(f.path, f"missing metadata key {key!r}")
    if isinstance(value, np.ndarray):
        raise common.WeightsError(f.path, f"metadata {key!r} is a per-layer array, which is not supported")
    return value


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    arch = _meta(f, "general.architecture", required=True)
    if arch not in ARCHITECTURES:
        raise common.WeightsError(f.path, f"unsupported architecture {arch!r}; supported: {ARCHITECTURES}")
    a = arch + "."
    d = int(_meta(f, a + "embedding_length", required=True))
    n_heads = int(_meta(f, a + "attention.head_count", required=True))
    n_layers = int(_meta(f, a + "block_count", required=True))
    head_dim = int(_meta(f, a + "attention.key_length", d // n_heads))
    rope_dim = int(_meta(f, a + "rope.dimension_count", head_dim))
    if "token_embd.weight" not in f.tensors:
        raise common.WeightsError(f.path, "missing tensor 'token_embd.weight'")
    kw: dict[str, Any] = {}
    scaling = _meta(f, a + "rope.scaling.type")
    if "rope_freqs.weight" in f.tensors:           # llama 3 rope scaling, stored as divisors
        kw["rope_factors_short"] = tuple(float(x) for x in f.read("rope_freqs.weight"))
    elif "rope_factors_short.weight" in f.tensors:  # phi3 LongRoPE
        kw.update(rope_factors_short=tuple(float(x) for x in f.read("rope_factors_short.weight")),
                  rope_factors_long=tuple(float(x) for x in f.read("rope_factors_long.weight"))
                  if "rope_factors_long.weight" in f.tensors else None,
                  rope_original_max=_meta(f, a + "rope.scaling.original_context_length"),
                  rope_attn_factor=float(_meta(f, a + "rope.scaling.attn_factor", 1.0)))
    elif scaling == "linear":
        kw["rope_factors_short"] = (float(_meta(f, a + "rope.scaling.factor", 1.0)),) * (rope_dim // 2)
    elif scaling not in (None, "none"):
        raise common.WeightsError(f.path, f"unsupported rope scaling type {scaling!r}")
    window = _meta(f, a + "attention.sliding_window")
    if arch == "gemma3":
        # llama.cpp's gemma3: without a sliding_window_pattern array every 6th layer is global; local layers
        # use rope.freq_base_swa (default 10000); the attention scale is 1/sqrt(key_length) except for the
        # 27B, which uses d_model / heads as query_pre_attn_scalar.
        pattern = f.metadata.get(a + "attention.sliding_window_pattern")
        if pattern is not None and len(pattern) != n_layers:
            raise common.WeightsError(f.path, f"sliding_window_pattern has {len(pattern)} entries for "
                                              f"{n_layers} layers")
        sliding = tuple(bool(x) for x in pattern) if pattern is not None else \
            tuple((i + 1) % 6 != 0 for i in range(n_layers))
        kw.update(activation="gelu_tanh", qk_norm=True, post_norms=True, embed_scale=True,
                  rope_local_theta=float(_meta(f, a + "rope.freq_base_swa", 10000.0)),
                  sliding_window=int(window or 4096), sliding_layers=sliding,
                  query_scale=(d / n_heads if n_layers == 62 else head_dim) ** -0.5)
    elif arch in ("phi3", "llama") and window:  # a llama file with a window: mistral (as export writes it)
        kw.update(sliding_window=int(window), sliding_layers=(True,) * n_layers)
    if arch == "qwen3":
        kw["qk_norm"] = True
    eos = [_meta(f, "tokenizer.ggml.eos_token_id"), _meta(f, "tokenizer.ggml.eot_token_id")]
    try:
        return ModelConfig(
            family="mistral" if arch == "llama" and window else arch,
            vocab_size=f.tensors["token_embd.weight"][1][0], d_model=d, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=int(_meta(f, a + "attention.head_count_kv", n_heads)),
            head_dim=head_dim, ffn_dim=int(_meta(f, a + "feed_forward_length", required=True)),
            norm_eps=float(_meta(f, a + "attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in f.tensors, attn_bias="blk.0.attn_q.bias" in f.tensors,
            rope_theta=float(_meta(f, a + "rope.freq_base", 10000.0)),
            rope_dim=rope_dim if rope_dim != head_dim else None,
            max_seq_len=int(_meta(f, a + "context_length", 4096)),
            bos_token_id=_meta(f, "tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            pad_token_id=_meta(f, "tokenizer.ggml.padding_token_id"), **kw)
    except ConfigError as e:
        raise common.WeightsError(f.path, f"metadata describes an invalid model: {e}") from e


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF's rotate_half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path, dtype=jnp.float32) -> tuple[ModelConfig, dict, GGUFFile]:
    f = GGUFFile(path)
    cfg = config_from_gguf(f)
    common.check_tensors(f.path, cfg, names.GGUF, f.shapes())

    def read(name):
        w = f.read(name)
        if names.gguf_permutes_qk(cfg.family) and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_qk(w, cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)
        return w

    return cfg, common.assemble(cfg, names.GGUF, read, dtype), f
