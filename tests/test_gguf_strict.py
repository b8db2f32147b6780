"""GGUF validation as strict as llama.cpp's reader, one rule a test: a hand-made file that breaks exactly that
rule gets its own WeightsError (naming the file); metadata counts are bounded before any loop over them;
tensors holding NaN / inf are refused (GGUF and safetensors) unless allow_nonfinite; valid files load unchanged."""
import pathlib
import struct
import time

import gguf
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from fixtures import KQUANT_OVERRIDES, make_hf_model, write_gguf

import so8t_jax
from so8t_jax import build, defaults
from so8t_jax.loading import smollm2_gguf
from so8t_jax.weights import gguf_checks
from so8t_jax.weights.common import WeightsError
from so8t_jax.weights.export import export_hf
from so8t_jax.weights.gguf import GGUFFile

D, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 32, 2, 1, 16, 64, 8
F32, I32 = 0, 26


def _s(x) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def u32(key, v):
    return (key, 4, struct.pack("<I", v))


def f32(key, v):
    return (key, 6, struct.pack("<f", v))


def text(key, s):
    return (key, 8, _s(s))


def base_kv() -> list:
    return [text("general.architecture", "llama"), u32("llama.block_count", 1), u32("llama.context_length", 64),
            u32("llama.embedding_length", D), u32("llama.feed_forward_length", FFN),
            u32("llama.attention.head_count", HEADS), u32("llama.attention.head_count_kv", KV_HEADS),
            f32("llama.rope.freq_base", 10000.0), f32("llama.attention.layer_norm_rms_epsilon", 1e-5),
            u32("tokenizer.ggml.eos_token_id", 2)]


def base_tensors() -> list:
    """(name, array in HF layout): a 1-layer llama with tied embeddings, random values."""
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (VOCAB, D), "output_norm.weight": (D,), "blk.0.attn_norm.weight": (D,),
              "blk.0.attn_q.weight": (HEADS * HEAD_DIM, D), "blk.0.attn_k.weight": (KV_HEADS * HEAD_DIM, D),
              "blk.0.attn_v.weight": (KV_HEADS * HEAD_DIM, D), "blk.0.attn_output.weight": (D, HEADS * HEAD_DIM),
              "blk.0.ffn_norm.weight": (D,), "blk.0.ffn_gate.weight": (FFN, D), "blk.0.ffn_up.weight": (FFN, D),
              "blk.0.ffn_down.weight": (D, FFN)}
    return [(name, rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()]


def write(path, kv=None, tensors=None, alignment=32, infos=None, edit=None) -> pathlib.Path:
    """A GGUF file laid out as llama.cpp writes one: kv (key, type, payload bytes); tensors (name, F32 array) or
    infos (name, ne, type, raw bytes), data padded to `alignment`; edit(infos_as_dicts) may change an info's
    fields (offset, ne, type, name) after the layout is computed, to break exactly one rule."""
    kv = base_kv() if kv is None else kv
    if infos is None:
        infos = [(n, list(reversed(a.shape)), F32, a.astype("<f4").tobytes()) for n, a in (tensors or base_tensors())]
    data, rows = b"", []
    for name, ne, ttype, raw in infos:
        rows.append({"name": name, "ne": ne, "type": ttype, "offset": len(data)})
        data += raw + bytes(-len(raw) % alignment)
    if edit:
        edit(rows)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(rows), len(kv))
    head += b"".join(_s(k) + struct.pack("<I", t) + payload for k, t, payload in kv)
    for r in rows:
        head += _s(r["name"]) + struct.pack("<I", len(r["ne"])) + b"".join(struct.pack("<Q", x) for x in r["ne"])
        head += struct.pack("<IQ", r["type"], r["offset"])
    path = pathlib.Path(path)
    path.write_bytes(head + bytes(-len(head) % alignment) + data)
    return path


def refused(path, pattern):
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=pattern) as err:
        so8t_jax.load(path)
    assert str(path) in str(err.value) and time.perf_counter() - start < 2.0
    return err.value


