"""Hugging Face folders: config.json + safetensors (single file or sharded with an index) -> config, params."""
from __future__ import annotations

import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from so8t_jax.config import ConfigError, ModelConfig
from so8t_jax.so8t import HEADS_FILE
from so8t_jax.weights import common, names

_FAMILY = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
           "gemma3_text": "gemma3", "gemma3": "gemma3"}


def _rope_params(hp: dict) -> tuple[dict, dict | None]:
    """(global rope params, local rope params or None) from transformers 4 or 5 style config dicts."""
    rp = hp.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:  # gemma3 in transformers 5: one entry per layer type
        return dict(rp["full_attention"]), dict(rp.get("sliding_attention") or {})
    merged = dict(hp.get("rope_scaling") or {})
    merged.update(rp or {})
    merged.setdefault("rope_theta", hp.get("rope_theta", 10000.0))
    local = {"rope_theta": hp["rope_local_base_freq"]} if "rope_local_base_freq" in hp else None
    return merged, local


def llama3_factors(inv_freq: np.ndarray, factor, low_freq_factor, high_freq_factor, original_max) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rope scaling (what llama.cpp stores as rope_freqs)."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original_max / low_freq_factor, original_max / high_freq_factor
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid))


def _rope_fields(hp: dict, head_dim: int, rope_dim: int, path) -> dict:
    rope, local = _rope_params(hp)
    kind = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_theta": float(rope["rope_theta"])}
    if local is not None:
        out["rope_local_theta"] = float(local.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (out["rope_theta"] ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim))
    if kind == "default":
        return out
    if kind == "linear":
        out["rope_factors_short"] = (float(rope["factor"]),) * (rope_dim // 2)
    elif kind == "llama3":
        f = llama3_factors(inv_freq, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                           rope["original_max_position_embeddings"])
        out["rope_factors_short"] = tuple(float(x) for x in f)
    elif kind in ("longrope", "su"):
        original = hp.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        factor = hp["max_position_embeddings"] / original if "original_max_position_embeddings" in hp \
            else rope.get("factor", 1.0)
        attn = rope.get("attention_factor")
        if attn is None:
            attn = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
        out.update(rope_factors_short=tuple(map(float, rope["short_factor"])),
                   rope_factors_long=tuple(map(float, rope["long_factor"])),
                   rope_original_max=int(original), rope_attn_factor=float(attn))
    else:
        raise common.WeightsError(path, f"unsupported rope scaling type {kind!r}")
    return out


def config_from_hf(hp: dict, path="config.json") -> ModelConfig:
    if hp.get("model_type") == "gemma3" and "text_config" in hp:
        hp = {**hp["text_config"], "model_type": "gemma3_text"}
    family = _FAMILY.get(hp.get("model_type"))
    if family is None:
        raise common.WeightsError(path, f"unsupported architecture (model_type {hp.get('model_type')!r}); "
                                        f"supported: {sorted(_FAMILY)}")
    if hp.get("use_sliding_window") and family in ("qwen2", "qwen3"):
        raise common.WeightsError(path, f"{family} with use_sliding_window=True is not supported")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hp.get(key):
            raise common.WeightsError(path, f"{key}={hp[key]} is not supported")
    d, n = hp["hidden_size"], hp["num_attention_heads"]
    head_dim = hp.get("head_dim") or d // n
    rope_dim = int(head_dim * hp.get("partial_rotary_factor",
                                     (hp.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)))
    n_layers = hp["num_hidden_layers"]
    sliding, window = None, hp.get("sliding_window")
    if family == "gemma3":
        types = hp.get("layer_types") or [
            "full_attention" if (i + 1) % hp.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
            for i in range(n_layers)]
        sliding = tuple(t == "sliding_attention" for t in types)
    elif family in ("phi3", "mistral") and window:  # every layer slides (qwen's sliding_window is unused)
        sliding = (True,) * n_layers
    eos = hp.get("eos_token_id")
    act = hp.get("hidden_activation") or hp.get("hidden_act", "silu")
    try:
        return ModelConfig(
            family=family, vocab_size=hp["vocab_size"], d_model=d, n_layers=n_layers, n_heads=n,
            n_kv_heads=hp.get("num_key_value_heads") or n, head_dim=head_dim, ffn_dim=hp["intermediate_size"],
            norm_eps=hp.get("rms_norm_eps", 1e-6), activation="gelu_tanh" if "gelu" in act else "silu",
            tie_embeddings=bool(hp.get("tie_word_embeddings", family in ("gemma3",))),
            attn_bias=family == "qwen2" or bool(hp.get("attention_bias")), qk_norm=family in ("gemma3", "qwen3"),
            post_norms=family == "gemma3", embed_scale=family == "gemma3",
            query_scale=hp["query_pre_attn_scalar"] ** -0.5 if family == "gemma3" else None,
            rope_dim=rope_dim if rope_dim != head_dim else None,
            max_seq_len=hp.get("max_position_embeddings", 4096),
            sliding_window=window if sliding else None, sliding_layers=sliding,
            bos_token_id=hp.get("bos_token_id"), pad_token_id=hp.get("pad_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            **_rope_fields(hp, head_dim, rope_dim, path))
    except (ConfigError, KeyError, TypeError) as e:
        raise common.WeightsError(path, f"bad config: {e!r}") from e


def _shard_files(folder: pathlib.Path) -> list[pathlib.Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise common.WeightsError(index, f"not a safetensors index: {e}") from e
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(f for f in folder.glob("*.safetensors") if f.name != HEADS_FILE)  # SO8T heads: not the model
    if not files:
        raise common.WeightsError(folder, "no *.safetensors files (pickled .bin checkpoints are not loaded)")
    for f in files:
        if not f.exists():
            raise common.WeightsError(f, "shard listed in the index is missing")
    return files


def load_hf(folder, dtype=jnp.float32, allow_nonfinite: bool = False, shardings=None) -> tuple[ModelConfig, dict]:
    folder = pathlib.Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise common.WeightsError(folder, "no config.json: not a Hugging Face model folder")
    try:
        hp = json.loads(config_path.read_text())
    except ValueError as e:
        raise common.WeightsError(config_path, f"invalid JSON: {e}") from e
    cfg = config_from_hf(hp, config_path)
    gen = folder / "generation_config.json"
    if gen.exists():  # generation stops on every end id either file declares (Llama 3: <|eot_id|> is only here)
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (ValueError, AttributeError) as e:
            raise common.WeightsError(gen, f"invalid JSON: {e}") from e
        extra = [] if eos is None else eos if isinstance(eos, list) else [eos]
        cfg = cfg.replace(eos_token_ids=tuple(dict.fromkeys([*cfg.eos_token_ids, *map(int, extra)])))
    location, shapes, handles = {}, {}, {}
    try:
        for f in _shard_files(folder):
            handles[f] = h = safe_open(str(f), framework="np")
            for key in h.keys():
                location[key], shapes[key] = f, tuple(h.get_slice(key).get_shape())
    except common.WeightsError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise common.WeightsError(folder, f"cannot read safetensors: {e}") from e
    common.check_tensors(folder, cfg, names.HF, shapes)

    def read(name):
        w = handles[location[name]].get_tensor(name).astype(np.float32)
        if not allow_nonfinite:
            common.check_finite(location[name], name, w)
        return w

    return cfg, common.assemble(cfg, names.HF, read, dtype, shardings)
