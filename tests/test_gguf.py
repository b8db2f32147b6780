"""GGUF import: parity with transformers on files written in llama.cpp's layout, and bad input."""
import json
import pathlib
import struct
import subprocess
import sys
import time
import tracemalloc

import jax
import numpy as np
import pytest
import torch
from fixtures import KQUANT_OVERRIDES, make_hf_model, write_gguf
from transformers import AutoModelForCausalLM

import so8t_jax
from so8t_jax.loading import smollm2_gguf
from so8t_jax.weights.gguf import GGUFFile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tokens(vocab, batch=2, length=12, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, (batch, length))


def _torch_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor(tokens)).logits.numpy()


def _hf_gguf(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_src")
    out = {fam: make_hf_model(fam, root / fam) for fam in ("llama", "qwen2", "phi3", "phi3_longrope")}
    # the file cannot carry query_pre_attn_scalar: llama.cpp uses 1/sqrt(key_length), so match it here
    out["gemma3"] = make_hf_model("gemma3", root / "gemma3", query_pre_attn_scalar=16)
    out["gemma3_4layer"] = make_hf_model("gemma3", root / "gemma3_4", query_pre_attn_scalar=16,
                                         num_hidden_layers=4)
    out["llama_k"] = make_hf_model("llama", root / "llama_k", **KQUANT_OVERRIDES)
    out["llama3"] = make_hf_model("llama", root / "llama3", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_matches_transformers_on_same_gguf(hf_folders, tmp_path, family, qtype):
    path = write_gguf(hf_folders[family], tmp_path / f"{family}.{qtype}.gguf", qtype)
    m = so8t_jax.load(path)
    tokens = _tokens(m.config.vocab_size)
    ref = _torch_logits(_hf_gguf(path), tokens)
    np.testing.assert_allclose(np.asarray(m.logits(tokens)), ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quants_match_transformers(hf_folders, tmp_path, qtype):
    path = write_gguf(hf_folders["llama_k"], tmp_path / f"k.{qtype}.gguf", qtype)
    f = GGUFFile(path)
    assert f.tensors["blk.0.attn_q.weight"][0].name == qtype  # really K-quant data, not a fallback
    m = so8t_jax.load(path)
    tokens = _tokens(m.config.vocab_size)
    np.testing.assert_allclose(np.asarray(m.logits(tokens)), _torch_logits(_hf_gguf(path), tokens), atol=1e-3)


@pytest.mark.parametrize("name,length", [("phi3_longrope", 12), ("phi3_longrope", 24), ("gemma3", 13),
                                         ("gemma3_4layer", 13), ("llama3", 40)])
def test_matches_source_folder_where_transformers_gguf_is_unfaithful(hf_folders, tmp_path, name, length):
    """LongRoPE factors, gemma3's local rope/scale/pattern and llama-3 rope_freqs live only in the file:
    compare the GGUF import with transformers running the HF folder the file was written from."""
    path = write_gguf(hf_folders[name], tmp_path / f"{name}.gguf", "F32")
    m = so8t_jax.load(path)
    tokens = _tokens(m.config.vocab_size, length=length)
    hf = AutoModelForCausalLM.from_pretrained(hf_folders[name], dtype=torch.float32).eval()
    np.testing.assert_allclose(np.asarray(m.logits(tokens)), _torch_logits(hf, tokens), atol=1e-3, rtol=0)


def test_gguf_and_folder_give_same_params(hf_folders, tmp_path):
    path = write_gguf(hf_folders["gemma3"], tmp_path / "g.gguf", "F32")
    a, b = so8t_jax.load(path), so8t_jax.load(hf_folders["gemma3"])
    assert a.config.sliding_layers == b.config.sliding_layers and a.config.rope_local_theta == 100.0
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a.params, b.params)


def test_tokenizer_and_chat_template_from_file(hf_folders, tmp_path):
    path = write_gguf(hf_folders["qwen2"], tmp_path / "q.gguf", "Q8_0")
    tok = so8t_jax.load(path).tokenizer
    assert tok("知識蒸留 is fun")["input_ids"] == so8t_jax.load(hf_folders["qwen2"]).tokenizer(
        "知識蒸留 is fun")["input_ids"]
    assert "<|im_start|>" in tok.chat_template


def test_convert_then_load(hf_folders, tmp_path):
    path = write_gguf(hf_folders["llama"], tmp_path / "l.gguf", "Q4_0")
    out = so8t_jax.convert(path, tmp_path / "converted")
    a, b = so8t_jax.load(path), so8t_jax.load(out)
    assert a.config == b.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
    assert b.tokenizer("hello")["input_ids"] == a.tokenizer("hello")["input_ids"]


def test_describe_script(hf_folders, tmp_path):
    path = write_gguf(hf_folders["llama"], tmp_path / "l.gguf", "F32")
    res = subprocess.run([sys.executable, str(ROOT / "scripts/describe.py"), str(path), "--prompt", "Hello",
                          "--k", "3"], capture_output=True, text=True, check=True)
    info = json.loads(res.stdout)
    m = so8t_jax.load(path)
    ids = m.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                          return_dict=False)
    probs = np.asarray(jax.nn.softmax(m.logits(np.array([ids]))[0, -1]))
    assert info["num_params"] == m.num_params and info["config"]["family"] == "llama"
    assert [t["id"] for t in info["top_next_tokens"]] == list(np.argsort(-probs)[:3])
    np.testing.assert_allclose([t["prob"] for t in info["top_next_tokens"]], np.sort(probs)[::-1][:3], rtol=1e-5)


# ----------------------------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    return so8t_jax.load(path), _hf_gguf(path)


def test_smollm2_matches_transformers(smollm2):
    ours, hf = smollm2
    assert ours.config.n_layers == 30 and ours.config.d_model == 576 and ours.config.vocab_size == 49152
    assert ours.config.n_heads == 9 and ours.config.n_kv_heads == 3 and ours.config.tie_embeddings
    ids = ours.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        add_generation_prompt=True, return_dict=False)
    tokens = np.array([ids])
    got, ref = np.asarray(ours.logits(tokens)), _torch_logits(hf, tokens)
    assert np.abs(got - ref).max() <= 1e-3
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