def test_hand_made_file_loads_exactly(tmp_path):
    path = write(tmp_path / "ok.gguf")
    f = GGUFFile(path)
    for name, a in base_tensors():
        np.testing.assert_array_equal(f.read(name), a)
    m = so8t_jax.load(path)
    arrays = dict(base_tensors())
    np.testing.assert_array_equal(m.params["embed"], arrays["token_embd.weight"])
    np.testing.assert_array_equal(m.params["layers"]["down"][0], arrays["blk.0.ffn_down.weight"].T)
    np.testing.assert_array_equal(m.params["layers"]["mlp_norm"][0], arrays["blk.0.ffn_norm.weight"])


def test_alignment_64_loads_the_same_params(tmp_path):
    a = so8t_jax.load(write(tmp_path / "a.gguf"))
    b = so8t_jax.load(write(tmp_path / "b.gguf", kv=base_kv() + [u32("general.alignment", 64)], alignment=64))
    for x, y in zip(a.params["layers"].values(), b.params["layers"].values()):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------ the data section

def _set(k, **fields):
    return lambda rows: rows[k].update(fields)


LAYOUT = {
    "misaligned offset": (lambda r: r[3].update(offset=r[3]["offset"] + 4),
                          r"'blk\.0\.attn_q\.weight' has offset \d+, not a multiple of general\.alignment 32"),
    "gap": (lambda r: r[3].update(offset=r[3]["offset"] + 32), r"'blk\.0\.attn_q\.weight' .* leaves a gap of 32 bytes"),
    "overlap": (lambda r: r[3].update(offset=r[2]["offset"]),
                r"'blk\.0\.attn_q\.weight' has offset \d+ but must start at \d+.* overlaps .* by 128 bytes"),
    "infos not in data order": (lambda r: r.insert(0, r.pop(3)), r"'blk\.0\.attn_q\.weight' has offset \d+ but must "
                                                                 r"start at 0.* leaves a gap"),
    "first tensor not at 0": (lambda r: [x.update(offset=x["offset"] + 32) for x in r], r"leaves a gap of 32 bytes"),
}


@pytest.mark.parametrize("case", sorted(LAYOUT))
def test_tensor_layout_rules(tmp_path, case):
    edit, pattern = LAYOUT[case]
    refused(write(tmp_path / "bad.gguf", edit=edit), pattern)


def test_bytes_after_the_data_section(tmp_path):
    path = write(tmp_path / "bad.gguf")
    path.write_bytes(path.read_bytes() + bytes(32))
    refused(path, r"32 bytes after the data section")


def test_data_past_the_end_of_the_file(tmp_path):
    path = write(tmp_path / "bad.gguf")
    path.write_bytes(path.read_bytes()[:-64])
    refused(path, r"'blk\.0\.ffn_down\.weight' \(8192 bytes at offset \d+\) points past the end of the file")


def test_last_tensor_without_its_padding_still_loads(tmp_path):
    """llama.cpp's loader only needs each tensor's data inside the file: the last one's padding may be missing."""
    tensors = base_tensors() + [("extra.weight", np.arange(5, dtype=np.float32))]  # 20 bytes, padded to 32
    path = write(tmp_path / "short.gguf", tensors=tensors)
    path.write_bytes(path.read_bytes()[:-12])
    np.testing.assert_array_equal(GGUFFile(path).read("extra.weight"), np.arange(5))
    so8t_jax.load(path)


# ------------------------------------------------------------------------------------------ the tensor infos

