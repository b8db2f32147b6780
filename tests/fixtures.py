"""Test fixtures: tiny random Hugging Face models and GGUF files in llama.cpp's layout.

Not a test module. Tests import it (`from fixtures import make_hf_model, write_gguf`).

- `make_hf_model(family, folder, **overrides)` builds a tiny random transformers model (fp32, seeded) with
  a tiny byte-level BPE tokenizer (ChatML template) and saves both with save_pretrained.
- `write_gguf(hf_folder, out_path, qtype)` writes that folder as a GGUF file laid out as llama.cpp's
  convert_hf_to_gguf.py lays it out (tensor names, q/k permutation for llama, fused phi3 tensors, gemma's
  1 + w norms, LongRoPE factor tensors, metadata keys, tokenizer metadata), with the data quantized like a
  "pure" llama-quantize file of that type.

Everything is deterministic: the same arguments give byte-identical files (general.name is the HF
folder's name, so keep that the same too).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from typing import Any

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "phi3_longrope", "gemma3")

# Overrides that make every 2-D weight's rows a multiple of 256, so K-quants (Q4_K, Q5_K, Q6_K) apply to
# every matrix instead of falling back to F16. Use as make_hf_model(family, folder, **KQUANT_OVERRIDES).
KQUANT_OVERRIDES = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split. The GGUF says tokenizer.ggml.pre = "qwen2", which llama.cpp and
# transformers' GGUF tokenizer loader both map to this same regex, so all three tokenize alike.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A teacher model distills its knowledge into a student.",
    "Knowledge distillation trains a small student to match the teacher's distribution over tokens.",
    "What is 12 plus 30? The answer is 42. Let me think step by step: 12 + 30 = 42.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Please summarise the following text in one sentence, then answer the question.",
    "I can't help with that request, but here is some safe information instead.",
    "こんにちは、世界。今日はいい天気ですね。",
    "知識蒸留は大きな教師モデルから小さな生徒モデルへ知識を移す手法です。",
    "日本語の文章も英語の文章も同じトークナイザーで扱います。質問に答えてください。",
    "user assistant system: You are a helpful assistant. Hello! How are you today?",
]


# --------------------------------------------------------------------------------------------------
# tokenizer


@functools.cache
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 400):
    """A tiny deterministic byte-level BPE tokenizer (transformers PreTrainedTokenizerFast).

    Special tokens <|endoftext|> (0, pad), <|im_start|> (1, bos), <|im_end|> (2, eos); the 256 byte
    symbols next; merges learned on TOKENIZER_CORPUS (English and Japanese) fill the rest. No BOS is added
    on encode (like Qwen2 / SmolLM2); the chat template is ChatML.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


# --------------------------------------------------------------------------------------------------
# tiny random transformers models


