"""The one weight-name map: our parameter names <-> Hugging Face names <-> GGUF (llama.cpp) names.

Import reads file tensors in HF layout ([out, in] matrices, as transformers stores them and as a dequantized
GGUF tensor comes out) and `to_ours` reshapes them into the decoder's layout; export applies `to_file`.
Format quirks that are not naming (llama.cpp's q/k row permutation) live in the format's own module.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from so8t_jax.config import ModelConfig

HF, GGUF = "hf", "gguf"

# GGUF architecture of each family: llama.cpp's converter writes Mistral models as "llama" (LlamaModel)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma3": "gemma3"}


def gguf_permutes_qk(family: str) -> bool:
    """llama.cpp's converter permutes q/k rows (rotate_half halves -> interleaved pairs) for its llama arch."""
    return GGUF_ARCH[family] == "llama"


@dataclasses.dataclass(frozen=True)
class Entry:
    ours: str          # e.g. "layers/q" (stacked over layers) or "embed"
    hf: str            # with {i} for the layer index
    gguf: str
    per_layer: bool = True


def _layer_entries(cfg: ModelConfig) -> list[Entry]:
    gemma = cfg.family == "gemma3"
    rows = [
        ("attn_norm", "input_layernorm.weight", "attn_norm.weight"),
        ("o", "self_attn.o_proj.weight", "attn_output.weight"),
        ("mlp_norm", "pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight",
         "ffn_norm.weight"),
        ("down", "mlp.down_proj.weight", "ffn_down.weight"),
    ]
    if cfg.family == "phi3":  # fused in both formats; split by `split_fused`
        rows += [("qkv", "self_attn.qkv_proj.weight", "attn_qkv.weight"),
                 ("gate_up", "mlp.gate_up_proj.weight", "ffn_up.weight")]
    else:
        rows += [("q", "self_attn.q_proj.weight", "attn_q.weight"),
                 ("k", "self_attn.k_proj.weight", "attn_k.weight"),
                 ("v", "self_attn.v_proj.weight", "attn_v.weight"),
                 ("gate", "mlp.gate_proj.weight", "ffn_gate.weight"),
                 ("up", "mlp.up_proj.weight", "ffn_up.weight")]
    if cfg.attn_bias:
        rows += [(f"{x}_bias", f"self_attn.{x}_proj.bias", f"attn_{x}.bias") for x in "qkv"]
    if cfg.qk_norm:
        rows += [(f"{x}_norm", f"self_attn.{x}_norm.weight", f"attn_{x}_norm.weight") for x in "qk"]
    if cfg.post_norms:
        rows += [("post_attn_norm", "post_attention_layernorm.weight", "post_attention_norm.weight"),
                 ("post_mlp_norm", "post_feedforward_layernorm.weight", "post_ffw_norm.weight")]
    return [Entry(f"layers/{o}", f"model.layers.{{i}}.{h}", f"blk.{{i}}.{g}") for o, h, g in rows]


def entries(cfg: ModelConfig) -> list[Entry]:
    out = [Entry("embed", "model.embed_tokens.weight", "token_embd.weight", False),
           Entry("final_norm", "model.norm.weight", "output_norm.weight", False)]
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head", "lm_head.weight", "output.weight", False))
    return out + _layer_entries(cfg)


def file_name(entry: Entry, fmt: str, layer: int | None = None) -> str:
    template = entry.hf if fmt == HF else entry.gguf
    return template.format(i=layer) if entry.per_layer else template


def hf_shape(cfg: ModelConfig, ours: str) -> tuple[int, ...]:
    """Shape of one layer's tensor in the files (HF layout) for our leaf name."""
    d, q, k, h, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    leaf = ours.split("/")[-1]
    return {"embed": (v, d), "lm_head": (v, d), "final_norm": (d,), "attn_norm": (d,), "mlp_norm": (d,),
            "post_attn_norm": (d,), "post_mlp_norm": (d,), "q": (q * h, d), "k": (k * h, d), "v": (k * h, d),
            "o": (d, q * h), "qkv": ((q + 2 * k) * h, d), "gate": (f, d), "up": (f, d), "gate_up": (2 * f, d),
            "down": (d, f), "q_bias": (q * h,), "k_bias": (k * h,), "v_bias": (k * h,), "q_norm": (h,),
            "k_norm": (h,)}[leaf]


def split_fused(cfg: ModelConfig, leaf: str, w: np.ndarray) -> dict[str, np.ndarray]:
    """phi3's fused tensors -> their parts (HF layout); other names pass through."""
    if leaf == "qkv":
        nq, nk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return {"q": w[:nq], "k": w[nq:nq + nk], "v": w[nq + nk:]}
    if leaf == "gate_up":
        return {"gate": w[:cfg.ffn_dim], "up": w[cfg.ffn_dim:]}
    return {leaf: w}


def _norm_offset(cfg: ModelConfig, fmt: str) -> float:
    # HF gemma stores w and multiplies by (1 + w); GGUF gemma3 files store 1 + w; we keep the multiplier.
    return 1.0 if (cfg.family == "gemma3" and fmt == HF) else 0.0


def to_ours(cfg: ModelConfig, leaf: str, w: np.ndarray, fmt: str) -> np.ndarray:
    """One tensor from HF layout into the decoder's layout (without the stacked layer axis)."""
    q, k, h, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    if leaf.endswith("norm"):
        return w + np.asarray(_norm_offset(cfg, fmt), w.dtype)
    if leaf == "q":
        return w.T.reshape(d, q, h)
    if leaf in ("k", "v"):
        return w.T.reshape(d, k, h)
    if leaf == "o":
        return w.T.reshape(q, h, d)
    if leaf in ("gate", "up", "down", "lm_head"):
        return w.T
    if leaf == "q_bias":
        return w.reshape(q, h)
    if leaf in ("k_bias", "v_bias"):
        return w.reshape(k, h)
    return w  # embed


def to_file(cfg: ModelConfig, leaf: str, w: np.ndarray, fmt: str) -> np.ndarray:
    """Inverse of `to_ours`: the decoder's layout back to HF layout."""
    if leaf.endswith("norm"):
        return w - np.asarray(_norm_offset(cfg, fmt), w.dtype)
    if leaf in ("q", "k", "v"):
        return w.reshape(cfg.d_model, -1).T
    if leaf == "o":
        return w.reshape(-1, cfg.d_model).T
    if leaf in ("gate", "up", "down", "lm_head"):
        return w.T
    if leaf.endswith("bias"):
        return w.reshape(-1)
    return w
