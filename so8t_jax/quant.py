"""Quantized teachers on device: GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K matrices kept as their packed blocks and
dequantized block-wise inside the jitted computation that uses them.

A QuantizedWeight is a pytree node whose one big child is the file's blocks, uint8 [*lead, R, NB, S] (R rows of
the file's [out, in] matrix, NB blocks of S bytes along `in`; lead: the stacked layer axis), bit for bit as
llama.cpp wrote them (fp16 scales and mins inside each block): the device holds the file's tensor bytes. Leading
axes slice like any array (jax.lax.scan over layers, `layers[idx]`), so the decoder's layer scan dequantizes
one layer at a time: one fused XLA computation decodes a layer's blocks for its matmul, and only that layer's
dense matrices exist at once (memory_analysis: tests/test_quant.py, docs/BENCHMARKS.md). `dequantize` gives the
decoder's dense layout (names.to_ours: a transpose and reshape of the file's matrix), in the dtype the weight
stands for, equal in float32 to gguf.quants.dequantize on the same bytes (hand-written in jnp because gguf's
dequantizers are numpy, on the host). A leaf whose layers use different types of one block size (llama.cpp's
Q4_K_M mixes Q4_K and Q6_K) keeps blocks padded to the widest type and a per-layer `codes` index (lax.switch
per layer).

Kept quantized: the attention and MLP matrices, token embeddings and lm_head. Dense (in the load dtype): norms,
biases, rope factors, F32 / F16 / BF16 tensors, other types, and a leaf whose layers mix block sizes.
"""
from __future__ import annotations

import functools
import math
import pathlib

import flax.struct
import gguf
import jax
import jax.numpy as jnp
import numpy as np

from so8t_jax.weights import common, gguf_checks, names
from so8t_jax.weights import gguf as gguf_w

QTYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# leaves kept quantized -> whether ours is the file's [out, in] matrix transposed (names.to_ours)
_TRANSPOSED = {"embed": False, "lm_head": True, "q": True, "k": True, "v": True, "o": True, "gate": True,
               "up": True, "down": True}
_FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}  # byte offsets


