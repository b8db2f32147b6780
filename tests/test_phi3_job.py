"""The default job with a phi3 teacher (the SO8T seed's family): a tiny LongRoPE phi3 with a SentencePiece-style
tokenizer as a Q8_0 GGUF, trained (past its original context, so the long factors are in play), exported to GGUF,
and that export read back by so8t_jax.load with its rope factors, tokenizer and the trained weights."""
import jax
import numpy as np
from test_gguf_vocab import phi3_tokenizer
from test_trainer import tiny_config

import so8t_jax
from so8t_jax import model as model_lib
from so8t_jax.config import ModelConfig
from so8t_jax.trainer import train
from so8t_jax.weights.export import export_gguf


def test_phi3_longrope_teacher_trains_exports_and_loads(tmp_path):
    tok = phi3_tokenizer()
    rng = np.random.RandomState(0)
    cfg = ModelConfig(family="phi3", vocab_size=len(tok), d_model=64, n_layers=3, n_heads=4, n_kv_heads=4,
                      head_dim=16, ffn_dim=128, max_seq_len=64, rope_original_max=16,
                      rope_factors_short=tuple(1.0 + rng.rand(8)), rope_factors_long=tuple(1.0 + 3 * rng.rand(8)),
                      rope_attn_factor=float(np.sqrt(1 + np.log(4) / np.log(16))), bos_token_id=tok.bos_token_id,
                      eos_token_ids=(tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")),
                      pad_token_id=tok.pad_token_id)
    params = model_lib.init_params(cfg, jax.random.key(0))
    teacher = export_gguf(cfg, params, tok, tmp_path / "phi3-tiny-Q8_0.gguf", "Q8_0")
    c = tiny_config(teacher, tmp_path / "out", **{"export.formats": ("gguf",), "export.gguf_type": "Q8_0",
                                                  "student.layers": 2, "policy.lmbda": 0.5, "train.steps": 3,
                                                  "policy.max_new_tokens": 12, "data.prompt_buckets": (32, 64)})
    results = train(c)
    assert results["steps"] == 3 and results["teacher"]["family"] == "phi3"
    run = tmp_path / "out" / c.run_name
    exported = so8t_jax.load(run / "export" / "student-Q8_0.gguf")
    student = so8t_jax.load(run / "student")
    ec, sc = exported.config, student.config
    assert ec.family == "phi3" and ec.n_layers == 2
    assert ec.rope_factors_long == sc.rope_factors_long and ec.rope_original_max == 16
    assert abs(ec.rope_attn_factor - sc.rope_attn_factor) < 1e-6
    text = "<|user|>\nWhat is 2 plus 3?<|end|>\n<|assistant|>\nFive.<|end|>"
    assert exported.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    tokens = np.random.RandomState(1).randint(3, cfg.vocab_size, (2, 24))  # past the original context of 16
    ours, back = np.asarray(student.logits(tokens)), np.asarray(exported.logits(tokens))
    assert np.abs(back - ours).max() < 0.05 * np.abs(ours).max()
    cut = np.asarray(so8t_jax.load(teacher).params["layers"]["q"])[list(results["student"]["teacher_layers"])]
    assert np.abs(np.asarray(student.params["layers"]["q"]) - cut).max() > 1e-6  # the export holds trained weights
