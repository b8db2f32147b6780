"""Export: config + params (+ tokenizer) -> a Hugging Face folder (transformers loads it) and a GGUF file
(llama.cpp loads it). The inverse of hf.py and gguf.py through the same name map (`names.to_file`).

What a format cannot carry is either folded into the weights where that is exact (an attention scale the
format fixes goes into q, or gemma3's q_norm) or raised as NotImplementedError naming the config field,
never written silently wrong. Files appear atomically: written under a temporary name, then renamed.
SO(8) gates are folded into o / down (so8t.fold_gates, exact) and the SO8T heads, which no format carries,
go beside the model as so8t_heads.safetensors (inside the HF folder; X.so8t_heads.safetensors beside X.gguf),
where `so8t_jax.load` finds them.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from so8t_jax import so8t
from so8t_jax.config import ModelConfig
from so8t_jax.weights import gguf_vocab, names
from so8t_jax.weights.hf import llama3_factors

_HF_ARCH = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("mistral", "MistralForCausalLM"),
            "qwen2": ("qwen2", "Qwen2ForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM"),
            "phi3": ("phi3", "Phi3ForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
_FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
_FILE_TYPE = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0"}


# ------------------------------------------------------------------------------------------------ shared

def _check_supported(cfg: ModelConfig) -> None:
    """Both formats describe a family by its architecture name: a config that differs from what the name
    implies cannot be written."""
    gemma = cfg.family == "gemma3"
    want = {"qk_norm": gemma or cfg.family == "qwen3", "post_norms": gemma, "embed_scale": gemma,
            "attn_bias": cfg.family == "qwen2",
            "activation": "gelu_tanh" if gemma else "silu"}
    bad = [f"{k}={getattr(cfg, k)!r}" for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.rope_local_theta is not None and not gemma:
        bad.append(f"rope_local_theta={cfg.rope_local_theta}")
    if cfg.rope_dim is not None and cfg.family != "phi3":
        bad.append(f"rope_dim={cfg.rope_dim}")
    if cfg.family == "phi3" and cfg.head_dim * cfg.n_heads != cfg.d_model:
        bad.append(f"head_dim={cfg.head_dim} (phi3 takes d_model / n_heads)")
    if any(cfg.is_sliding) and not (gemma or (cfg.family in ("phi3", "mistral") and all(cfg.is_sliding))):
        bad.append(f"sliding_layers={cfg.sliding_layers}")
    if bad:
        raise NotImplementedError(f"cannot export this {cfg.family} model: {', '.join(bad)} has no {cfg.family} "
                                  f"equivalent in the HF or GGUF formats")


def unsupported(cfg: ModelConfig) -> str | None:
    """Why a model of this config cannot be exported to the HF / GGUF formats, or None: the check a run makes
    on its student before training (never a NotImplementedError after hours of it)."""
    try:
        _check_supported(cfg)
        if _rope_kind(cfg) == "llama3":
            llama3_rope_scaling(cfg)
    except NotImplementedError as e:
        return str(e)
    return None


def _fold_query_scale(cfg: ModelConfig, params: dict, target: float) -> tuple[ModelConfig, dict]:
    """Move an attention scale the format cannot state into the queries (exact: rope is linear in q)."""
    ratio = cfg.scale / target
    if abs(ratio - 1.0) < 1e-12:
        return cfg, params
    keys = ("q_norm",) if cfg.qk_norm else ("q", "q_bias") if cfg.attn_bias else ("q",)
    layers = {**params["layers"], **{k: params["layers"][k] * ratio for k in keys}}
    return cfg.replace(query_scale=target if cfg.family == "gemma3" else None), {**params, "layers": layers}


def _rope_kind(cfg: ModelConfig) -> str:
    short, long = cfg.rope_factors_short, cfg.rope_factors_long
    if long is not None:
        if cfg.family != "phi3" or short is None or not cfg.rope_original_max:
            raise NotImplementedError("rope_factors_long (LongRoPE) is exported for phi3 only, together with "
                                      "rope_factors_short and rope_original_max")
        return "longrope"
    if cfg.rope_attn_factor != 1.0:
        raise NotImplementedError(f"rope_attn_factor={cfg.rope_attn_factor} is exported only with phi3 LongRoPE")
    if short is None or all(f == 1.0 for f in short):
        return "default"
    if len(set(short)) == 1:
        return "linear"
    if cfg.family == "llama":
        return "llama3"
    raise NotImplementedError(f"per-frequency rope_factors_short on {cfg.family} has no HF/GGUF equivalent")


def llama3_rope_scaling(cfg: ModelConfig) -> dict:
    """Llama 3 rope_scaling that reproduces cfg.rope_factors_short, or NotImplementedError.

    The divisors depend on (low, high, original) only through the line s(x) = a x - b in x = 1/wavelength,
    clipped to [0, 1] (0: divided by `factor`, 1: unscaled): fit a line, verify it, pick an integer original.
    """
    f = np.asarray(cfg.rope_factors_short, np.float64)
    rd = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    x, factor = inv_freq / (2 * math.pi), float(f.max())
    s = (1 / f - 1 / factor) / (1 - 1 / factor)
    mid = (s > 1e-6) & (s < 1 - 1e-6)
    points = [(x[s <= 1e-6].max(), 0.0)] + [(xi, si) for xi, si in zip(x[mid], s[mid])][:1] + \
        ([(x[s >= 1 - 1e-6].min(), 1.0)] if (s >= 1 - 1e-6).any() else [])
    lines = [(slope, -intercept) for slope, intercept in [np.polyfit(x[mid], s[mid], 1)]] if mid.sum() >= 2 else []
    lines += [((s1 - s0) / (x1 - x0), (s1 - s0) / (x1 - x0) * x0 - s0)  # through two points the divisors pin
              for i, (x0, s0) in enumerate(points) for x1, s1 in points[i + 1:] if x1 != x0]
    for a, b in lines:
        if a <= 0 or b <= 0:
            continue
        original = max(1, round(a / b))
        low, high = float(b * original / a), float((b + 1) * original / a)
        if np.allclose(llama3_factors(inv_freq, factor, low, high, original), f, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    raise NotImplementedError(f"rope_factors_short {tuple(cfg.rope_factors_short)} fit neither linear nor llama3 "
                              f"rope scaling: no HF config reproduces them")


def _longrope_attn(max_pos: float, original: int) -> float:
    return math.sqrt(1 + math.log(max_pos / original) / math.log(original)) if max_pos > original else 1.0


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF's rotate_half halves -> interleaved rotary pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def file_tensors(cfg: ModelConfig, params: dict, fmt: str):
    """(file name, float32 array in the file's layout) for every tensor, in name-map order."""
    host = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    for entry in names.entries(cfg):
        leaf = entry.ours.split("/")[-1]
        for i in range(cfg.n_layers) if entry.per_layer else [None]:
            parts = [names.to_file(cfg, p, host["layers"][p][i] if entry.per_layer else host[p], fmt)
                     for p in _FUSED.get(leaf, (leaf,))]
            w = np.concatenate(parts) if len(parts) > 1 else parts[0]
            if fmt == names.GGUF and names.gguf_permutes_qk(cfg.family) and leaf in ("q", "k"):
                w = permute_qk(w, cfg.n_heads if leaf == "q" else cfg.n_kv_heads)
            yield names.file_name(entry, fmt, i), np.ascontiguousarray(w)


# ------------------------------------------------------------------------------------------------ HF

def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers (legacy rope_theta/rope_scaling keys: transformers 4 and 5 read them)."""
    model_type, arch = _HF_ARCH[cfg.family]
    eos = list(cfg.eos_token_ids)
    hp = {"architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
          "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
          "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
          "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
          "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "pad_token_id": cfg.pad_token_id}
    kind = _rope_kind(cfg)
    if kind == "linear":
        hp["rope_scaling"] = {"rope_type": "linear", "type": "linear", "factor": cfg.rope_factors_short[0]}
    elif kind == "llama3":
        hp["rope_scaling"] = llama3_rope_scaling(cfg)
    elif kind == "longrope":
        # transformers and llama.cpp's converter derive the attention factor from max / original positions
        original, attn = cfg.rope_original_max, cfg.rope_attn_factor
        tries = [cfg.max_seq_len, round(original ** (attn * attn)) if attn > 1.0 else original]
        fits = [m for m in tries if math.isclose(_longrope_attn(m, original), attn, rel_tol=1e-6)]
        hp["max_position_embeddings"] = fits[0] if fits else cfg.max_seq_len
        hp["original_max_position_embeddings"] = original
        hp["rope_scaling"] = {"rope_type": "longrope", "type": "longrope",
                              "short_factor": list(cfg.rope_factors_short), "long_factor": list(cfg.rope_factors_long),
                              **({} if fits else {"attention_factor": attn})}
    if cfg.family != "gemma3":
        hp["hidden_act"] = "silu"
    if cfg.family == "llama":
        hp.update(attention_bias=False, mlp_bias=False)
    elif cfg.family == "mistral":
        hp.update(sliding_window=cfg.sliding_window if any(cfg.is_sliding) else None)
    elif cfg.family in ("qwen2", "qwen3"):
        hp.update(use_sliding_window=False, sliding_window=None)
        if cfg.family == "qwen3":
            hp.update(attention_bias=False)
    elif cfg.family == "phi3":
        del hp["head_dim"]
        hp.update(partial_rotary_factor=cfg.rotary_dim / cfg.head_dim,
                  sliding_window=cfg.sliding_window if any(cfg.is_sliding) else None)
    else:
        scalar = cfg.scale ** -2  # 1/sqrt(24) ** -2 is 24.000000000000004: keep the integer configs carry
        scalar = round(scalar) if math.isclose(scalar, round(scalar), rel_tol=1e-9) else scalar
        hp.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar,
                  sliding_window=cfg.sliding_window or 4096, final_logit_softcapping=None,
                  attn_logit_softcapping=None, rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta,
                  layer_types=["sliding_attention" if s else "full_attention" for s in cfg.is_sliding])
    return hp


def export_hf(cfg: ModelConfig, params: dict, tokenizer, out_dir, dtype=None) -> pathlib.Path:
    """A folder transformers' AutoModelForCausalLM loads: model.safetensors (the params' dtype unless `dtype`
    is given), config.json, generation_config.json and the tokenizer (when given)."""
    _check_supported(cfg)
    out = pathlib.Path(out_dir).absolute()
    params, heads = so8t.split_heads(so8t.fold_gates(cfg, params))
    cfg, params = _fold_query_scale(cfg, params, cfg.scale if cfg.family == "gemma3" else cfg.head_dim ** -0.5)
    hp = hf_config(cfg)
    out_dtype = np.dtype(jnp.dtype(dtype or jax.tree_util.tree_leaves(params)[0].dtype))
    tensors = {name: w.astype(out_dtype) for name, w in file_tensors(cfg, params, names.HF)}
    hp["dtype"] = hp["torch_dtype"] = out_dtype.name
    gen = {k: hp[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hp[k] is not None}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0o700 would travel with the rename
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors creates it 0o600
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if heads:
            so8t.save_heads(heads, so8t.heads_path(tmp))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hp, indent=2, sort_keys=True) + "\n")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():  # a folder cannot be replaced in one rename: move the old one aside first
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------ GGUF

def _gguf_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, kind: str, qtype: str) -> None:
    """Metadata keys as llama.cpp's convert_hf_to_gguf.py writes them (and gguf.py reads them)."""
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_file_type(gguf.LlamaFileType[_FILE_TYPE[qtype]])
    if names.GGUF_ARCH[cfg.family] == "llama":
        w.add_vocab_size(cfg.vocab_size)
    if cfg.family == "mistral" and any(cfg.is_sliding):
        # llama.cpp's llama arch has no sliding window (its converter drops Mistral's); the key keeps it for
        # so8t_jax.load, which reads a llama file with a window as mistral
        w.add_sliding_window(cfg.sliding_window)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_factors_short[0])
    if kind == "longrope":
        w.add_rope_scaling_orig_ctx_len(cfg.rope_original_max)
        w.add_rope_scaling_attn_factors(cfg.rope_attn_factor)
    if cfg.family == "phi3":
        w.add_sliding_window(cfg.sliding_window if any(cfg.is_sliding) else 0)
    if cfg.family == "gemma3":
        w.add_sliding_window(cfg.sliding_window or 4096)
        w.add_rope_freq_base_swa(cfg.rope_local_theta or cfg.rope_theta)
        if list(cfg.is_sliding) != [(i + 1) % 6 != 0 for i in range(cfg.n_layers)]:  # llama.cpp's default
            w.add_sliding_window_pattern(list(cfg.is_sliding))


