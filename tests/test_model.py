"""The decoder against transformers (PyTorch CPU, fp32) on tiny random HF folders of every family; the
layer scan's rematerialisation modes."""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures import make_hf_model
from transformers import AutoModelForCausalLM

import so8t_jax
from so8t_jax import model as model_lib
from so8t_jax.config import ModelConfig
from so8t_jax.weights.hf import llama3_factors

FAMILY_LENGTHS = [("llama", 12), ("qwen2", 12), ("phi3", 12), ("phi3_longrope", 12), ("phi3_longrope", 24),
                  ("gemma3", 13)]


def _tokens(batch, length, vocab, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, (batch, length))


def _hf_outputs(folder, tokens, mask=None):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.tensor(tokens), attention_mask=None if mask is None else torch.tensor(mask),
                 output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: make_hf_model(fam, root / fam) for fam in ("llama", "qwen2", "phi3", "phi3_longrope", "gemma3")}


@pytest.mark.parametrize("family,length", FAMILY_LENGTHS)
def test_logits_match_transformers(folders, family, length):
    m = so8t_jax.load(folders[family])
    tokens = _tokens(2, length, m.config.vocab_size)
    ref, ref_hidden = _hf_outputs(folders[family], tokens)
    out = model_lib.forward(m.params, m.config, jnp.asarray(tokens), output_hidden=True)
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers
    # HF's hidden_states: embeddings, then each layer's output (the last one after the final norm).
    for i in range(m.config.n_layers - 1):
        np.testing.assert_allclose(np.asarray(out.hiddens[i]), ref_hidden[i + 1], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.hidden), ref_hidden[-1], atol=1e-4, rtol=1e-5)


def test_configs_read_from_folders(folders):
    gemma = so8t_jax.load(folders["gemma3"]).config
    assert gemma.family == "gemma3" and gemma.sliding_window == 4 and gemma.rope_local_theta == 100.0
    assert gemma.sliding_layers == (True,) * 5 + (False,)
    assert gemma.query_scale == pytest.approx(24 ** -0.5)
    phi = so8t_jax.load(folders["phi3_longrope"]).config
    assert phi.rope_original_max == 16 and phi.rope_factors_long is not None
    assert phi.rope_attn_factor == pytest.approx(np.sqrt(1 + np.log(64 / 16) / np.log(16)))
    qwen = so8t_jax.load(folders["qwen2"]).config
    assert qwen.attn_bias and qwen.tie_embeddings


def test_left_padding_matches_unpadded(folders):
    m = so8t_jax.load(folders["gemma3"])
    tokens = _tokens(1, 10, m.config.vocab_size, seed=3)
    plain = np.asarray(m.logits(tokens))[0]
    padded = np.concatenate([np.zeros((1, 4), int), tokens], axis=1)
    mask = np.concatenate([np.zeros((1, 4), int), np.ones((1, 10), int)], axis=1)
    out = np.asarray(m.logits(padded, mask))[0, 4:]
    np.testing.assert_allclose(out, plain, atol=1e-5)
    ref, _ = _hf_outputs(folders["gemma3"], padded, mask)
    np.testing.assert_allclose(out, ref[0, 4:], atol=1e-4)


def test_causal_by_gradients(folders):
    m = so8t_jax.load(folders["llama"])
    tokens = jnp.asarray(_tokens(1, 8, m.config.vocab_size))
    x = model_lib.embed(m.params, m.config, tokens)

    def logit_at(x_emb, t):
        # feed the embeddings in as an 8-row "vocabulary" looked up by tokens 0..7
        out = model_lib.forward(dict(m.params, embed=x_emb[0]), m.config.replace(vocab_size=8),
                                jnp.arange(8)[None], logits=False)
        return out.hidden[0, t].sum()

    for t in (0, 3, 7):
        g = np.asarray(jax.grad(logit_at)(x, t))[0]
        assert np.all(g[t + 1:] == 0) and np.all(np.abs(g[: t + 1]).sum(-1) > 0)