INFOS = {
    "0 dims": (_set(1, ne=[]), r"'output_norm\.weight' has 0 dimensions \(1 to 4 allowed\)"),
    "5 dims": (_set(1, ne=[D, 1, 1, 1, 1]), r"'output_norm\.weight' has 5 dimensions"),
    "a dim of 0": (_set(1, ne=[0]), r"'output_norm\.weight' has dims \[0\]: each must be at least 1"),
    "a dim of 2^63": (_set(1, ne=[2 ** 63]), r"has dims \[9223372036854775808\]: each must be at least 1 and below"),
    "elements past int64": (_set(1, ne=[2 ** 32, 2 ** 32]), r"has 18446744073709551616 elements, more than int64"),
    "unknown type": (_set(1, type=4), r"'output_norm\.weight' has unknown tensor type 4"),
    "type gguf cannot dequantize": (_set(1, type=I32), r"'output_norm\.weight' has type I32, which gguf cannot"),
    "row not whole blocks": (_set(1, type=8, ne=[16]), r"of type Q8_0 has rows of 16 elements, not a multiple of its "
                                                       r"block size 32"),
    "duplicate tensor name": (_set(2, name="output_norm.weight"),
                              r"duplicate tensor name 'output_norm\.weight' \(tensor infos 1 and 2\)"),
    "64-byte tensor name": (_set(1, name="x" * 64), r"tensor name 1 at byte \d+ is 64 bytes long; llama\.cpp allows "
                                                    r"at most 63"),
}


@pytest.mark.parametrize("case", sorted(INFOS))
def test_tensor_info_rules(tmp_path, case):
    edit, pattern = INFOS[case]
    refused(write(tmp_path / "bad.gguf", edit=edit), pattern)


# ------------------------------------------------------------------------------------------ the metadata

HEADER = {
    "duplicate key": (base_kv() + [u32("llama.block_count", 1)], r"duplicate metadata key 'llama\.block_count'"),
    "empty key": (base_kv() + [u32("", 1)], r"empty metadata key at byte \d+"),
    "alignment not a power of two": (base_kv() + [u32("general.alignment", 48)], r"general\.alignment 48 is not a "
                                                                                 r"power of two"),
    "alignment 0": (base_kv() + [u32("general.alignment", 0)], r"general\.alignment 0 is not a power of two"),
    "alignment not uint32": (base_kv() + [("general.alignment", 10, struct.pack("<Q", 32))],
                             r"general\.alignment has GGUF value type 10; llama\.cpp requires uint32"),
}


@pytest.mark.parametrize("case", sorted(HEADER))
def test_header_rules(tmp_path, case):
    kv, pattern = HEADER[case]
    refused(write(tmp_path / "bad.gguf", kv=kv), pattern)


def _with(key, entry):
    return [e for e in base_kv() if e[0] != key] + [entry]


METADATA = {
    "block_count above the tensors": (u32("llama.block_count", 2 ** 32 - 1),
                                      r"'llama\.block_count' = 4294967295 is out of range: at least 1 and at most 11 "
                                      r"\(each layer has its own tensors"),
    "block_count 0": (u32("llama.block_count", 0), r"'llama\.block_count' = 0 is out of range"),
    "embedding_length other than token_embd's rows": (u32("llama.embedding_length", 16),
                                                      r"embedding_length = 16 but token_embd\.weight has rows of 32"),
    "head_count 0": (u32("llama.attention.head_count", 0), r"'llama\.attention\.head_count' = 0 is out of range"),
    "head_count above d_model": (u32("llama.attention.head_count", 33), r"head_count' = 33 .* at most 32"),
    "head_count_kv above head_count": (u32("llama.attention.head_count_kv", 3), r"head_count_kv' = 3 .* at most 2"),
    "rope dims above the head size": (u32("llama.rope.dimension_count", 4096), r"rope\.dimension_count' = 4096 .* "
                                                                               r"at most 32 \(the head size\)"),
    "vocab_size above the file's bytes": (u32("llama.vocab_size", 2 ** 31), r"vocab_size' = 2147483648 .* bytes"),
    "feed_forward_length above the values": (u32("llama.feed_forward_length", 2 ** 32 - 1),
                                             r"feed_forward_length' = 4294967295 .* hold \d+ values"),
    "expert_used_count above expert_count": (u32("llama.expert_used_count", 9), None),
    "embedding_length an array of strings": (("llama.embedding_length", 9, struct.pack("<IQ", 8, 1) + _s("32")),
                                             r"'llama\.embedding_length' must be an integer, got GGUF value type 9"),
    "context_length a string": (text("llama.context_length", "4096"),
                                r"'llama\.context_length' must be an integer, got GGUF value type 8"),
    "rope.freq_base NaN": (f32("llama.rope.freq_base", float("nan")),
                           r"'llama\.rope\.freq_base' = nan must be a finite number > 0"),
    "epsilon inf": (f32("llama.attention.layer_norm_rms_epsilon", float("inf")), r"epsilon' = inf must be a finite"),
    "token id a float": (f32("tokenizer.ggml.eos_token_id", 2.0), r"eos_token_id' must be an integer"),
    "rope scaling type an integer": (u32("llama.rope.scaling.type", 1), r"rope\.scaling\.type' must be a string"),
}


