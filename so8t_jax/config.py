"""ModelConfig: one frozen dataclass; a model family is a set of field values, not a class.

Rotary scaling of every kind (llama3, LongRoPE "su", linear, llama.cpp's rope_freqs) is expressed the way
llama.cpp stores it: per-frequency divisors of the base inverse frequencies (`rope_factors_short`, and
`rope_factors_long` used once a sequence is longer than `rope_original_max`), plus a multiplier of cos/sin
(`rope_attn_factor`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")


class ConfigError(ValueError):
    """A model configuration value is missing, out of range or unsupported."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    activation: str = "silu"
    tie_embeddings: bool = False
    attn_bias: bool = False          # qwen2: q/k/v projections carry biases
    qk_norm: bool = False            # gemma3, qwen3: RMSNorm over head_dim on q and k (before rope)
    post_norms: bool = False         # gemma3: norms after attention and MLP, before the residual add
    embed_scale: bool = False        # gemma3: embeddings times sqrt(d_model)
    query_scale: float | None = None  # None: 1/sqrt(head_dim)
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # gemma3 sliding-window layers
    rope_dim: int | None = None      # rotated dims per head (phi3 partial rotary); None: head_dim
    rope_factors_short: tuple[float, ...] | None = None
    rope_factors_long: tuple[float, ...] | None = None
    rope_original_max: int | None = None
    rope_attn_factor: float = 1.0
    max_seq_len: int = 4096
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None  # per layer: uses the sliding window (gemma3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unsupported activation {self.activation!r}; supported: {ACTIVATIONS}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(f"rope_dim {self.rope_dim} must be even and at most head_dim {self.head_dim}")
        half = self.rotary_dim // 2
        for name in ("rope_factors_short", "rope_factors_long"):
            factors = getattr(self, name)
            if factors is not None and len(factors) != half:
                raise ConfigError(f"{name} has {len(factors)} entries, expected rope_dim/2 = {half}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.n_layers:
            raise ConfigError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        return self.sliding_layers or (False,) * self.n_layers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig keys: {unknown}")
        d = dict(d)
        for key in ("rope_factors_short", "rope_factors_long", "sliding_layers", "eos_token_ids"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    # Presets: shapes of well-known models (random weights; for benchmarks and students from scratch).
    @classmethod
    def smollm2_135m(cls, **kw) -> "ModelConfig":
        base = dict(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                    head_dim=64, ffn_dim=1536, rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192)
        return cls(**{**base, **kw})

    @classmethod
    def qwen2_0_5b(cls, **kw) -> "ModelConfig":
        base = dict(family="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                    head_dim=64, ffn_dim=4864, norm_eps=1e-6, rope_theta=1000000.0, attn_bias=True,
                    tie_embeddings=True, max_seq_len=32768)
        return cls(**{**base, **kw})

    @classmethod
    def qwen2_7b(cls, **kw) -> "ModelConfig":
        base = dict(family="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                    head_dim=128, ffn_dim=18944, norm_eps=1e-6, rope_theta=1000000.0, attn_bias=True,
                    tie_embeddings=False, max_seq_len=32768)
        return cls(**{**base, **kw})

    @classmethod
    def qwen3(cls, size: str, **kw) -> "ModelConfig":
        """Qwen3 dense models (head_dim 128 whatever d_model / n_heads; q/k RMSNorm; no q/k/v bias)."""
        shapes = {"0.6b": (1024, 28, 16, 3072, True), "1.7b": (2048, 28, 16, 6144, True),
                  "4b": (2560, 36, 32, 9728, True), "8b": (4096, 36, 32, 12288, False)}
        d, n_layers, n_heads, ffn, tied = shapes[size]
        base = dict(family="qwen3", vocab_size=151936, d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8,
                    head_dim=128, ffn_dim=ffn, norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
                    tie_embeddings=tied, max_seq_len=40960)
        return cls(**{**base, **kw})

    @classmethod
    def mistral_7b(cls, **kw) -> "ModelConfig":
        """Mistral-7B v0.3 (no sliding window; v0.1 had sliding_window 4096 on every layer)."""
        base = dict(family="mistral", vocab_size=32768, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    head_dim=128, ffn_dim=14336, norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=32768)
        return cls(**{**base, **kw})

    @classmethod
    def gemma3_1b(cls, **kw) -> "ModelConfig":
        n = 26
        base = dict(family="gemma3", vocab_size=262144, d_model=1152, n_layers=n, n_heads=4, n_kv_heads=1,
                    head_dim=256, ffn_dim=6912, norm_eps=1e-6, activation="gelu_tanh", tie_embeddings=True,
                    qk_norm=True, post_norms=True, embed_scale=True, query_scale=256 ** -0.5,
                    rope_theta=1000000.0, rope_local_theta=10000.0, sliding_window=512,
                    sliding_layers=tuple((i + 1) % 6 != 0 for i in range(n)), max_seq_len=32768)
        return cls(**{**base, **kw})

    @classmethod
    def preset(cls, name: str, **kw) -> "ModelConfig":
        presets = {"smollm2-135m": cls.smollm2_135m, "qwen2-0.5b": cls.qwen2_0_5b, "qwen2-7b": cls.qwen2_7b,
                   "gemma3-1b": cls.gemma3_1b, "mistral-7b": cls.mistral_7b,
                   **{f"qwen3-{size}": (lambda size=size, **k: cls.qwen3(size, **k))
                      for size in ("0.6b", "1.7b", "4b", "8b")}}
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(presets)}")
        return presets[name](**kw)


def set_path(tree, path: str, value, sep: str = ".") -> None:
    """tree[a][b][c] = value for path "a.b.c" (sep "/" for parameter names), creating missing levels as dicts;
    tree is a nested dict or an ml_collections ConfigDict."""
    *parents, leaf = path.split(sep)
    for part in parents:
        if part not in tree:
            tree[part] = {}
        tree = tree[part]
    tree[leaf] = value