def test_sharded_folder(tmp_path, folders):
    hf = AutoModelForCausalLM.from_pretrained(folders["qwen2"], dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    a, b = so8t_jax.load(folders["qwen2"]), so8t_jax.load(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)


def test_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    folder = make_hf_model("llama", tmp_path, rope_scaling=scaling)
    m = so8t_jax.load(folder)
    assert m.config.rope_factors_short is not None
    tokens = _tokens(2, 20, m.config.vocab_size)
    ref, _ = _hf_outputs(folder, tokens)
    np.testing.assert_allclose(np.asarray(m.logits(tokens)), ref, atol=1e-4)


def test_llama3_factors_formula():
    inv = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    f = llama3_factors(inv, 8.0, 1.0, 4.0, 8192)
    wavelen = 2 * np.pi / inv
    assert np.all(f[wavelen < 8192 / 4] == 1.0) and np.all(f[wavelen > 8192] == 8.0)
    assert np.all((f >= 1.0) & (f <= 8.0))


def test_bf16_params_run(folders):
    m = so8t_jax.load(folders["llama"], dtype="bfloat16")
    assert jax.tree_util.tree_leaves(m.params)[0].dtype == jnp.bfloat16
    tokens = _tokens(1, 6, m.config.vocab_size)
    ref, _ = _hf_outputs(folders["llama"], tokens)
    logits = np.asarray(m.logits(tokens))
    assert logits.dtype == np.float32 and np.abs(logits - ref).max() < 0.25 * np.abs(ref).max()


def test_large_preset_shapes_without_memory():
    cfg = ModelConfig.gemma3_1b()
    params = jax.eval_shape(lambda k: model_lib.init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    assert model_lib.count_params(params) == pytest.approx(1.0e9, rel=0.05)
    out = jax.eval_shape(lambda p, t: model_lib.forward(p, cfg, t), params, jnp.zeros((2, 16), jnp.int32))
    assert out.logits.shape == (2, 16, 262144)


def test_config_round_trip_and_errors():
    cfg = ModelConfig.smollm2_135m()
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(so8t_jax.ConfigError, match="n_kv_heads"):
        cfg.replace(n_kv_heads=4)
    with pytest.raises(so8t_jax.ConfigError, match="family"):
        cfg.replace(family="gpt2")
    with pytest.raises(so8t_jax.ConfigError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(so8t_jax.WeightsError, match="unsupported architecture.*gpt2"):
        so8t_jax.load(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# rematerialisation (train.remat)


def _remat_loss(params, cfg, tokens, mask, remat):
    return jnp.mean(model_lib.forward(params, cfg, tokens, mask_BxT=mask, remat=remat).logits ** 2)


@pytest.mark.parametrize("remat", ["dots", "full", True, False])
def test_remat_modes_match_none(folders, remat):
    """gemma3 (sliding layers, qk norms, post norms), left-padded: loss and every gradient as without remat."""
    m = so8t_jax.load(folders["gemma3"])
    tokens = jnp.asarray(_tokens(2, 13, m.config.vocab_size, seed=4))
    mask = jnp.asarray((np.arange(13)[None] >= np.array([[0], [5]])).astype(np.int32))
    grad = jax.jit(jax.value_and_grad(_remat_loss), static_argnums=(1, 4))
    ref_loss, ref_grads = grad(m.params, m.config, tokens, mask, "none")
    loss, grads = grad(m.params, m.config, tokens, mask, remat)
    chex.assert_trees_all_close((loss, grads), (ref_loss, ref_grads), atol=1e-6, rtol=1e-6)
    assert float(ref_loss) > 0 and max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(ref_grads)) > 0


def test_remat_saves_memory():
    """Compiled value_and_grad of a small llama (4 layers, T=128): temp memory none > dots > full (measured, CPU:
    about 55, 22 and 15 MB; "dots" recomputes the attention scores, which dominate here)."""
    cfg = ModelConfig(family="llama", vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                      ffn_dim=512)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    tokens, mask = jnp.zeros((4, 128), jnp.int32), jnp.ones((4, 128), jnp.int32)
    temp = {}
    for remat in ("none", "dots", "full"):
        compiled = jax.jit(jax.value_and_grad(_remat_loss), static_argnums=(1, 4)).lower(
            params, cfg, tokens, mask, remat).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    print({k: f"{v / 1e6:.1f} MB" for k, v in temp.items()})
    assert temp["full"] < temp["dots"] < temp["none"]


def test_remat_rejects_unknown_modes():
    cfg = ModelConfig.smollm2_135m()
    params = jax.eval_shape(lambda k: model_lib.init_params(cfg, k), jax.random.key(0))
    with pytest.raises(ValueError, match=r"train\.remat must be one of \('none', 'dots', 'full'\), got 'all'"):
        model_lib.forward(params, cfg, jnp.zeros((1, 4), jnp.int32), remat="all")
    assert model_lib.remat_policy(False) is None and model_lib.remat_policy("none") is None
    assert model_lib.remat_policy(True) is model_lib.remat_policy("full") is jax.checkpoint_policies.nothing_saveable