@pytest.mark.parametrize("case", sorted(METADATA))
def test_metadata_is_bounded_before_config(tmp_path, case):
    entry, pattern = METADATA[case]
    kv = _with(entry[0], entry)
    if case.startswith("expert_used"):
        kv, pattern = kv + [u32("llama.expert_count", 8)], r"expert_used_count' = 9 .* at most 8"
    refused(write(tmp_path / "bad.gguf", kv=kv), pattern)


CONFIG_KEYS = ["general.architecture", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
               "tokenizer.ggml.eot_token_id", "tokenizer.ggml.padding_token_id"] + [
    f"llama.{k}" for k in ("attention.head_count", "attention.head_count_kv", "attention.key_length",
                           "attention.layer_norm_rms_epsilon", "attention.sliding_window", "block_count",
                           "context_length", "embedding_length", "feed_forward_length", "rope.dimension_count",
                           "rope.freq_base", "rope.freq_base_swa", "rope.scaling.attn_factor", "rope.scaling.factor",
                           "rope.scaling.original_context_length", "rope.scaling.type", "vocab_size")]
VALUES = [(0, b"\x03"), (1, b"\xff"), (2, b"\x00\x00"), (3, b"\xff\xff"), (4, struct.pack("<I", 2 ** 32 - 1)),
          (5, struct.pack("<i", -5)), (6, struct.pack("<f", float("nan"))), (6, struct.pack("<f", 2.5)), (7, b"\x01"),
          (8, _s("x")), (10, struct.pack("<Q", 2 ** 63)), (11, struct.pack("<q", -1)),
          (12, struct.pack("<d", float("inf"))), (9, struct.pack("<IQII", 4, 2, 1, 2)),
          (9, struct.pack("<IQ", 8, 1) + _s("a")), (9, struct.pack("<IQ", 6, 0))]


def test_any_value_type_for_any_key_the_config_reads(tmp_path):
    """Every GGUF value type (scalars, strings, arrays) under every key config_from_gguf reads: a WeightsError
    naming the file or a model, never another exception (a string array once reached int() as a list)."""
    outcomes = set()
    for key in CONFIG_KEYS:
        for vtype, payload in VALUES:
            path = write(tmp_path / "t.gguf", kv=_with(key, (key, vtype, payload)))
            try:
                m = so8t_jax.load(path)
            except WeightsError as e:
                assert str(path) in str(e)
                outcomes.add("error")
            else:
                assert all(np.isfinite(np.asarray(x)).all() for x in m.params["layers"].values())
                outcomes.add("loaded")
    assert outcomes == {"error", "loaded"}


@pytest.mark.parametrize("values,pattern", [
    (np.ones(64, np.float32), r"has shape \(64,\): expected one dimension of at most 16"),
    (np.array([1.0] * 7 + [0.0], np.float32), r"must be finite and > 0"),
    (np.array([1.0] * 7 + [np.inf], np.float32), r"must be finite and > 0")])
def test_rope_factor_tensors(tmp_path, values, pattern):
    path = write(tmp_path / "bad.gguf", tensors=[("rope_freqs.weight", values)] + base_tensors())
    refused(path, r"'rope_freqs\.weight' \(rope frequency factors\) " + pattern)


