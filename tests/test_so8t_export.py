"""A gated SO8T student leaves as a plain model of its family: transformers runs the exported HF folder (and the
F32 GGUF) with the gated model's logits; the heads go beside it and `so8t_jax.load` restores them; `generate`
returns the safety judgment and per-token verifier confidence, checked against a float64 numpy reference."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fixtures import make_hf_model
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

import so8t_jax
from so8t_jax import model as model_lib
from so8t_jax import so8t
from so8t_jax.weights.export import export

FAMILIES = ["llama", "gemma3"]


def _gated(m, seed=0):
    """m with random (non-trivial) gates at alpha 0.8 and random heads."""
    rng = np.random.RandomState(seed)
    params = so8t.with_gates(m.config, m.params, alpha=0.8)
    params["layers"] = {**params["layers"], **{k: jnp.asarray(0.4 * rng.randn(*params["layers"][k].shape),
                                                               jnp.float32) for k in ("attn_gate", "mlp_gate")}}
    heads = so8t.init_heads(m.config.d_model, jax.random.key(seed), std=0.5)
    heads["safety_head"]["b"] = jnp.asarray([0.2, -0.1, 0.05])
    heads["verifier"]["b"] = jnp.asarray(-0.3)
    return dataclasses.replace(m, params={**params, **heads})


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    m = _gated(so8t_jax.load(make_hf_model(request.param, root / "src")))
    paths = export(m, root / "export", ("hf", "gguf"), "F32")
    return m, paths


def _tokens(cfg, length=9):
    return np.random.RandomState(3).randint(3, cfg.vocab_size, (2, length))


def test_exported_gated_student_runs_in_transformers(exported):
    m, paths = exported
    tokens = _tokens(m.config)
    ours = np.asarray(m.logits(jnp.asarray(tokens)))
    closed = np.asarray(model_lib.forward(m.params | {"so8t_alpha": jnp.asarray(-40.0)}, m.config,
                                          jnp.asarray(tokens)).logits)  # sigmoid(-40): gates shut
    assert np.max(np.abs(ours - closed)) > 1e-2  # the gates really change the model
    hf = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    names = set(load_file(str(paths["hf"] / "model.safetensors")))
    assert not any("gate" in n and "gate_proj" not in n for n in names)  # no SO8T tensor in the plain model


def test_heads_saved_beside_and_restored_by_load(exported):
    m, paths = exported
    for path in (paths["hf"], paths["gguf"]):
        hp = so8t.heads_path(path)
        assert hp.exists(), hp
        t = load_file(str(hp))
        np.testing.assert_array_equal(t["safety_head.weight"], np.asarray(m.params["safety_head"]["w"]).T)
        np.testing.assert_array_equal(t["verifier.weight"][0], np.asarray(m.params["verifier"]["w"]))
        back = so8t_jax.load(path)
        for head in so8t.HEADS:
            jax.tree_util.tree_map(np.testing.assert_array_equal, back.params[head], m.params[head])
        assert not so8t.has_gates(back.params)
        np.testing.assert_allclose(np.asarray(back.logits(jnp.asarray(_tokens(m.config)))),
                                   np.asarray(m.logits(jnp.asarray(_tokens(m.config)))), atol=1e-4)


def test_bad_heads_file_is_named(exported, tmp_path):
    m, paths = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in paths["hf"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / so8t.HEADS_FILE).write_bytes(b"not safetensors at all")
    with pytest.raises(so8t_jax.WeightsError, match=r"so8t_heads\.safetensors.*not a readable safetensors"):
        so8t_jax.load(bad)
    save_file({"safety_head.weight": np.zeros((3, 5), np.float32), "safety_head.bias": np.zeros(3, np.float32)},
              str(bad / so8t.HEADS_FILE))
    with pytest.raises(so8t_jax.WeightsError, match=r"safety_head\.weight has shape \(3, 5\)"):
        so8t_jax.load(bad)
    save_file({"verifier.weight": np.zeros((1, m.config.d_model), np.float32)}, str(bad / so8t.HEADS_FILE))
    with pytest.raises(so8t_jax.WeightsError, match="needs both"):
        so8t_jax.load(bad)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_generate_returns_judgments(exported):
    """Two prompts of different lengths (left padding); reference: each row alone, unpadded, float64 heads."""
    m, _ = exported
    prompts = ["Hello world, how are you today my friend?", "Hi"]
    out = so8t_jax.generate(m, prompts, max_new_tokens=6, chat=False, return_judgments=True)
    texts = so8t_jax.generate(m, prompts, max_new_tokens=6, chat=False)
    assert [o["text"] for o in out] == texts
    w_s, b_s = np.asarray(m.params["safety_head"]["w"], np.float64), np.asarray(m.params["safety_head"]["b"])
    w_v, b_v = np.asarray(m.params["verifier"]["w"], np.float64), float(m.params["verifier"]["b"])
    for prompt, o in zip(prompts, out):
        ids = list(m.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        seq = ids + o["tokens"]
        hidden = np.asarray(model_lib.forward(m.params, m.config, jnp.asarray([seq])).hidden[0], np.float64)
        logits = hidden[len(ids) - 1] @ w_s + b_s
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        np.testing.assert_allclose([o["safety_probs"][k] for k in so8t.SAFETY_LABELS], probs, atol=1e-4)
        assert o["safety"] == so8t.SAFETY_LABELS[int(np.argmax(probs))]
        assert len(o["confidence"]) == len(o["tokens"]) > 0
        ref = _sigmoid(hidden[len(ids) - 1:len(seq) - 1] @ w_v + b_v)
        np.testing.assert_allclose(o["confidence"], ref, atol=1e-4)
    plain = dataclasses.replace(m, params=so8t.split_heads(m.params)[0])
    with pytest.raises(ValueError, match="return_judgments needs a model with SO8T heads"):
        so8t_jax.generate(plain, prompts, max_new_tokens=2, chat=False, return_judgments=True)