def export_gguf(cfg: ModelConfig, params: dict, tokenizer, out_path, qtype: str = "F32",
                name: str | None = None) -> pathlib.Path:
    """A GGUF file in llama.cpp's layout, quantized like a "pure" llama-quantize file: 1-D tensors F32, every
    2-D weight (token_embd and output too) `qtype`, F16 where a row length does not fit the type's blocks."""
    qtype = qtype.upper()
    if qtype not in _FILE_TYPE:
        raise ValueError(f"export_gguf: qtype {qtype!r} not supported; choose from {sorted(_FILE_TYPE)}")
    _check_supported(cfg)
    params, heads = so8t.split_heads(so8t.fold_gates(cfg, params))
    # llama.cpp's attention scale: 1/sqrt(key_length); gemma3 27B (62 layers): 1/sqrt(d_model / heads)
    fixed = (cfg.d_model / cfg.n_heads if cfg.family == "gemma3" and cfg.n_layers == 62 else cfg.head_dim) ** -0.5
    cfg, params = _fold_query_scale(cfg, params, fixed)
    kind = _rope_kind(cfg)
    out = pathlib.Path(out_path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), names.GGUF_ARCH[cfg.family])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        # llama.cpp applies phi3's rstrip of its chat markers only when general.name says phi3; not "mistral"
        # for mistral: transformers' GGUF reader would take that name for an architecture gguf-py lacks
        writer.add_name(name or (f"{out.stem} phi3" if cfg.family == "phi3" else out.stem))
        _gguf_hparams(writer, cfg, kind, qtype)
        if tokenizer is not None:
            gguf_vocab.add_tokenizer(writer, cfg, tokenizer)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        extra = []
        if kind == "llama3":
            extra = [("rope_freqs.weight", np.asarray(cfg.rope_factors_short, np.float32))]
        elif kind == "longrope":
            extra = [("rope_factors_long.weight", np.asarray(cfg.rope_factors_long, np.float32)),
                     ("rope_factors_short.weight", np.asarray(cfg.rope_factors_short, np.float32))]
        for tensor_name, data in [*extra, *file_tensors(cfg, params, names.GGUF)]:
            ttype = gguf.GGMLQuantizationType["F32" if data.ndim == 1 else qtype]
            try:
                raw = gguf.quants.quantize(data, ttype)
            except gguf.QuantError:  # row length not a multiple of the block size
                ttype = gguf.GGMLQuantizationType.F16
                raw = gguf.quants.quantize(data, ttype)
            writer.add_tensor(tensor_name, raw, raw_dtype=ttype)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    if heads:
        so8t.save_heads(heads, so8t.heads_path(out))
    else:  # a stale heads file from an earlier export would be read back with this model
        so8t.heads_path(out).unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------------------ both

def export(model_or_run_dir, out_dir, formats=("hf", "gguf"), qtype: str = "Q8_0") -> dict[str, pathlib.Path]:
    """Write OUT_DIR/hf/ and OUT_DIR/student-<qtype>.gguf from a loaded Model or anything `load` reads (a run
    folder means its student/). Returns {"hf": path, "gguf": path} for the formats written."""
    from so8t_jax.loading import CONVERTED_CONFIG, load  # loading imports the readers; import lazily

    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = set(formats) - {"hf", "gguf"}
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from ['gguf', 'hf']")
    m = model_or_run_dir
    if not hasattr(m, "params"):
        src = pathlib.Path(m)
        m = load(src / "student" if (src / "student" / CONVERTED_CONFIG).exists() else src)
    out, written = pathlib.Path(out_dir), {}
    if "hf" in formats:
        written["hf"] = export_hf(m.config, m.params, m.tokenizer, out / "hf")
    if "gguf" in formats:
        written["gguf"] = export_gguf(m.config, m.params, m.tokenizer, out / f"student-{qtype.upper()}.gguf", qtype)
    return written
