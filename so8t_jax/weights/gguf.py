"""GGUF (llama.cpp) files -> ModelConfig + params, with gguf's own dequantizers.

The header is walked here with bounds checks on every length, count and offset before any tensor data is
touched, and a file llama.cpp's own reader refuses is refused (GGUFFile; gguf_checks bounds the metadata):
gguf.GGUFReader trusts the file (a corrupt count makes it loop or allocate) and spends seconds building numpy
views of a 49k-entry vocabulary. Tensor data is then memory-mapped and dequantized with gguf.quants, tensor by
tensor (on threads, in common.assemble), and a tensor holding NaN or inf is refused unless allow_nonfinite.
"""
from __future__ import annotations

import math
import pathlib
import struct
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from so8t_jax.config import ConfigError, ModelConfig
from so8t_jax.weights import common, gguf_checks, names

ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma3")
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# llama.cpp's limits (ggml/src/gguf.cpp, ggml.h)
_MAX_DIMS = 4                        # GGML_MAX_DIMS
_MAX_NAME = 63                       # GGML_MAX_NAME - 1: bytes in a tensor name
_MAX_STRING = _MAX_ARRAY = 1 << 30   # GGUF_MAX_STRING_LENGTH, GGUF_MAX_ARRAY_ELEMENTS
_INT64_MAX = (1 << 63) - 1


class _Cursor:
    """Little-endian fields of a buffer, each bounds-checked against the file's size before it is read."""

    def __init__(self, path, buf):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def fail(self, problem: str):
        raise common.WeightsError(self.path, problem)

    def room(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated file: {what} at byte {self.pos} needs {n} bytes, file has {self.size}")

    def take(self, n: int, what: str) -> int:
        self.room(n, what)
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = _MAX_STRING) -> str:
        at = self.pos
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        if n > limit:
            self.fail(f"{what} at byte {at} is {n} bytes long; llama.cpp allows at most {limit}")
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, keep_arrays: bool) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            self.fail(f"metadata {what!r} has unknown value type {vtype}")
        itype, count = self.scalar("<I", what), self.scalar("<Q", what)
        if itype not in _SCALARS and itype != _STRING:
            self.fail(f"metadata {what!r}: arrays of type {itype} are not supported")
        # fixed-size items: the whole array; strings: at least their 8-byte lengths. Either way a count the file
        # cannot hold stops here, before any loop over it.
        self.room(count * (struct.calcsize(_SCALARS[itype]) if itype in _SCALARS else 8), what)
        if count > _MAX_ARRAY:
            self.fail(f"metadata {what!r} is an array of {count} items; llama.cpp allows at most {_MAX_ARRAY}")
        if itype in _SCALARS:  # no per-item loop
            start = self.take(count * struct.calcsize(_SCALARS[itype]), what)
            return np.frombuffer(self.buf, _SCALARS[itype], count, start) if keep_arrays else count
        if keep_arrays:
            return [self.string(what) for _ in range(count)]
        for _ in range(count):
            self.take(self.scalar("<Q", what), what)
        return count