def _base_config(family: str, vocab: int, ids: dict[str, int]) -> dict[str, Any]:
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        **ids,
    )
    if family == "llama":
        return dict(common, num_hidden_layers=2, head_dim=16, tie_word_embeddings=False, rope_theta=50000.0)
    if family == "mistral":  # sliding window 4: tests run past it
        return dict(common, num_hidden_layers=2, head_dim=16, tie_word_embeddings=False, sliding_window=4)
    if family == "qwen2":
        return dict(common, num_hidden_layers=2, tie_word_embeddings=True, rope_theta=1000000.0)
    if family == "qwen3":  # head_dim 24 != hidden / heads (16), GQA 4 -> 2, untied
        return dict(common, num_hidden_layers=2, head_dim=24, tie_word_embeddings=False, rope_theta=1000000.0,
                    attention_bias=False, use_sliding_window=False)
    if family == "phi3":
        return dict(common, num_hidden_layers=2, tie_word_embeddings=False, max_position_embeddings=64)
    if family == "phi3_longrope":
        # factors are filled in by make_hf_model (they need the seeded generator)
        return dict(
            common,
            num_hidden_layers=2,
            tie_word_embeddings=False,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
        )
    if family == "gemma3":
        # 6 layers: llama.cpp's gemma3 loader (no pattern key in the file) takes every 6th layer as full
        # attention, the others sliding; HF layer_types below say the same (5 sliding + 1 full).
        return dict(
            common,
            num_hidden_layers=6,
            head_dim=16,
            tie_word_embeddings=True,
            sliding_window=4,
            query_pre_attn_scalar=24,  # != head_dim (16)
            rope_theta=10000.0,
            rope_local_base_freq=100.0,  # != rope_theta
            hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _randomize_(model, family: str, gen) -> None:
    """Give every parameter a random, non-trivial value (transformers inits norms to 1 or 0, biases to 0,
    and weights with std 0.02, which would make parity tests nearly vacuous)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                if family == "gemma3":  # Gemma3RMSNorm scales by (1 + w)
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or name.startswith("lm_head"):
                # logits come out with a standard deviation of about 4 whatever the width
                p.copy_(4.0 / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def make_hf_model(family: str, folder, seed: int = 0, **overrides) -> pathlib.Path:
    """Build, randomise and save a tiny transformers model of `family` plus its tokenizer in `folder`.

    family: "llama" | "mistral" | "qwen2" | "qwen3" | "phi3" | "phi3_longrope" | "gemma3".
    overrides: config fields (e.g. hidden_size=256, num_hidden_layers=3, bos_token_id=..., vocab_size=...).
    A vocab_size larger than the tokenizer pads the vocabulary (rows no token uses), as Qwen2 does.
    Returns the folder (pathlib.Path).
    """
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    cfg = _base_config(family, len(tokenizer), ids)
    cfg.update(overrides)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    if family == "phi3_longrope" and "rope_scaling" not in overrides and "rope_parameters" not in overrides:
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        short = (1.0 + 3.0 * torch.rand(head_dim // 2, generator=gen)).tolist()
        long = (1.0 + 3.0 * torch.rand(head_dim // 2, generator=gen)).tolist()
        cfg["rope_scaling"] = {"type": "longrope", "short_factor": short, "long_factor": long}
    if family == "gemma3" and "layer_types" not in overrides:
        n = cfg["num_hidden_layers"]
        cfg["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
        if "full_attention" not in cfg["layer_types"]:  # fewer than 6 layers: make the last one full
            cfg["layer_types"][-1] = "full_attention"
    if family == "gemma3" and cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if family in ("phi3", "phi3_longrope"):
        cfg.pop("head_dim", None)  # Phi3 always uses hidden_size // num_attention_heads

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM),
        "phi3_longrope": (Phi3Config, Phi3ForCausalLM),
        "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    }[family]
    config = config_cls(**cfg)
    model = model_cls(config).to(torch.float32)
    _randomize_(model, family, gen)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# K-quant encoders (gguf-py can dequantize K-quants but not quantize them). Simple min/max encoders
# that produce valid ggml blocks; their output is checked against gguf.quants.dequantize in the tests.
# Not llama.cpp's error-minimising search, so values differ slightly from llama-quantize's.


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)


def _affine_subblocks(sub: np.ndarray, qmax: int):
    """sub: [n, 8, 32]. Returns d, dmin (f16 bytes), sc, m (uint8, 6-bit), q (uint8 in 0..qmax)."""
    mn = np.minimum(sub.min(axis=-1), 0.0)
    mx = sub.max(axis=-1)
    scale = (mx - mn) / qmax
    negmin = -mn
    d = _f16(scale.max(axis=-1) / 63.0)
    dmin = _f16(negmin.max(axis=-1) / 63.0)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(negmin, dmin[:, None])), 0, 63).astype(np.uint8)
    eff_scale = d[:, None] * sc
    eff_min = dmin[:, None] * m
    q = np.clip(np.rint(_safe_div(sub + eff_min[..., None], eff_scale[..., None])), 0, qmax).astype(np.uint8)
    return d, dmin, sc, m, q


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """12-byte packing of eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4 layout)."""
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _pack_nibbles_k(q: np.ndarray) -> np.ndarray:
    """q: [n, 8, 32] values 0..15 -> [n, 128]: byte 32*i + j = q[2i, j] | q[2i+1, j] << 4."""
    n = q.shape[0]
    q = q.reshape(n, 4, 2, 32)
    return (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, 128).astype(np.uint8)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin, sc, m, q = _affine_subblocks(blocks.reshape(n, 8, 32), 15)
    return np.concatenate(
        [
            d.astype(np.float16).view(np.uint8).reshape(n, 2),
            dmin.astype(np.float16).view(np.uint8).reshape(n, 2),
            _pack_k_scales(sc, m),
            _pack_nibbles_k(q),
        ],
        axis=1,
    )


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, dmin, sc, m, q = _affine_subblocks(blocks.reshape(n, 8, 32), 31)
    high = (q >> 4) & 1  # [n, 8, 32]: bit j of qh byte b is the high bit of sub-block j, element b
    qh = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):
        qh |= (high[:, j, :] << j).astype(np.uint8)
    return np.concatenate(
        [
            d.astype(np.float16).view(np.uint8).reshape(n, 2),
            dmin.astype(np.float16).view(np.uint8).reshape(n, 2),
            _pack_k_scales(sc, m),
            qh,
            _pack_nibbles_k(q & 15),
        ],
        axis=1,
    )


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31.0
    d = _f16(scale.max(axis=-1) / 127.0)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), 0, 127).astype(np.int8)
    eff = d[:, None] * sc.astype(np.float32)
    q = np.clip(np.rint(_safe_div(sub, eff[..., None])), -32, 31).astype(np.int16) + 32
    q = q.reshape(n, 256).astype(np.uint8)
    lo = (q & 15).reshape(n, 2, 2, 64)  # [half, nibble, byte]
    ql = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(n, 128)
    hi = (q >> 4).reshape(n, 2, 4, 32)  # [half, 2-bit slot, byte]
    qh = (hi[:, :, 0, :] | (hi[:, :, 1, :] << 2) | (hi[:, :, 2, :] << 4) | (hi[:, :, 3, :] << 6)).reshape(
        n, 64
    )
    return np.concatenate(
        [
            ql.astype(np.uint8),
            qh.astype(np.uint8),
            sc.view(np.uint8),
            d.astype(np.float16).view(np.uint8).reshape(n, 2),
        ],
        axis=1,
    )


_OWN_QUANTIZERS = {"Q4_K": _quantize_q4_k, "Q5_K": _quantize_q5_k, "Q6_K": _quantize_q6_k}


def quantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize a float array (rows innermost-last, HF layout) to ggml bytes of `qtype`.

    Uses gguf.quants.quantize where gguf-py implements the type, this module's K-quant encoders for
    Q4_K / Q5_K / Q6_K. Raises gguf.QuantError when a row length is not a multiple of the block size.
    """
    import gguf

    gtype = gguf.GGMLQuantizationType[qtype]
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype in _OWN_QUANTIZERS:
        block, type_size = gguf.GGML_QUANT_SIZES[gtype]
        if data.shape[-1] % block != 0:
            raise gguf.QuantError(f"Can't quantize tensor with shape {data.shape} to {qtype}")
        rows = data.reshape(-1, block)
        out = _OWN_QUANTIZERS[qtype](rows)
        assert out.shape[1] == type_size
        return out.reshape(*data.shape[:-1], data.shape[-1] // block * type_size)
    return gguf.quants.quantize(data, gtype)


def supported_qtypes() -> list[str]:
    """The ggml types write_gguf can produce with the installed gguf package (gguf-py's own quantizers,
    plus this module's K-quant encoders)."""
    import gguf

    out = []
    probe = np.linspace(-1.0, 1.0, 512, dtype=np.float32).reshape(2, 256)
    for t in gguf.GGMLQuantizationType:
        try:
            quantize(probe, t.name)
        except (NotImplementedError, gguf.QuantError, ValueError):  # no quantizer in gguf-py for this type
            pass
        else:
            out.append(t.name)
    return out


# llama.cpp's file type (general.file_type) for a "pure" file of each tensor type
_FILE_TYPE = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_K": "MOSTLY_Q4_K_S",
    "Q5_K": "MOSTLY_Q5_K_S",
    "Q6_K": "MOSTLY_Q6_K",
    "TQ1_0": "MOSTLY_TQ1_0",
    "TQ2_0": "MOSTLY_TQ2_0",
}


