"""qwen3 and mistral end to end against transformers (PyTorch CPU, fp32): HF folders, GGUF files in llama.cpp's
layout, greedy generation, export to both formats and back, presets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures import make_hf_model, write_gguf
from transformers import AutoModelForCausalLM

import so8t_jax
from so8t_jax import model as model_lib
from so8t_jax import sampling
from so8t_jax.config import ModelConfig
from so8t_jax.weights.export import export_gguf, export_hf

FAMILIES = ("qwen3", "mistral")
EOS = 2  # the fixture tokenizer's <|im_end|>


def _tokens(vocab, batch=2, length=13, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, (batch, length))


def _hf(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def _torch_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    # not named "mistral": transformers' GGUF reader takes general.name (the folder's) "mistral" as an
    # architecture gguf-py does not list
    return {fam: make_hf_model(fam, root / {"qwen3": "qwen3", "mistral": "tiny-m"}[fam]) for fam in FAMILIES}


@pytest.fixture(scope="module")
def models(folders):
    return {fam: so8t_jax.load(folder) for fam, folder in folders.items()}


def test_configs_read_from_folders(models):
    qwen = models["qwen3"].config
    assert qwen.family == "qwen3" and qwen.head_dim == 24 != qwen.d_model // qwen.n_heads
    assert qwen.qk_norm and not qwen.attn_bias and not qwen.post_norms and not qwen.tie_embeddings
    assert (qwen.n_heads, qwen.n_kv_heads) == (4, 2) and not any(qwen.is_sliding)
    mistral = models["mistral"].config
    assert mistral.family == "mistral" and mistral.sliding_window == 4 and all(mistral.is_sliding)
    assert not mistral.qk_norm and not mistral.attn_bias


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_hiddens_match_transformers(folders, models, family):
    """13 tokens: mistral's window of 4 is passed many times over."""
    m = models[family]
    tokens = _tokens(m.config.vocab_size)
    with torch.no_grad():
        ref = _hf(folders[family])(torch.tensor(tokens), output_hidden_states=True)
    out = model_lib.forward(m.params, m.config, jnp.asarray(tokens), output_hidden=True)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-4, rtol=0)
    assert np.abs(ref.logits.numpy()).max() > 1.0
    np.testing.assert_allclose(np.asarray(out.hiddens[0]), ref.hidden_states[1].numpy(), atol=1e-4, rtol=1e-5)


def test_mistral_window_changes_the_logits(models):
    """The parity above is not vacuous: without the window the late positions differ."""
    m = models["mistral"]
    tokens = jnp.asarray(_tokens(m.config.vocab_size))
    windowed = np.asarray(model_lib.forward(m.params, m.config, tokens).logits)
    full = np.asarray(model_lib.forward(m.params, m.config.replace(sliding_layers=None), tokens).logits)
    np.testing.assert_allclose(windowed[:, :4], full[:, :4], atol=1e-5)
    assert np.abs(windowed[:, 5:] - full[:, 5:]).max() > 0.1


@pytest.mark.parametrize("family,qtype", [("qwen3", "F32"), ("qwen3", "Q8_0"), ("mistral", "F32"),
                                          ("mistral", "Q8_0")])