class GGUFFile:
    """Validated header of a GGUF file: `metadata` (small values; token lists as counts), `value_types` (each
    metadata value's GGUF type), `tensors` (name -> (type, HF-layout shape, start byte, size in bytes)).

    A file llama.cpp's gguf reader (ggml/src/gguf.cpp) refuses is refused here, with a WeightsError naming the
    file and the problem: a bad magic or version; a count, string or array the file cannot hold or over
    llama.cpp's limits; an empty or repeated metadata key; general.alignment not a uint32 power of two; a tensor
    name over 63 bytes or repeated; other than 1 to 4 dims, a dim < 1, more elements than int64 counts; an
    unknown type or a row that is not a whole number of its blocks; and in the data section, a tensor that does
    not start exactly where the previous one's data, padded to the alignment, ends (so: aligned, in tensor-info
    order, no gaps, no overlaps) or that ends past the end of the file. Stricter than llama.cpp: 0-dim and empty
    tensors, types gguf cannot dequantize and bytes after the last tensor's padded data are refused too.
    """

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
        if n_tensors > cur.size // 32 or n_kv > cur.size // 14:  # the least bytes a tensor info / metadata entry takes
            raise common.WeightsError(self.path, f"truncated or corrupt header: {n_tensors} tensors / {n_kv} metadata "
                                                 f"entries cannot fit in {cur.size} bytes")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, int] = {}
        for _ in range(n_kv):
            self._key_value(cur)
        self.alignment = self._alignment(cur)
        seen: dict[str, int] = {}
        infos = [self._tensor_info(cur, i, seen) for i in range(n_tensors)]
        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, tuple[gguf.GGMLQuantizationType, tuple[int, ...], int, int]] = {}
        self._layout(cur, infos)

    def _key_value(self, cur: _Cursor) -> None:
        at = cur.pos
        key = cur.string("metadata key")
        if not key:
            cur.fail(f"empty metadata key at byte {at}")
        if key in self.metadata:
            cur.fail(f"duplicate metadata key {key!r} (again at byte {at})")
        vtype = self.value_types[key] = cur.scalar("<I", key)
        self.metadata[key] = cur.value(vtype, key, keep_arrays=not key.startswith("tokenizer.ggml."))

    def _alignment(self, cur: _Cursor) -> int:
        if "general.alignment" not in self.metadata:
            return 32
        if self.value_types["general.alignment"] != 4:
            cur.fail(f"general.alignment has GGUF value type {self.value_types['general.alignment']}; llama.cpp "
                     f"requires uint32 (4)")
        alignment = int(self.metadata["general.alignment"])
        if alignment <= 0 or alignment & (alignment - 1):
            cur.fail(f"general.alignment {alignment} is not a power of two")
        return alignment

    def _tensor_info(self, cur: _Cursor, i: int, seen: dict[str, int]) -> tuple:
        name = cur.string(f"tensor name {i}", limit=_MAX_NAME)
        if name in seen:
            cur.fail(f"duplicate tensor name {name!r} (tensor infos {seen[name]} and {i})")
        seen[name] = i
        n_dims = cur.scalar("<I", name)
        if not 1 <= n_dims <= _MAX_DIMS:
            cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        dims = [cur.scalar("<Q", name) for _ in range(n_dims)]
        raw_type, offset = cur.scalar("<I", name), cur.scalar("<Q", name)
        if not all(0 < d <= _INT64_MAX for d in dims):
            cur.fail(f"tensor {name!r} has dims {dims}: each must be at least 1 and below 2^63")
        n_elements = math.prod(dims)
        if n_elements > _INT64_MAX:
            cur.fail(f"tensor {name!r} with dims {dims} has {n_elements} elements, more than int64 counts")
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            cur.fail(f"tensor {name!r} has unknown tensor type {raw_type}")
        if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
                and qtype not in gguf.quants._type_traits:
            cur.fail(f"tensor {name!r} has type {qtype.name}, which gguf cannot dequantize")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            cur.fail(f"tensor {name!r} of type {qtype.name} has rows of {dims[0]} elements, not a multiple of its "
                     f"block size {block}")
        return name, qtype, dims, offset, n_elements // block * type_size

    def _layout(self, cur: _Cursor, infos: list[tuple]) -> None:
        """llama.cpp's data-section rule: tensor i starts at the sum of the sizes of tensors 0..i-1, each padded
        to the alignment; all of it inside the file, and (ours) nothing after the last tensor's padded data."""
        expected = 0
        for name, qtype, dims, offset, n_bytes in infos:
            start = self.data_start + offset
            if start + n_bytes > cur.size:
                cur.fail(f"tensor {name!r} ({n_bytes} bytes at offset {start}) points past the end of the file "
                         f"({cur.size} bytes)")
            if offset % self.alignment:
                cur.fail(f"tensor {name!r} has offset {offset}, not a multiple of general.alignment {self.alignment}")
            if offset != expected:
                how = f"leaves a gap of {offset - expected} bytes" if offset > expected else \
                    f"overlaps the previous tensor's padded data by {expected - offset} bytes"
                cur.fail(f"tensor {name!r} has offset {offset} but must start at {expected}, where the data of the "
                         f"tensors listed before it ends (padded to {self.alignment}): it {how}")
            expected += -(-n_bytes // self.alignment) * self.alignment
            self.tensors[name] = (qtype, tuple(reversed(dims)), start, n_bytes)
        end = self.data_start + expected
        if infos and cur.size > end:
            cur.fail(f"{cur.size - end} bytes after the data section: the tensors' padded data ends at byte {end}, "
                     f"the file at byte {cur.size}")

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


def load_gguf(path, dtype=jnp.float32, allow_nonfinite: bool = False,
              shardings=None) -> tuple[ModelConfig, dict, GGUFFile]:
    f = GGUFFile(path)
    gguf_checks.check_metadata(f)
    cfg = config_from_gguf(f)
    common.check_tensors(f.path, cfg, names.GGUF, f.shapes())

    def read(name):
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / inf from corrupt scales: check_finite names them
            w = f.read(name)
        if names.gguf_permutes_qk(cfg.family) and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_qk(w, cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)
        if not allow_nonfinite:
            common.check_finite(f.path, name, w)
        return w

    return cfg, common.assemble(cfg, names.GGUF, read, dtype, shardings), f
