"""Self-checks of tests/fixtures.py, independent of so8t_jax.

The oracle is transformers (PyTorch CPU): its own GGUF loader is exact for llama, qwen2 and plain phi3, so
those files must give the HF folder's logits. For phi3 LongRoPE and gemma3 it drops information the file
carries (see DESIGN.md section 2), so those are checked tensor by tensor, and by running transformers on the
GGUF's tensors with the HF folder's own config.
"""

import math

import gguf
import numpy as np
import pytest
import torch
import transformers
from fixtures import (
    CHATML_TEMPLATE,
    KQUANT_OVERRIDES,
    build_tokenizer,
    make_hf_model,
    quantize,
    supported_qtypes,
    write_gguf,
)

SAMPLE = "Hello world! こんにちは、世界。 12 + 30 = 42\n  def f(x):\treturn x <|im_end|>"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fixtures")


_MODELS: dict = {}


def _model(workdir, family, **overrides):
    key = (family, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        name = family + ("_k" if overrides else "")
        _MODELS[key] = make_hf_model(family, workdir / "hf" / name, **overrides)
    return _MODELS[key]


def _gguf(workdir, family, qtype, **overrides):
    folder = _model(workdir, family, **overrides)
    out = workdir / "gguf" / f"{folder.name}-{qtype}.gguf"
    if not out.exists():
        write_gguf(folder, out, qtype)
    return out


def _ids(n=2, t=24):
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, 400, (n, t), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _hf_logits(folder, ids):
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return _logits(m, ids)


def _gguf_logits(path, ids, config=None):
    kw = {"config": config} if config is not None else {}
    m = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **kw
    ).eval()
    return _logits(m, ids)


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_is_deterministic_and_chatml():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert 300 <= len(a) <= 512
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (0, 1, 2)
    ids = a(SAMPLE).input_ids
    assert ids[0] != a.bos_token_id and ids[-1] == a.eos_token_id  # no BOS added; <|im_end|> kept whole
    assert a.decode(ids) == SAMPLE
    text = a.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma3"])
def test_gguf_tokenizer_matches_hf(workdir, family):
    path = _gguf(workdir, family, "Q8_0")
    hf = transformers.AutoTokenizer.from_pretrained(_model(workdir, family))
    gg = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert gg(SAMPLE).input_ids == hf(SAMPLE).input_ids
    assert gg.decode(gg(SAMPLE).input_ids) == SAMPLE
    assert (gg.bos_token, gg.eos_token, gg.pad_token) == (hf.bos_token, hf.eos_token, hf.pad_token)
    assert gg.chat_template == CHATML_TEMPLATE
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert gg.apply_chat_template(msgs, add_generation_prompt=True) == hf.apply_chat_template(
        msgs, add_generation_prompt=True
    )
    if family != "gemma3":  # transformers picks GemmaTokenizer for gemma3 files, which adds a <mask> token
        assert len(gg) == len(hf)


# ------------------------------------------------------------------------------------------ quantizers


def test_supported_qtypes():
    q = supported_qtypes()
    for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"):
        assert t in q