def test_gguf_in_llama_cpp_layout(folders, tmp_path, family, qtype):
    """Files as llama.cpp's converter writes them (mistral as arch llama with permuted q/k and no window key).
    Against the source folder: transformers' GGUF reader drops qwen3's key_length (head_dim != d / n)."""
    path = write_gguf(folders[family], tmp_path / f"{family}.{qtype}.gguf", qtype)
    m = so8t_jax.load(path)
    assert m.config.family == {"qwen3": "qwen3", "mistral": "llama"}[family]
    length = 13 if family == "qwen3" else 4  # the converter drops mistral's window: compare inside it
    tokens = _tokens(m.config.vocab_size, length=length)
    ref = _torch_logits(_hf(folders[family]), tokens)
    tol = 1e-3 if qtype == "F32" else 0.05 * np.abs(ref).max()
    assert np.abs(np.asarray(m.logits(tokens)) - ref).max() <= tol
    if family == "mistral":  # the llama file against transformers reading that same file, past 4 tokens
        tokens = _tokens(m.config.vocab_size)
        ref = _torch_logits(_hf(path.parent, gguf_file=path.name), tokens)
        np.testing.assert_allclose(np.asarray(m.logits(tokens)), ref, atol=1e-3 if qtype == "F32" else 2e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(folders, models, family):
    """Two left-padded prompts, 12 new tokens (mistral far past its window), each against transformers' greedy
    generate on the prompt alone."""
    m = models[family]
    rng = np.random.RandomState(1)
    rows = [rng.randint(3, m.config.vocab_size, n).tolist() for n in (8, 5)]
    tokens, mask = sampling.left_pad(rows, 8)
    fn = sampling.make_sample_fn(m.config, 12, sampling.GREEDY, (EOS,), 0, return_logits=True)
    out = fn(m.params, tokens, mask, jax.random.PRNGKey(0))
    top2 = np.sort(np.asarray(out.logits_BxNxV), -1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0])[np.asarray(out.mask_BxN).astype(bool)].min() > 1e-3  # no near-ties
    hf = _hf(folders[family])
    for r, ids in enumerate(rows):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=0)
        ref = ref[0, len(ids):].tolist()
        ref = ref[:ref.index(EOS) + 1] if EOS in ref else ref
        n = int(out.lengths_B[r])
        assert np.asarray(out.tokens_BxN)[r, :n].tolist() == ref


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trips(models, tmp_path, family):
    m = models[family]
    tokens = _tokens(m.config.vocab_size)
    ours = np.asarray(m.logits(tokens))
    hf_dir = export_hf(m.config, m.params, m.tokenizer, tmp_path / "hf")
    hf = _hf(hf_dir)
    assert type(hf).__name__ == {"qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}[family]
    np.testing.assert_allclose(_torch_logits(hf, tokens), ours, atol=1e-4, rtol=0)
    back = so8t_jax.load(hf_dir)
    assert back.config == m.config
    path = export_gguf(m.config, m.params, m.tokenizer, tmp_path / "m-F32.gguf", "F32")
    g = so8t_jax.load(path)  # mistral's window survives as llama.attention.sliding_window
    assert g.config.family == family and g.config.sliding_layers == m.config.sliding_layers
    assert g.config.head_dim == m.config.head_dim and g.config.qk_norm == m.config.qk_norm
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), g.params, m.params)
    q8 = so8t_jax.load(export_gguf(m.config, m.params, m.tokenizer, tmp_path / "m-Q8_0.gguf", "Q8_0"))
    assert np.abs(np.asarray(q8.logits(tokens)) - ours).max() < 0.05 * np.abs(ours).max()


@pytest.mark.parametrize("name,total,non_embedding", [
    ("qwen3-0.6b", 0.6e9, 0.44e9), ("qwen3-1.7b", 1.7e9, 1.4e9), ("qwen3-4b", 4.0e9, 3.6e9),
    ("qwen3-8b", 8.2e9, 6.95e9), ("mistral-7b", 7.248e9, None)])
def test_presets_have_the_published_sizes(name, total, non_embedding):
    """Parameter counts from the model cards (Qwen3: total and non-embedding, rounded as published; Mistral-7B
    v0.3: the safetensors total)."""
    cfg = ModelConfig.preset(name)
    shapes = jax.eval_shape(lambda k: model_lib.init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    n = model_lib.count_params(shapes)
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    assert n == pytest.approx(total, rel=0.02 if non_embedding else 1e-3)
    if non_embedding:
        assert n - embeddings == pytest.approx(non_embedding, rel=0.02)