# llama-quantize's substitute for a row length the type cannot take (tensor_type_fallback in llama-quant.cpp)
_QUANTIZE_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0"}

# --------------------------------------------------------------------------------------------------
# GGUF writer

# the converter writes MistralForCausalLM as llama (LlamaModel: q/k permuted, no sliding-window key)
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
         "gemma3_text": "gemma3", "gemma3": "gemma3"}


def _rope_params(hp: dict) -> dict:
    """The rope parameters of a config.json, whichever spelling (rope_parameters in transformers 5,
    rope_scaling + rope_theta before)."""
    rp = hp.get("rope_parameters")
    if isinstance(rp, dict) and rp:
        return dict(rp)
    rp = dict(hp.get("rope_scaling") or {})
    if "type" in rp and "rope_type" not in rp:
        rp["rope_type"] = rp["type"]
    if "rope_theta" in hp:
        rp.setdefault("rope_theta", hp["rope_theta"])
    if "original_max_position_embeddings" in hp:
        rp.setdefault("original_max_position_embeddings", hp["original_max_position_embeddings"])
    if "rope_local_base_freq" in hp:
        rp = {"full_attention": rp, "sliding_attention": {"rope_theta": hp["rope_local_base_freq"]}}
    return rp


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp converter's q/k row permutation (n_head = heads for q, kv heads for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs.weight for Llama 3.x rope scaling
    (theta_i is divided by factor_i): 1 for short wavelengths, `factor` for long ones, a smooth
    interpolation between."""
    base = rope.get("rope_theta", 10000.0)
    factor = rope.get("factor", 8.0)
    lo, hi = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor, mid))
    return out.astype(np.float32)


def _load_state_dict(folder: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    sd: dict[str, np.ndarray] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _token_list(folder: pathlib.Path, vocab_size: int):
    """Tokens and token types in id order, as the converter's get_vocab_base builds them."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        tokens.append(t)
        if i in added:
            looks_special = t.startswith("<|") and t.endswith("|>")
            types.append(
                gguf.TokenType.CONTROL if (added[i].special or looks_special) else gguf.TokenType.USER_DEFINED
            )
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def write_gguf(hf_folder, out_path, qtype: str = "F32", fallback: str = "F16") -> pathlib.Path:
    """Write the HF folder made by make_hf_model as a GGUF file at out_path, in llama.cpp's layout.

    qtype: a ggml type name ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K",
    "Q5_K", "Q6_K", ...; see supported_qtypes()). Like a pure llama-quantize file: 1-D tensors (norms,
    biases, rope factors) and *_norm.weight stay F32; every 2-D weight (token_embd and output included)
    takes qtype. Where a row length is not a multiple of the type's block size:
    fallback="F16" writes F16 (the converter's rule); fallback="llama-quantize" first tries
    llama-quantize's substitute (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, TQ1_0/TQ2_0 -> Q4_0), then F16.
    """
    import gguf

    folder = pathlib.Path(hf_folder)
    out_path = pathlib.Path(out_path)
    hp = json.loads((folder / "config.json").read_text())
    model_type = hp["model_type"]
    if model_type not in _ARCH:
        raise ValueError(f"{folder}: unsupported model_type {model_type!r}")
    arch = _ARCH[model_type]
    qtype = qtype.upper()
    gguf.GGMLQuantizationType[qtype]  # KeyError for unknown names
    if qtype not in _FILE_TYPE:
        raise ValueError(f"no llama.cpp file type for {qtype!r}")
    if fallback not in ("F16", "llama-quantize"):
        raise ValueError(f"fallback must be 'F16' or 'llama-quantize', not {fallback!r}")

    n_embd = hp["hidden_size"]
    n_head = hp["num_attention_heads"]
    n_head_kv = hp.get("num_key_value_heads", n_head)
    n_layer = hp["num_hidden_layers"]
    vocab_size = hp["vocab_size"]
    rope = _rope_params(hp)
    rope_full = rope.get("full_attention", rope)
    head_dim = hp.get("head_dim") or n_embd // n_head

    sd = _load_state_dict(folder)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layer)

    # ---- tensors, in the converter's order: generated extras first, then the checkpoint's tensors
    tensors: list[tuple[str, np.ndarray]] = []
    if arch == "phi3":
        long_f, short_f = rope_full.get("long_factor"), rope_full.get("short_factor")
        if long_f:
            if len(long_f) != len(short_f) or len(long_f) != head_dim // 2:
                raise ValueError(f"{folder}: rope long/short factors must have {head_dim // 2} entries")
            tensors.append(("rope_factors_long.weight", np.asarray(long_f, dtype=np.float32)))
            tensors.append(("rope_factors_short.weight", np.asarray(short_f, dtype=np.float32)))
    if arch == "llama" and str(rope_full.get("rope_type", "")).lower() == "llama3":
        tensors.append(("rope_freqs.weight", llama3_rope_factors(rope_full, head_dim)))

    def sort_key(name: str):
        parts = name.split(".")
        if len(parts) > 2 and parts[1] == "layers":
            return (1, int(parts[2]), name)
        return (0 if "embed_tokens" in name else 2, 0, name)

    for name in sorted(sd, key=sort_key):
        if name.endswith(("rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
            continue
        data = np.asarray(sd[name], dtype=np.float32)
        if arch == "llama":
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                data = llama_permute(data, n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                data = llama_permute(data, n_head_kv)
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0  # Gemma3RMSNorm multiplies by (1 + w); llama.cpp by the stored value
        new_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"{folder}: cannot map tensor {name!r} for arch {arch}")
        tensors.append((new_name, data))

    names = [n for n, _ in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"{folder}: duplicate GGUF tensor names {names}")

    # ---- writer and metadata (same keys, values and types as convert_hf_to_gguf.py writes)
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    file_type = gguf.LlamaFileType[_FILE_TYPE[qtype]]

    if arch == "phi3":
        orig_ctx = rope_full.get(
            "original_max_position_embeddings", hp.get("original_max_position_embeddings")
        )
        rope_dims = int(rope_full.get("partial_rotary_factor", 1.0) * n_embd) // n_head
        writer.add_context_length(hp["max_position_embeddings"])
        writer.add_rope_scaling_orig_ctx_len(orig_ctx)
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(hp["intermediate_size"])
        writer.add_block_count(n_layer)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        writer.add_rope_dimension_count(rope_dims)
        writer.add_rope_freq_base(rope_full["rope_theta"])
        writer.add_file_type(file_type)
        writer.add_sliding_window(hp.get("sliding_window") or 0)
        if rope_full.get("long_factor"):
            rope_type = str(rope_full.get("rope_type", rope_full.get("type", ""))).lower()
            scale = hp["max_position_embeddings"] / orig_ctx
            if rope_type in ("su", "longrope"):
                attn = math.sqrt(1 + math.log(scale) / math.log(orig_ctx)) if scale > 1.0 else 1.0
            elif rope_type == "yarn":
                attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
            else:
                raise ValueError(f"{folder}: rope scaling type {rope_type!r} not supported")
            writer.add_rope_scaling_attn_factors(attn)
    else:
        # TextModel.set_gguf_parameters
        writer.add_block_count(n_layer)
        writer.add_context_length(hp["max_position_embeddings"])
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(hp["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        rope_type = rope_full.get("rope_type")
        if rope_type == "linear" and rope_full.get("factor") is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope_full["factor"])
        elif rope_type not in (None, "default") and not (arch == "llama" and rope_type == "llama3"):
            # (llama3 scaling is written only as the rope_freqs tensor, no keys)
            raise ValueError(f"{folder}: rope type {rope_type!r} not supported by this fixture writer")
        writer.add_rope_freq_base(rope_full["rope_theta"])
        if (swa_theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
            writer.add_rope_freq_base_swa(swa_theta)
        writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        if arch == "gemma3":  # Gemma3Model.set_gguf_parameters writes these even without head_dim
            writer.add_key_length(hp.get("head_dim", 256))
            writer.add_value_length(hp.get("head_dim", 256))
        elif hp.get("head_dim") is not None:
            writer.add_key_length(hp["head_dim"])
            writer.add_value_length(hp["head_dim"])
        writer.add_file_type(file_type)
        if arch == "llama":
            writer.add_vocab_size(vocab_size)
            writer.add_rope_dimension_count(head_dim)
        if arch == "gemma3":
            if hp.get("final_logit_softcapping"):
                writer.add_final_logit_softcapping(hp["final_logit_softcapping"])
            if hp.get("attn_logit_softcapping") is not None:
                raise ValueError(f"{folder}: gemma3 has no attention logit softcapping")
            if hp.get("sliding_window_pattern") != 1:
                writer.add_sliding_window(hp["sliding_window"])
            # The converter writes no pattern: llama.cpp then takes every 6th layer as full attention.
            # Only where the HF layer_types say otherwise, record them (llama.cpp reads this bool array).
            layer_types = hp.get("layer_types")
            if layer_types:
                is_swa = [t == "sliding_attention" for t in layer_types]
                if is_swa != [(i % 6) < 5 for i in range(n_layer)]:
                    writer.add_sliding_window_pattern(is_swa)

    # ---- tokenizer (the converter's _set_vocab_gpt2)
    tokens, toktypes = _token_list(folder, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        # transformers 5 no longer saves add_bos_token; say it explicitly, as Qwen2's GGUF files do
        writer.add_add_bos_token(False)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # ---- tensor data
    for new_name, data in tensors:
        if data.ndim <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
            ttype = "F32"
        else:
            ttype = qtype
        try:
            raw = quantize(data, ttype)
        except gguf.QuantError:
            ttype = "F16"
            substitute = _QUANTIZE_FALLBACK.get(qtype) if fallback == "llama-quantize" else None
            if (
                substitute is not None
                and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[substitute]][0] == 0
            ):
                ttype = substitute
            raw = quantize(data, ttype)
        writer.add_tensor(new_name, raw, raw_dtype=gguf.GGMLQuantizationType[ttype])

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path=out_path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