# ----------------------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def good_file(hf_folders, tmp_path_factory):
    return write_gguf(hf_folders["llama"], tmp_path_factory.mktemp("bad") / "good.gguf", "Q8_0")


def _tensor_info_offset(data: bytes, name: str) -> int:
    """Byte offset just after a tensor's name in the tensor-info table."""
    needle = struct.pack("<Q", len(name)) + name.encode()
    pos = data.rfind(needle)
    assert pos > 0, name
    return pos + len(needle)


def _metadata_value_offset(data: bytes, key: str) -> int:
    needle = struct.pack("<Q", len(key)) + key.encode()
    pos = data.find(needle)
    assert pos > 0, key
    return pos + len(needle) + 4  # skip the value type


def _patched(good: pathlib.Path, tmp_path, edit) -> pathlib.Path:
    data = bytearray(good.read_bytes())
    data = edit(data) or data
    out = tmp_path / "bad.gguf"
    out.write_bytes(bytes(data))
    return out


def _set_u32_after_dims(data, name, value):
    off = _tensor_info_offset(bytes(data), name)
    n_dims = struct.unpack_from("<I", data, off)[0]
    struct.pack_into("<I", data, off + 4 + 8 * n_dims, value)


def _set_offset(data, name, value):
    off = _tensor_info_offset(bytes(data), name)
    n_dims = struct.unpack_from("<I", data, off)[0]
    struct.pack_into("<Q", data, off + 4 + 8 * n_dims + 4, value)


def _rename(data, old, new):
    assert len(old) == len(new)
    off = _tensor_info_offset(bytes(data), old)
    data[off - len(old):off] = new.encode()


def _set_meta_u32(data, key, value):
    struct.pack_into("<I", data, _metadata_value_offset(bytes(data), key), value)


BAD_CASES = {
    "truncated header": (lambda d: d[:100], r"truncated"),
    "truncated data": (lambda d: d[: len(d) - 1000], r"points past the end of the file"),
    "wrong magic": (lambda d: b"GGML" + d[4:], r"not a GGUF file"),
    "unknown tensor type": (lambda d: _set_u32_after_dims(d, "blk.1.ffn_up.weight", 77),
                            r"'blk\.1\.ffn_up\.weight' has unknown tensor type 77"),
    "type gguf cannot dequantize": (lambda d: _set_u32_after_dims(d, "output_norm.weight", 15),
                                    r"'output_norm\.weight' has type Q8_K, which gguf cannot dequantize"),
    "missing tensor": (lambda d: _rename(d, "blk.1.ffn_up.weight", "blk.1.ffn_xx.weight"),
                       r"missing tensor 'blk\.1\.ffn_up\.weight'"),
    "shape disagrees with metadata": (lambda d: _set_meta_u32(d, "llama.feed_forward_length", 96),
                                      r"'blk\.0\.ffn_\w+\.weight' has shape .* metadata implies"),
    "offset past the end": (lambda d: _set_offset(d, "blk.0.attn_q.weight", 1 << 40),
                            r"'blk\.0\.attn_q\.weight' .* points past the end of the file"),
    "huge metadata count": (lambda d: struct.pack_into("<Q", d, 16, 1 << 60), r"corrupt header"),
    "huge string length": (lambda d: struct.pack_into("<Q", d, 24, 1 << 50), r"truncated file"),
    "unsupported architecture": (
        lambda d: d.replace(struct.pack("<Q", 5) + b"llama", struct.pack("<Q", 5) + b"mamba", 1),
        r"unsupported architecture 'mamba'"),
    "version": (lambda d: struct.pack_into("<I", d, 4, 7), r"unsupported GGUF version 7"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_named_error_quickly(good_file, tmp_path, case):
    edit, pattern = BAD_CASES[case]
    bad = _patched(good_file, tmp_path, edit)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(so8t_jax.WeightsError, match=pattern) as err:
        so8t_jax.load(bad)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert str(bad) in str(err.value)
    assert elapsed < 2.0 and peak < 16 * 2**20, (elapsed, peak)


def test_missing_file(tmp_path):
    with pytest.raises(so8t_jax.WeightsError, match="no such file"):
        so8t_jax.load(tmp_path / "nope.gguf")