def block_size(qtype: str) -> tuple[int, int]:
    """(values, bytes) of one block of `qtype`."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]


@flax.struct.dataclass
class QuantizedWeight:
    """A matrix (or a stack of them) kept as GGUF blocks; `shape` and `dtype` are those of the dense weight it
    stands for, `nbytes` the bytes it occupies."""
    blocks: jax.Array                 # uint8 [*lead, R, NB, S]
    codes: jax.Array | None           # int32 [*lead]: each layer's index into qtypes (mixed types), else None
    qtypes: tuple[str, ...] = flax.struct.field(pytree_node=False)
    dense_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # ours, without the leading axes
    transposed: bool = flax.struct.field(pytree_node=False)
    dtype_name: str = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.blocks.shape[:-3]) + tuple(self.dense_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return jnp.dtype(self.dtype_name)

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes + (0 if self.codes is None else self.codes.nbytes))


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


# ----------------------------------------------------------------------------------------------- decoders
# Each takes uint8 blocks [..., NB, S] and returns float32 [..., NB, block], with gguf.quants' operations in its
# order (so float32 results are equal, not merely close). Bytes past a type's size (padding) are never read.

def _f16(b):
    return jax.lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)[..., None]  # [..., 2] -> [..., 1]


def _nibbles(qs, groups: int):
    """[..., n] bytes -> [..., 2n]: per group of n / groups bytes, its low nibbles then its high nibbles."""
    qs = qs.reshape(*qs.shape[:-1], groups, 1, -1)
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*qs.shape[:-3], -1)


def _q8_0(b):
    return jax.lax.bitcast_convert_type(b[..., 2:34], jnp.int8).astype(jnp.float32) * _f16(b[..., 0:2])


def _q4_0(b):
    return _f16(b[..., 0:2]) * (_nibbles(b[..., 2:18], 1).astype(jnp.int8) - 8).astype(jnp.float32)


def _q4_1(b):
    return _f16(b[..., 0:2]) * _nibbles(b[..., 4:20], 1).astype(jnp.float32) + _f16(b[..., 2:4])


def _q4_k(b):
    lead = b.shape[:-1]
    s = b[..., 4:16]
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    scale = (_f16(b[..., 0:2]) * sc.astype(jnp.float32))[..., None]    # [..., 8, 1]
    minus = (_f16(b[..., 2:4]) * mn.astype(jnp.float32))[..., None]
    q = _nibbles(b[..., 16:144], 4).reshape(*lead, 8, 32).astype(jnp.float32)
    return (scale * q - minus).reshape(*lead, 256)


def _q6_k(b):
    lead = b.shape[:-1]
    scale = (_f16(b[..., 208:210]) * jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8)
             .astype(jnp.float32))[..., None]                          # [..., 16, 1]
    ql = _nibbles(b[..., 0:128], 2).reshape(*lead, 8, 32)
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
    qh = jnp.concatenate([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], axis=-2).reshape(*lead, 8, 32)
    q = ((ql | (qh << 4)).astype(jnp.int8) - 32).reshape(*lead, 16, 16).astype(jnp.float32)
    return (scale * q).reshape(*lead, 256)


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k}


def decode(qtype: str, blocks):
    """uint8 blocks [..., NB, S] of `qtype` -> float32 rows [..., NB * block]."""
    values = _DECODERS[qtype](blocks)
    return values.reshape(*values.shape[:-2], -1)


def _decode_mixed(qtypes, blocks, codes):
    if codes.ndim == 0:  # one layer (inside the layer scan): run only its type's decoder
        return jax.lax.switch(codes, [functools.partial(decode, t) for t in qtypes], blocks)
    flat = jax.vmap(functools.partial(_decode_mixed, qtypes))(
        blocks.reshape(-1, *blocks.shape[codes.ndim:]), codes.reshape(-1))
    return flat.reshape(*codes.shape, *flat.shape[1:])


def dequantize(w, dtype=None):
    """The dense weight a QuantizedWeight stands for, in the decoder's layout and `dtype` (default: the weight's
    dtype); any other array passes through (cast when dtype is given)."""
    if not is_quantized(w):
        return w if dtype is None else jnp.asarray(w, dtype)
    return _dequantize(w, jnp.dtype(dtype or w.dtype).name)


@functools.partial(jax.jit, static_argnums=1)  # one compiled computation, also when called eagerly
def _dequantize(w: QuantizedWeight, dtype: str):
    rows = decode(w.qtypes[0], w.blocks) if w.codes is None else _decode_mixed(w.qtypes, w.blocks, w.codes)
    if w.transposed:
        rows = jnp.swapaxes(rows, -1, -2)
    return rows.reshape(*w.blocks.shape[:-3], *w.dense_shape).astype(dtype)


def einsum(spec: str, x, w, **kw):
    """jnp.einsum(spec, x, w) where w may be a QuantizedWeight: dequantized inside the traced computation, so a
    jitted caller never holds the dense weight beyond the fused matmul that reads it. (A Pallas kernel would
    slot in here; none is used until one measures faster than XLA's fusion.)"""
    return jnp.einsum(spec, x, dequantize(w), **kw)


HEAD_CHUNK_ROWS = 8192  # vocabulary rows of a quantized output layer dequantized at a time (project)


def head(w):
    """An embedding [V, D] as the output layer [D, V] (a tied model's lm_head): the transpose, or for a quantized
    one the same blocks viewed transposed (nothing is dequantized)."""
    if not is_quantized(w):
        return w.T
    if w.transposed or w.blocks.ndim != 3:
        raise ValueError(f"head needs an unstacked [V, D] embedding, got {w.shape} (transposed={w.transposed})")
    return w.replace(transposed=True, dense_shape=tuple(reversed(w.dense_shape)))


def project(h, head_DxV, chunk_rows: int = HEAD_CHUNK_ROWS):
    """float32 logits h [..., D] @ head [D, V] (inputs in their dtype, float32 accumulation). A quantized head
    (its blocks: one file row per vocabulary entry) is dequantized chunk_rows vocabulary rows at a time inside a
    loop that writes each slice's logits into place, so its dense [D, V] never exists whole: an output layer is
    the largest matrix of a model (e.g. Qwen2-7B's 152064 x 3584, 1.1 GB in bfloat16 against 0.3 GB in Q4_K)."""
    if not is_quantized(head_DxV):
        return jnp.einsum("...D,DV->...V", h, head_DxV, preferred_element_type=jnp.float32)
    w = head_DxV
    if not w.transposed or w.blocks.ndim != 3 or w.codes is not None:
        raise ValueError(f"project needs an unstacked [D, V] output layer of one type, got {w.qtypes} {w.shape}")

    @jax.checkpoint  # a gradient recomputes the rows: no [n, chunk_rows, D] stack of them is kept as residuals
    def part(b_RxNBxS):  # [..., R] logits of R vocabulary rows
        rows = decode(w.qtypes[0], b_RxNBxS).astype(w.dtype)  # [R, D]
        return jnp.einsum("...D,VD->...V", h, rows, preferred_element_type=jnp.float32)

    v = w.blocks.shape[0]
    if v <= chunk_rows:
        return part(w.blocks)

    def write(i, out):  # chunk i's logits into place; the last chunk starts at V - chunk_rows (overlap rewritten)
        start = jnp.minimum(i * chunk_rows, v - chunk_rows)
        rows = jax.lax.dynamic_slice_in_dim(w.blocks, start, chunk_rows)  # read in place, not copied
        return jax.lax.dynamic_update_slice_in_dim(out, part(rows), start, axis=out.ndim - 1)
    return jax.lax.fori_loop(0, -(-v // chunk_rows), write, jnp.zeros((*h.shape[:-1], v), jnp.float32))


def take(w, ids):
    """Rows `ids` of an embedding [V, D] (jnp.take(w, ids, axis=0)); quantized: only those rows' blocks are
    decoded."""
    if not is_quantized(w):
        return jnp.take(w, ids, axis=0)
    if w.transposed or w.blocks.ndim != 3 or w.codes is not None:
        raise ValueError(f"take needs an unstacked [V, D] embedding of one type, got {w.qtypes} {w.shape}")
    return _take(w, ids)


@jax.jit
def _take(w: QuantizedWeight, ids):
    return decode(w.qtypes[0], jnp.take(w.blocks, ids, axis=0)).astype(w.dtype)


def truncate(w, n: int, axis: int):
    """w cut to its first n entries along `axis` (a 2-D weight); quantized: along the file's rows only (the
    vocabulary axis of embed [V, D] and lm_head [D, V])."""
    if not is_quantized(w):
        return jax.lax.slice_in_dim(w, 0, n, axis=axis)
    if w.blocks.ndim != 3 or axis % 2 != int(w.transposed):
        raise ValueError(f"a quantized {w.shape} weight can be cut along its file rows only (axis "
                         f"{int(w.transposed)}), not axis {axis}")
    shape = (w.dense_shape[0], n) if w.transposed else (n, w.dense_shape[1])
    return w.replace(blocks=w.blocks[:n], dense_shape=shape)


def dequantize_tree(params, dtype=None):
    """params with every QuantizedWeight dequantized (e.g. a dense student cut from a quantized teacher)."""
    return jax.tree_util.tree_map(lambda x: dequantize(x, dtype), params, is_leaf=is_quantized)


def nbytes(params) -> int:
    """Bytes the params occupy (packed bytes for quantized leaves)."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------------------------- loading

class _Packed:
    """One file matrix's blocks [R, NB, S] (host), before the layers are stacked."""

    def __init__(self, qtype: str, blocks: np.ndarray):
        self.qtype, self.blocks = qtype, blocks


def _finite_scales(qtype: str, blocks: np.ndarray) -> bool:
    """Every fp16 scale / min finite: then every value is (a finite scale times a small integer, plus a min)."""
    return all(np.isfinite(np.ascontiguousarray(blocks[..., o:o + 2]).view(np.float16)).all()
               for o in _FP16_FIELDS[qtype])


def _read(f: gguf_w.GGUFFile, cfg, name: str, leaf: str, allow_nonfinite: bool) -> dict:
    """One file tensor -> {our part: float32 array in our layout, or _Packed blocks in the file's row order}."""
    qtype, shape, start, n_bytes = f.tensors[name]
    keep = qtype.name in QTYPES and leaf in _TRANSPOSED | {"qkv": True, "gate_up": True} and len(shape) == 2
    if keep:
        w = f.data[start:start + n_bytes].reshape(shape[0], -1, block_size(qtype.name)[1])
        if not allow_nonfinite and not _finite_scales(qtype.name, w):
            with np.errstate(invalid="ignore", over="ignore"):
                common.check_finite(f.path, name, f.read(name))  # names the first bad value
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            w = f.read(name)
        if not allow_nonfinite:
            common.check_finite(f.path, name, w)
    if names.gguf_permutes_qk(cfg.family) and name.endswith(("attn_q.weight", "attn_k.weight")):
        w = gguf_w.unpermute_qk(w, cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)  # whole rows of blocks
    parts = names.split_fused(cfg, leaf, w)
    if keep:
        return {p: _Packed(qtype.name, np.ascontiguousarray(b)) for p, b in parts.items()}
    return {p: names.to_ours(cfg, p, b, names.GGUF) for p, b in parts.items()}


def _dense_shape(cfg, part: str, rows: int, cols: int) -> tuple[int, ...]:
    shape = jax.eval_shape(lambda w: names.to_ours(cfg, part, w, names.GGUF), jax.ShapeDtypeStruct((rows, cols),
                                                                                                   jnp.float32))
    return tuple(shape.shape)


def _host_dense(cfg, part: str, p: _Packed) -> np.ndarray:
    rows = gguf.quants.dequantize(p.blocks.reshape(p.blocks.shape[0], -1), gguf.GGMLQuantizationType[p.qtype])
    return names.to_ours(cfg, part, rows, names.GGUF)


def _put(x: np.ndarray, path: str, shardings):
    """A host array onto the device: whole, or (shardings: sharding.loader_shardings) straight into this process's
    shards of it, each device receiving only its slice."""
    if shardings is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, shardings(path, x.shape), lambda index: x[index])


def _leaf(cfg, part: str, values: list, dtype, stacked: bool, shardings=None):
    """The param of one part from its per-layer values: dense, or a QuantizedWeight (one type, or types of one
    block size padded to the widest with per-layer codes), or dense again when the layers' block sizes differ."""
    path = f"layers/{part}" if stacked else part
    qtypes = sorted({v.qtype for v in values if isinstance(v, _Packed)})
    one_size = qtypes and all(isinstance(v, _Packed) for v in values) \
        and len({block_size(t)[0] for t in qtypes}) == 1
    if not one_size:
        dense = [_host_dense(cfg, part, v) if isinstance(v, _Packed) else v for v in values]
        return _put(np.asarray(np.stack(dense) if stacked else dense[0], dtype), path, shardings)
    width = max(block_size(t)[1] for t in qtypes)
    rows, nb = values[0].blocks.shape[:2]
    blocks = np.zeros((len(values), rows, nb, width), np.uint8)
    for i, v in enumerate(values):
        blocks[i, ..., :v.blocks.shape[-1]] = v.blocks
    codes = None if len(qtypes) == 1 else np.asarray([qtypes.index(v.qtype) for v in values], np.int32)
    shape = _dense_shape(cfg, part, rows, nb * block_size(qtypes[0])[0])
    return QuantizedWeight(_put(blocks if stacked else blocks[0], f"{path}/blocks", shardings),
                           None if codes is None else _put(codes if stacked else codes[0], f"{path}/codes",
                                                           shardings),
                           tuple(qtypes), shape, _TRANSPOSED[part], jnp.dtype(dtype).name)


def load_gguf(path, dtype=jnp.float32, allow_nonfinite: bool = False, shardings=None):
    """gguf.load_gguf's (config, params, file) with the quantized matrices kept as QuantizedWeight leaves.
    shardings (sharding.loader_shardings): each leaf, packed blocks included (split on their file rows), goes
    straight into its shards as it is read, one file entry (every layer of one matrix) at a time: peak host
    memory is about one stacked packed tensor, never the model, and no device holds more than its shards."""
    f = gguf_w.GGUFFile(path)
    gguf_checks.check_metadata(f)
    cfg = gguf_w.config_from_gguf(f)
    common.check_tensors(f.path, cfg, names.GGUF, f.shapes())
    params: dict = {"layers": {}}
    for entry in names.entries(cfg):
        leaf = entry.ours.split("/")[-1]
        layers = range(cfg.n_layers) if entry.per_layer else [None]
        values: dict[str, list] = {}
        for i in layers:
            for part, w in _read(f, cfg, names.file_name(entry, names.GGUF, i), leaf, allow_nonfinite).items():
                values.setdefault(part, []).append(w)
        for part, vs in values.items():
            (params["layers"] if entry.per_layer else params)[part] = _leaf(cfg, part, vs, dtype, entry.per_layer,
                                                                            shardings)
    return cfg, params, f


def file_tensor_bytes(f: gguf_w.GGUFFile) -> int:
    """The bytes of every tensor's data in a GGUF file (unpadded)."""
    return int(sum(t[3] for t in f.tensors.values()))


def dense_bytes(params, dtype=jnp.float32) -> int:
    """Bytes params would occupy dense in `dtype` (quantized leaves counted by their dense shape)."""
    return int(sum(math.prod(x.shape) * jnp.dtype(dtype).itemsize
                   for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized)))


def requantize_gguf(src, dst, qtype: str) -> pathlib.Path:
    """A copy of GGUF file `src` at `dst` whose quantized tensors are re-quantized to `qtype` by gguf.quants (a
    type it can quantize: Q4_0, Q4_1, Q8_0, ...); metadata and F32 / F16 tensors copied as they are. Written to
    dst + ".tmp", then renamed: dst is complete or absent. (Each requantization loses precision: for
    benchmarks and a smaller teacher, not for parity.)"""
    src, dst, target = pathlib.Path(src), pathlib.Path(dst), gguf.GGMLQuantizationType[qtype]
    gguf_w.GGUFFile(src)  # the strict reader's checks first
    reader = gguf.GGUFReader(src)
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch=str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        value = field.contents() if field.name != "general.file_type" else gguf.LlamaFileType[f"MOSTLY_{qtype}"]
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # [out, in]
        if t.tensor_type.name in (*QTYPES, "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K"):
            data = gguf.quants.quantize(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), target)
            writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=target)
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return dst

