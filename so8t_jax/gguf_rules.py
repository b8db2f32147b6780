"""llama.cpp's rules for a GGUF file (ggml/src/gguf.cpp's reader, as llama-model-loader reads a file: the
tensor infos, then every tensor's data inside the file), written apart from weights/gguf.py on purpose: the
fuzzer (fuzz.py) takes `walk` as the reference for which files may load, and the field map it returns of a
valid file as what to mutate."""
from __future__ import annotations

import dataclasses
import math
import struct

import gguf

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes


class Refused(Exception):
    """llama.cpp's reader would refuse the file (the reason)."""


@dataclasses.dataclass
class Layout:
    fields: list = dataclasses.field(default_factory=list)   # (offset, size, label, group) of integer fields
    strings: list = dataclasses.field(default_factory=list)  # (offset, length, label) of key / name / value bytes
    tensors: list = dataclasses.field(default_factory=list)  # (name, type, ne, start byte, n bytes, info offset)
    data_start: int = 0


def walk(data: bytes) -> Layout:
    """Parse `data` by llama.cpp's rules; Refused(why) where its reader refuses it. Every loop is bounded by the
    bytes left (each pass consumes some or stops)."""
    lay, size, pos = Layout(), len(data), 0

    def read(fmt, label, group=None):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise Refused(f"{label}: end of file at {pos}")
        value = struct.unpack_from(fmt, data, pos)[0]
        if group:
            lay.fields.append((pos, n, label, group))
        pos += n
        return value

    def string(label, record=True):
        nonlocal pos
        n = read("<Q", f"{label} length", "length" if record else None)
        if n > 1 << 30 or pos + n > size:
            raise Refused(f"{label}: {n} bytes")
        if record:
            lay.strings.append((pos, n, label))
        pos += n
        return data[pos - n:pos]

    if data[:4] != b"GGUF":
        raise Refused("magic")
    pos = 4
    version = read("<I", "version", "header")
    if version in (0, 1) or version & 0xFFFF == 0 or version > 3:
        raise Refused(f"version {version}")
    n_tensors, n_kv = read("<q", "tensor count", "header"), read("<q", "metadata count", "header")
    if n_tensors < 0 or n_kv < 0:
        raise Refused("negative count")
    kv: dict[bytes, tuple] = {}
    for _ in range(n_kv):
        key = string("key")
        if not key or key in kv:
            raise Refused(f"empty or duplicate key {key!r}")
        label = key.decode(errors="replace")
        vtype, n, is_array = read("<i", f"{label} type", "type"), 1, False
        if vtype == 9:
            vtype, n, is_array = read("<i", f"{label} item type", "type"), read("<Q", f"{label} count", "count"), True
            if n > 1 << 30:
                raise Refused(f"{label}: {n} items")
        if vtype == 8:
            if pos + 8 * n > size:
                raise Refused(f"{label}: {n} strings")
            value = [string(label, record=not is_array) for _ in range(n)]
        elif vtype in _SIZES:
            if pos + n * _SIZES[vtype] > size:
                raise Refused(f"{label}: {n} items")
            value = data[pos:pos + n * _SIZES[vtype]]
            if not is_array and vtype not in (6, 7, 12):
                lay.fields.append((pos, _SIZES[vtype], f"{label} value", "value"))
            pos += n * _SIZES[vtype]
        else:
            raise Refused(f"{label}: value type {vtype}")
        kv[key] = (vtype, is_array, value)
    alignment = 32
    if b"general.alignment" in kv:
        vtype, is_array, value = kv[b"general.alignment"]
        if vtype != 4 or is_array:
            raise Refused("general.alignment is not a uint32")
        alignment = struct.unpack("<I", value)[0]
        if alignment == 0 or alignment & (alignment - 1):
            raise Refused(f"alignment {alignment}")
    names = set()
    for _ in range(n_tensors):
        info_at = pos
        raw = string("tensor name")
        name = raw.decode(errors="replace")
        if len(raw) >= 64 or raw in names:
            raise Refused(f"tensor name {raw!r} too long or repeated")
        names.add(raw)
        n_dims = read("<I", f"{name} n_dims", "n_dims")
        if n_dims > 4:
            raise Refused(f"{name}: {n_dims} dims")
        ne = [read("<q", f"{name} dim {j}", "dim") for j in range(n_dims)] + [1] * (4 - n_dims)
        if min(ne) < 0 or (math.prod(ne) > 0 and any((2 ** 63 - 1) // ne[j] <= math.prod(ne[:j]) for j in (1, 2, 3))):
            raise Refused(f"{name}: dims {ne}")
        ttype = read("<i", f"{name} type", "ttype")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except ValueError:
            raise Refused(f"{name}: type {ttype}") from None
        if ne[0] % block:
            raise Refused(f"{name}: row {ne[0]} not in blocks of {block}")
        n_bytes = math.prod(ne) // block * type_size
        if n_bytes >= 2 ** 64:
            raise Refused(f"{name}: {n_bytes} bytes")
        offset = read("<Q", f"{name} offset", "offset")
        lay.tensors.append((name, ttype, tuple(ne[:n_dims]), offset, n_bytes, info_at))
    lay.data_start = -(-pos // alignment) * alignment if n_tensors else pos
    if lay.data_start > size:
        raise Refused("data section starts past the end of the file")
    expected = 0
    for k, (name, ttype, ne, offset, n_bytes, info_at) in enumerate(lay.tensors):
        if offset != expected:
            raise Refused(f"{name}: offset {offset}, expected {expected}")
        if lay.data_start + offset + n_bytes > size:  # llama-model-loader: "tensor data is not within file bounds"
            raise Refused(f"{name}: data past the end of the file")
        expected += -(-n_bytes // alignment) * alignment
        lay.tensors[k] = (name, ttype, ne, lay.data_start + offset, n_bytes, info_at)
    return lay