def _rel_err(x, qtype):
    raw = quantize(x, qtype)
    gtype = gguf.GGMLQuantizationType[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[gtype]
    assert raw.dtype == np.uint8 and raw.shape == (*x.shape[:-1], x.shape[-1] // block * type_size)
    back = gguf.quants.dequantize(raw, gtype)
    assert back.shape == x.shape
    return float(np.sqrt(((back - x) ** 2).mean() / (x**2).mean()))


def test_quantizers_round_trip_through_gguf_dequantize():
    rng = np.random.default_rng(0)
    # rows of varied scale and offset: exercises per-block scales and (for *_1 / K-quants) mins
    x = (rng.standard_normal((32, 512)) * np.exp(rng.standard_normal((32, 1))) + 0.3).astype(np.float32)
    err = {q: _rel_err(x, q) for q in ("Q8_0", "Q6_K", "Q5_0", "Q5_K", "Q4_0", "Q4_1", "Q4_K")}
    assert err["Q8_0"] < 0.01
    assert err["Q6_K"] < 0.025
    assert err["Q5_K"] < err["Q5_0"] * 1.05 and err["Q5_K"] < 0.05
    assert err["Q4_K"] < err["Q4_0"] * 1.05 and err["Q4_K"] < 0.1
    for q in ("Q4_K", "Q5_K", "Q6_K"):  # degenerate blocks stay finite and exact
        for data in (np.zeros((2, 256), np.float32), np.full((2, 256), -0.75, np.float32)):
            back = gguf.quants.dequantize(quantize(data, q), gguf.GGMLQuantizationType[q])
            np.testing.assert_allclose(back, data, atol=2e-3)
    with pytest.raises(gguf.QuantError):
        quantize(np.zeros((4, 64), np.float32), "Q4_K")


# ------------------------------------------------------------------------------------------ logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_f32_gguf_logits_equal_hf(workdir, family):
    ids = _ids()
    ref = _hf_logits(_model(workdir, family), ids)
    got = _gguf_logits(_gguf(workdir, family, "F32"), ids)
    assert float((got - ref).abs().max()) <= 1e-4


# qtype -> (bound on max |diff|, bound on rms(diff) / std(logits)); logits have std ~4. Measured with these
# seeds (llama / qwen2 / phi3): Q8_0 max 0.43 / 0.38 / 0.38, rel 0.019 / 0.017 / 0.018; Q4_0 max 8.0 / 5.1 /
# 6.9, rel 0.34 / 0.27 / 0.28. Errors of ~0.09 per 4-bit weight add up over ~10 matrices in a row.
_QUANT_TOL = {"Q8_0": (1.0, 0.05), "Q4_0": (12.0, 0.5)}


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_gguf_logits_close_to_hf(workdir, family, qtype):
    ids = _ids()
    ref = _hf_logits(_model(workdir, family), ids)
    got = _gguf_logits(_gguf(workdir, family, qtype), ids)
    max_tol, rel_tol = _QUANT_TOL[qtype]
    diff = got - ref
    assert float(diff.abs().max()) <= max_tol
    assert float(diff.pow(2).mean().sqrt() / ref.std()) <= rel_tol


# measured (llama, hidden 256): Q4_K max 5.9 rel 0.31; Q6_K max 1.6 rel 0.075
@pytest.mark.parametrize("qtype,max_tol,rel_tol", [("Q4_K", 12.0, 0.5), ("Q6_K", 3.0, 0.15)])
def test_kquant_gguf_logits_close_to_hf(workdir, qtype, max_tol, rel_tol):
    path = _gguf(workdir, "llama", qtype, **KQUANT_OVERRIDES)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert all(v == qtype for k, v in types.items() if not k.endswith("norm.weight")), types
    ids = _ids()
    ref = _hf_logits(_model(workdir, "llama", **KQUANT_OVERRIDES), ids)
    diff = _gguf_logits(path, ids) - ref
    assert float(diff.abs().max()) <= max_tol
    assert float(diff.pow(2).mean().sqrt() / ref.std()) <= rel_tol


@pytest.mark.parametrize("family", ["phi3_longrope", "gemma3"])
def test_gguf_weights_with_hf_config_equal_hf(workdir, family):
    """transformers' GGUF loader drops LongRoPE and gemma3's attention scale / local rope theta from the
    config, but reads the tensors right: with the HF folder's config the logits must match."""
    folder = _model(workdir, family)
    ids = _ids(t=40)  # longer than phi3's original context (16): long factors in use
    ref = _hf_logits(folder, ids)
    config = transformers.AutoConfig.from_pretrained(folder)
    got = _gguf_logits(_gguf(workdir, family, "F32"), ids, config=config)
    assert float((got - ref).abs().max()) <= 1e-4


# ------------------------------------------------------------------------------------------ layout


def _expected_names(family, n_layer):
    """GGUF name -> HF name, written out by hand from llama.cpp's tensor_mapping."""
    m = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if family in ("llama", "phi3", "phi3_longrope"):
        m["output.weight"] = "lm_head.weight"
    for i in range(n_layer):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        m[b + "attn_norm.weight"] = h + "input_layernorm.weight"
        m[b + "attn_output.weight"] = h + "self_attn.o_proj.weight"
        m[b + "ffn_down.weight"] = h + "mlp.down_proj.weight"
        if family.startswith("phi3"):
            m[b + "attn_qkv.weight"] = h + "self_attn.qkv_proj.weight"
            m[b + "ffn_up.weight"] = h + "mlp.gate_up_proj.weight"  # gate rows first, then up
        else:
            for g, p in (("q", "q"), ("k", "k"), ("v", "v")):
                m[b + f"attn_{g}.weight"] = h + f"self_attn.{p}_proj.weight"
            m[b + "ffn_gate.weight"] = h + "mlp.gate_proj.weight"
            m[b + "ffn_up.weight"] = h + "mlp.up_proj.weight"
        if family == "qwen2":
            for g in "qkv":
                m[b + f"attn_{g}.bias"] = h + f"self_attn.{g}_proj.bias"
        if family == "gemma3":
            m[b + "post_attention_norm.weight"] = h + "post_attention_layernorm.weight"
            m[b + "ffn_norm.weight"] = h + "pre_feedforward_layernorm.weight"
            m[b + "post_ffw_norm.weight"] = h + "post_feedforward_layernorm.weight"
            m[b + "attn_q_norm.weight"] = h + "self_attn.q_norm.weight"
            m[b + "attn_k_norm.weight"] = h + "self_attn.k_norm.weight"
        else:
            m[b + "ffn_norm.weight"] = h + "post_attention_layernorm.weight"
    return m


def _unpermute(w, n):
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "phi3_longrope", "gemma3"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_tensor_round_trip(workdir, family, qtype):
    from safetensors.numpy import load_file

    folder = _model(workdir, family)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    sd = load_file(str(folder / "model.safetensors"))
    reader = gguf.GGUFReader(_gguf(workdir, family, qtype))
    names = _expected_names(family, cfg.num_hidden_layers)
    got = {t.name: t for t in reader.tensors}
    extra = {"rope_factors_long.weight", "rope_factors_short.weight"} if family == "phi3_longrope" else set()
    assert set(got) == set(names) | extra

    for gname, hname in names.items():
        t = got[gname]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        ref = sd[hname].astype(np.float32)
        assert w.shape == ref.shape, gname  # dequantized 2-D tensors come out [out, in]
        if ref.ndim == 1 or gname.endswith("_norm.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, gname
        else:
            assert t.tensor_type.name == qtype, gname
        if family == "llama" and gname.endswith("attn_q.weight"):
            w = _unpermute(w, cfg.num_attention_heads)
        if family == "llama" and gname.endswith("attn_k.weight"):
            w = _unpermute(w, cfg.num_key_value_heads)
        if family == "gemma3" and gname.endswith("norm.weight"):
            w = w - 1.0
        if qtype == "F32" and family == "gemma3" and gname.endswith("norm.weight"):
            np.testing.assert_allclose(w, ref, atol=1e-6, rtol=0, err_msg=gname)  # (w + 1) - 1 in fp32
        elif qtype == "F32":
            np.testing.assert_array_equal(w, ref, err_msg=gname)
        else:
            np.testing.assert_allclose(w, ref, atol=float(np.abs(ref).max()) / 100, err_msg=gname)

    if family == "phi3_longrope":
        rope = cfg.rope_parameters
        for which in ("long", "short"):
            t = got[f"rope_factors_{which}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_allclose(np.asarray(t.data), rope[f"{which}_factor"], rtol=1e-6)


def _fields(path):
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


_COMMON_KEYS = {
    "general.architecture",
    "general.type",
    "general.name",
    "general.file_type",
    "general.quantization_version",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
}
_ARCH_KEYS = {
    "llama": {
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.freq_base",
        "attention.layer_norm_rms_epsilon",
        "attention.key_length",
        "attention.value_length",
        "vocab_size",
        "rope.dimension_count",
    },
    "qwen2": {
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.freq_base",
        "attention.layer_norm_rms_epsilon",
    },
    "phi3": {
        "context_length",
        "rope.scaling.original_context_length",
        "embedding_length",
        "feed_forward_length",
        "block_count",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.layer_norm_rms_epsilon",
        "rope.dimension_count",
        "rope.freq_base",
        "attention.sliding_window",
    },
    "gemma3": {
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.freq_base",
        "rope.freq_base_swa",
        "attention.layer_norm_rms_epsilon",
        "attention.key_length",
        "attention.value_length",
        "attention.sliding_window",
    },
}


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "phi3_longrope", "gemma3"])
def test_metadata_keys_and_values(workdir, family):
    folder = _model(workdir, family)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    f = _fields(_gguf(workdir, family, "Q8_0"))
    arch = {"phi3_longrope": "phi3"}.get(family, family)
    expected = {f"{arch}.{k}" for k in _ARCH_KEYS[arch]} | _COMMON_KEYS
    if family == "phi3_longrope":
        expected.add("phi3.rope.scaling.attn_factor")
    assert set(f) == expected
    assert f["general.architecture"] == arch
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert len(f["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert f["tokenizer.ggml.token_type"][:3] == [gguf.TokenType.CONTROL] * 3
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f[f"{arch}.block_count"] == cfg.num_hidden_layers
    assert f[f"{arch}.embedding_length"] == cfg.hidden_size
    assert f[f"{arch}.feed_forward_length"] == cfg.intermediate_size
    assert f[f"{arch}.attention.head_count"] == cfg.num_attention_heads
    assert f[f"{arch}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f[f"{arch}.context_length"] == cfg.max_position_embeddings
    assert math.isclose(f[f"{arch}.attention.layer_norm_rms_epsilon"], cfg.rms_norm_eps, rel_tol=1e-6)
    rope = cfg.rope_parameters
    if family == "gemma3":
        assert f["gemma3.rope.freq_base"] == rope["full_attention"]["rope_theta"] == 10000.0
        assert f["gemma3.rope.freq_base_swa"] == rope["sliding_attention"]["rope_theta"] == 100.0
        assert f["gemma3.attention.sliding_window"] == cfg.sliding_window == 4
        assert f["gemma3.attention.key_length"] == cfg.head_dim == 16 != cfg.query_pre_attn_scalar
        # no pattern key: llama.cpp's default (every 6th layer full) equals the HF layer_types
        assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    else:
        assert f[f"{arch}.rope.freq_base"] == rope["rope_theta"]
    if family == "phi3_longrope":
        assert f["phi3.context_length"] == 64 and f["phi3.rope.scaling.original_context_length"] == 16
        assert math.isclose(
            f["phi3.rope.scaling.attn_factor"], math.sqrt(1 + math.log(4) / math.log(16)), rel_tol=1e-6
        )
    if family == "llama":
        assert f["llama.rope.dimension_count"] == cfg.head_dim


def test_small_rows_fall_back_to_f16_and_files_are_deterministic(workdir):
    folder = _model(workdir, "qwen2")  # hidden 64: no row is a multiple of 256
    a = write_gguf(folder, workdir / "det" / "a" / "m.gguf", "Q4_K")
    b = write_gguf(folder, workdir / "det" / "b" / "m.gguf", "Q4_K")
    assert a.read_bytes() == b.read_bytes()
    r = gguf.GGUFReader(a)
    for t in r.tensors:
        want = "F32" if len(t.shape) == 1 else "F16"
        assert t.tensor_type.name == want, t.name
    assert _fields(a)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_S
    c = write_gguf(folder, workdir / "det" / "c" / "m.gguf", "Q6_K", fallback="llama-quantize")
    for t in gguf.GGUFReader(c).tensors:
        assert t.tensor_type.name == ("F32" if len(t.shape) == 1 else "Q8_0"), t.name


def test_gemma3_nondefault_layer_pattern_is_recorded(workdir):
    folder = make_hf_model("gemma3", workdir / "hf" / "gemma3_4l", num_hidden_layers=4)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    assert cfg.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    f = _fields(write_gguf(folder, workdir / "gguf" / "gemma3_4l.gguf", "F32"))
    assert f["gemma3.attention.sliding_window_pattern"] == [True, True, True, False]


def test_llama3_rope_scaling_is_written_as_rope_freqs(workdir):
    """Llama 3.x rope scaling goes into the file only as the rope_freqs tensor (theta_i / factor_i)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    folder = make_hf_model("llama", workdir / "hf" / "llama3rope", rope_parameters=rope)
    cfg = transformers.AutoConfig.from_pretrained(folder)
    path = write_gguf(folder, workdir / "gguf" / "llama3rope.gguf", "Q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    t = tensors["rope_freqs.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (10000.0 ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    np.testing.assert_allclose(np.asarray(t.data), (plain / inv_freq).numpy(), rtol=1e-5)
    assert not any(k.startswith("llama.rope.scaling") for k in _fields(path))