@pytest.mark.parametrize("head,pattern", [
    (struct.pack("<Q", 2 ** 30 + 1), r"metadata key at byte 24 is 1073741825 bytes long; llama\.cpp allows at most "
                                     r"1073741824"),
    (_s("k") + struct.pack("<IIQ", 9, 0, 2 ** 30 + 1), r"'k' is an array of 1073741825 items; llama\.cpp allows at "
                                                      r"most 1073741824")])
def test_strings_and_arrays_over_one_gib(tmp_path, head, pattern):
    """llama.cpp's 2^30 limits, in sparse files of just over 1 GiB (nothing is written past the header)."""
    path = tmp_path / "big.gguf"
    with open(path, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + head)
        fh.truncate(2 ** 30 + 4096)
    refused(path, pattern)


# ------------------------------------------------------------------------------------------ non-finite values

def _nan_at(path, name, index=(1, 2)) -> pathlib.Path:
    arrays = dict(base_tensors())
    arrays[name][index] = np.nan
    return write(path, tensors=list(arrays.items()))


def test_nonfinite_tensor_is_refused_naming_it(tmp_path):
    path = _nan_at(tmp_path / "nan.gguf", "blk.0.ffn_up.weight")
    refused(path, r"tensor 'blk\.0\.ffn_up\.weight' holds 1 non-finite values \(NaN or inf; the first at index "
                  r"\(1, 2\)\).*allow_nonfinite=True")
    m = so8t_jax.load(path, allow_nonfinite=True)
    assert np.isnan(m.params["layers"]["up"][0, 2, 1]) and np.isfinite(m.params["layers"]["down"]).all()


def test_teacher_allow_nonfinite_reaches_the_loader(tmp_path):
    config = ml_collections.ConfigDict(defaults.get_config().to_dict())
    config.teacher.path = str(_nan_at(tmp_path / "nan.gguf", "token_embd.weight", (0, 0)))
    config.export.formats = ("hf",)  # the hand-made file has no tokenizer for a GGUF export
    assert config.teacher.allow_nonfinite is False
    with pytest.raises(WeightsError, match=r"'token_embd\.weight' holds 1 non-finite"):
        build.load_teacher(config)
    config.teacher.allow_nonfinite = True
    assert np.isnan(build.load_teacher(config)[1].params["embed"][0, 0])
    del config.teacher["allow_nonfinite"]  # a run saved before the key existed
    with pytest.raises(WeightsError, match="non-finite"):
        build.load_teacher(config)


def test_hf_folder_nonfinite_and_layer_count(tmp_path):
    m = so8t_jax.load(write(tmp_path / "ok.gguf"))
    folder = export_hf(m.config, m.params, None, tmp_path / "hf")
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 4] = -np.inf
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    err = refused(folder, r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' holds 1 non-finite values")
    assert err.path.endswith("model.safetensors")
    assert np.isneginf(so8t_jax.load(folder, allow_nonfinite=True).params["layers"]["up"][0, 4, 3])
    hp = (folder / "config.json").read_text().replace('"num_hidden_layers": 1', '"num_hidden_layers": 1000000000')
    (folder / "config.json").write_text(hp)
    refused(folder, r"the config claims 1000000000 layers but the file holds only \d+ tensors")


# ------------------------------------------------------------------------------------------ real files

@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q6_K"])
def test_fixture_files_read_as_gguf_py_reads_them(tmp_path, qtype):
    """Every tensor bitwise as gguf-py's own reader and dequantizer give it (an independent parse)."""
    folder = make_hf_model("llama", tmp_path / "hf", **(KQUANT_OVERRIDES if qtype == "Q6_K" else {}))
    path = write_gguf(folder, tmp_path / f"m.{qtype}.gguf", qtype)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.tensors[t.name][1])
        np.testing.assert_array_equal(ours.read(t.name), ref)
    assert ours.tensors["blk.0.attn_q.weight"][0].name == qtype


def test_smollm2_passes_every_rule():
    f = GGUFFile(smollm2_gguf())
    gguf_checks.check_metadata(f)
    assert len(f.tensors) == 272 and f.alignment == 32
