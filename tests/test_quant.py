"""Quantized teachers (so8t_jax/quant.py): the jnp decoders against gguf's numpy dequantizers (equal in float32),
quantized loads against dense loads of the same file and against transformers, bytes on the device, the layer
scan's memory, a training step, greedy sampling, and the config check."""
import chex
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import parameterized
from fixtures import KQUANT_OVERRIDES, make_hf_model, quantize, write_gguf
from test_trainer import tiny_config
from transformers import AutoModelForCausalLM

import so8t_jax
from so8t_jax import build, quant, sampling
from so8t_jax import model as model_lib
from so8t_jax import trainer as tr
from so8t_jax.config import ConfigError
from so8t_jax.loading import smollm2_gguf
from so8t_jax.runs import check_config
from so8t_jax.weights.gguf import GGUFFile


def _gguf_dequantize(raw_RxNBxS, qtype):
    return gguf.quants.dequantize(raw_RxNBxS.reshape(raw_RxNBxS.shape[0], -1), gguf.GGMLQuantizationType[qtype])


def _blocks(qtype, rows=6, n_blocks=3, seed=0):
    """(quantized data of random floats, random bytes with finite fp16 scales), uint8 [rows, n_blocks, S]."""
    rng = np.random.RandomState(seed)
    values, size = quant.block_size(qtype)
    x = (rng.randn(rows, n_blocks * values) * rng.lognormal(size=(rows, 1))).astype(np.float32)
    real = quantize(x, qtype).reshape(rows, n_blocks, size)
    noise = rng.randint(0, 256, (rows, n_blocks, size)).astype(np.uint8)
    for o in quant._FP16_FIELDS[qtype]:  # random ints, but scales that are finite fp16 numbers
        noise[..., o:o + 2] = rng.randn(rows, n_blocks, 1).astype(np.float16).view(np.uint8)
    return real, noise


class DequantizeTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*quant.QTYPES)
    def test_decode_equals_gguf_dequantize(self, qtype):
        decode = self.variant(lambda raw: quant.decode(qtype, raw))
        for raw in _blocks(qtype):
            got = np.asarray(decode(jnp.asarray(raw)))
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, _gguf_dequantize(raw, qtype))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(False, True)
    def test_dequantize_layout_and_mixed_types_per_layer(self, transposed):
        """A [2, R, C] stack of one Q4_K and one Q6_K layer (llama.cpp's Q4_K_M mixes them): the whole stack, and
        each layer as a lax.scan body sees it (a scalar code: lax.switch), equal gguf's rows in our layout."""
        k4, k6 = _blocks("Q4_K", rows=4, n_blocks=2)[0], _blocks("Q6_K", rows=4, n_blocks=2, seed=1)[0]
        blocks = np.zeros((2, 4, 2, 210), np.uint8)
        blocks[0, ..., :144], blocks[1] = k4, k6
        shape = (512, 2, 2) if transposed else (4, 512)
        w = quant.QuantizedWeight(jnp.asarray(blocks), jnp.asarray([0, 1], jnp.int32), ("Q4_K", "Q6_K"), shape,
                                  transposed, "float32")
        rows = np.stack([_gguf_dequantize(k4, "Q4_K"), _gguf_dequantize(k6, "Q6_K")])
        want = (rows.swapaxes(-1, -2) if transposed else rows).reshape(2, *shape)
        assert w.shape == want.shape and w.dtype == jnp.float32 and w.nbytes == blocks.nbytes + 8
        chex.assert_trees_all_equal(np.asarray(self.variant(quant.dequantize)(w)), want)
        per_layer = self.variant(lambda w: jax.lax.scan(lambda c, layer: (c, quant.dequantize(layer)), 0, w)[1])
        chex.assert_trees_all_equal(np.asarray(per_layer(w)), want)
        bf16 = self.variant(lambda w: quant.dequantize(w, jnp.bfloat16))(w)
        chex.assert_trees_all_equal(np.asarray(bf16), want.astype(jnp.bfloat16))


def test_stacking_layers_of_mixed_types():
    """Per-layer file matrices into one leaf: one block size (Q4_K, Q6_K) stays packed with codes; different
    block sizes (Q8_0 and Q4_K) come out dense. Both equal gguf's rows, transposed as names.to_ours does."""
    cfg = model_lib.ModelConfig.preset("smollm2-135m")
    k4, k6 = _blocks("Q4_K", rows=4, n_blocks=2)[0], _blocks("Q6_K", rows=4, n_blocks=2, seed=1)[0]
    q8 = _blocks("Q8_0", rows=4, n_blocks=16, seed=2)[0]
    want = np.stack([_gguf_dequantize(k4, "Q4_K"), _gguf_dequantize(k6, "Q6_K")]).swapaxes(-1, -2)
    packed = quant._leaf(cfg, "down", [quant._Packed("Q4_K", k4), quant._Packed("Q6_K", k6)], jnp.float32, True)
    assert packed.qtypes == ("Q4_K", "Q6_K") and packed.blocks.shape == (2, 4, 2, 210)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(packed)), want)
    dense = quant._leaf(cfg, "down", [quant._Packed("Q8_0", q8), quant._Packed("Q4_K", k4)], jnp.float32, True)
    assert not quant.is_quantized(dense)
    np.testing.assert_array_equal(np.asarray(dense[0]), _gguf_dequantize(q8, "Q8_0").T)
    np.testing.assert_array_equal(np.asarray(dense[1]), want[0])


# ----------------------------------------------------------------------------------------------- loading

CASES = [("llama", "Q8_0"), ("llama", "Q4_0"), ("llama", "Q4_1"), ("qwen2", "Q4_0"), ("phi3", "Q4_0"),
         ("llama_k", "Q4_K"), ("llama_k", "Q6_K")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    hf = {fam: make_hf_model(fam, root / fam) for fam in ("llama", "qwen2", "phi3")}  # + tied, fused matrices
    hf["llama_k"] = make_hf_model("llama", root / "llama_k", num_hidden_layers=4, **KQUANT_OVERRIDES)
    return {case: write_gguf(hf[case[0]], root / f"{case[0]}.{case[1]}.gguf", case[1]) for case in CASES}


def _tokens(vocab, batch=2, length=12):
    return np.random.RandomState(0).randint(3, vocab, (batch, length))




@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_quantized_load_equals_dense_load(files, case):
    path = files[case]
    q, d = so8t_jax.load(path, quantized=True), so8t_jax.load(path)
    layers = q.params["layers"]
    assert all(quant.is_quantized(layers[k]) and layers[k].qtypes == (case[1],) for k in ("q", "k", "o", "down"))
    assert not quant.is_quantized(layers["attn_norm"])  # norms stay dense
    assert q.num_params == d.num_params
    # every leaf dequantizes to exactly what the dense import made of the same bytes
    chex.assert_trees_all_equal(quant.dequantize_tree(q.params), d.params)
    tokens = _tokens(q.config.vocab_size)
    np.testing.assert_allclose(np.asarray(q.logits(tokens)), np.asarray(d.logits(tokens)), atol=1e-4, rtol=0)
    # bytes: the file's tensor bytes (norms are F32 in the file too), a fraction of the dense float32 params
    file_bytes = quant.file_tensor_bytes(GGUFFile(path))
    assert q.nbytes == file_bytes
    bits = 8 * quant.block_size(case[1])[1] / quant.block_size(case[1])[0]
    assert d.nbytes / q.nbytes > 0.8 * 32 / bits


def test_quantized_load_matches_transformers(files):
    path = files["llama_k", "Q4_K"]
    m = so8t_jax.load(path, quantized=True)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = _tokens(m.config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(m.logits(tokens)), ref, atol=1e-3, rtol=0)


def test_layer_scan_dequantizes_one_layer_at_a_time(files):
    """The compiled forward's arguments are the packed bytes, and its temporaries hold far less than the dense
    float32 matrices of all layers (the scan dequantizes one layer per step)."""
    q = so8t_jax.load(files["llama_k", "Q4_K"], quantized=True)
    cfg, tokens = q.config, jnp.ones((1, 4), jnp.int32)
    compiled = jax.jit(lambda p, t: model_lib.forward(p, cfg, t).logits).lower(q.params, tokens).compile()
    mem = compiled.memory_analysis()
    matrices = {k: v for k, v in q.params["layers"].items() if quant.is_quantized(v)}
    all_layers = quant.dense_bytes(matrices)
    assert cfg.n_layers == 4 and mem.argument_size_in_bytes == q.nbytes + tokens.nbytes
    assert mem.temp_size_in_bytes < 0.5 * all_layers, (mem.temp_size_in_bytes, all_layers)


def test_truncate_cuts_the_vocabulary(files):
    q, d = so8t_jax.load(files["llama", "Q8_0"], quantized=True), so8t_jax.load(files["llama", "Q8_0"])
    n = q.config.vocab_size - 7
    np.testing.assert_array_equal(quant.dequantize(quant.truncate(q.params["embed"], n, 0)), d.params["embed"][:n])
    np.testing.assert_array_equal(quant.dequantize(quant.truncate(q.params["lm_head"], n, 1)),
                                  d.params["lm_head"][:, :n])
    with pytest.raises(ValueError, match="file rows"):
        quant.truncate(q.params["lm_head"], 8, 0)


def test_greedy_sampling_with_a_quantized_model_equals_dense(files):
    path = files["llama", "Q4_1"]
    q, d = so8t_jax.load(path, quantized=True), so8t_jax.load(path)
    prompt = jnp.asarray(_tokens(q.config.vocab_size, 3, 6))
    mask = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1], [0] * 5 + [1]])
    fn = sampling.make_sample_fn(q.config, 10)
    got, want = fn(q.params, prompt, mask, None), fn(d.params, prompt, mask, None)
    np.testing.assert_array_equal(np.asarray(got.tokens_BxN), np.asarray(want.tokens_BxN))
    assert np.asarray(want.mask_BxN).all()  # no eos: ten tokens each


@pytest.mark.parametrize("case", [("qwen2", "Q4_0"), ("llama", "Q8_0")], ids=["tied", "untied"])
def test_quantized_output_layer_is_dequantized_a_slice_of_the_vocabulary_at_a_time(files, case):
    """quant.project with a packed head (a tied embedding viewed transposed, or lm_head) gives the logits of its
    dequantized float32 matrix, for chunk sizes that do and do not divide the vocabulary; compiled, its
    temporaries hold a slice of the head, not the dense [D, V] matrix."""
    q, d = so8t_jax.load(files[case], quantized=True), so8t_jax.load(files[case])
    cfg = q.config
    head_q, head_d = model_lib.lm_head(q.params, cfg), model_lib.lm_head(d.params, cfg)
    assert quant.is_quantized(head_q) and head_q.shape == head_d.shape == (cfg.d_model, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(head_q)), np.asarray(head_d))
    h = jax.random.normal(jax.random.key(0), (3, 5, cfg.d_model))
    want = np.asarray(h, np.float64) @ np.asarray(head_d, np.float64)
    for rows in (cfg.vocab_size, 64, 37):
        got = quant.project(h, head_q, chunk_rows=rows)
        chex.assert_shape(got, (3, 5, cfg.vocab_size))
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    dense_bytes = cfg.d_model * cfg.vocab_size * 4
    mem = jax.jit(lambda hh, w: quant.project(hh, w, chunk_rows=32)).lower(h, head_q).compile().memory_analysis()
    assert mem.temp_size_in_bytes < dense_bytes / 2, (mem.temp_size_in_bytes, dense_bytes)
    # the whole forward's logits too (model.forward goes through quant.project)
    tokens = _tokens(cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(q.logits(tokens)), np.asarray(d.logits(tokens)), atol=1e-4, rtol=0)


def test_quantized_load_goes_straight_into_shards(files):
    """load(..., quantized=True, shardings=...) on an fsdp 4 x tensor 2 mesh: every leaf (packed blocks split on
    their file rows, mixed-type codes, dense norms) is built on its table sharding with the unsharded load's
    values, and the teacher's logits are the same."""
    from so8t_jax import sharding
    mesh = sharding.ParallelConfig(mode="mesh", data=1, fsdp=4, tensor=2).mesh()
    for case in (("llama_k", "Q4_K"), ("qwen2", "Q4_0")):
        path = files[case]
        whole = so8t_jax.load(path, quantized=True)
        got = so8t_jax.load(path, quantized=True, shardings=sharding.loader_shardings(mesh))
        chex.assert_trees_all_equal(jax.device_get(got.params), jax.device_get(whole.params))
        specs = sharding.param_specs(whole.params, mesh)
        jax.tree_util.tree_map(lambda x, s: x.sharding.spec == s or pytest.fail(f"{x.sharding} vs {s}"),
                               got.params, specs)
        blocks = got.params["layers"]["down"].blocks
        assert blocks.sharding.spec[1] == ("fsdp", "tensor")
        assert blocks.addressable_shards[0].data.shape[1] == blocks.shape[1] // 8
        tokens = _tokens(got.config.vocab_size)
        # the same values; the sharded matmuls sum in another order (float32 rounding, ~2e-5 on logits of ~5)
        np.testing.assert_allclose(np.asarray(got.logits(tokens)), np.asarray(whole.logits(tokens)), atol=1e-4)


# ----------------------------------------------------------------------------------------------- training


MESH = {"parallel.mode": "mesh", "parallel.data": 1, "parallel.fsdp": 8, "parallel.shard_teacher": True,
        "train.batch_size": 8}


@pytest.mark.parametrize("lmbda,parallel", [
    pytest.param(0.0, {}, id="offline"), pytest.param(0.5, {}, marks=pytest.mark.slow, id="on_policy"),
    pytest.param(0.0, MESH, marks=pytest.mark.slow, id="fsdp8")])
def test_training_with_a_quantized_teacher_equals_the_dense_teacher(files, tmp_path, lmbda, parallel):
    """Two steps of a random 2-layer student (lmbda 0.5: on-policy, with the teacher's own samples otherwise
    (seq_kd); fsdp8: on a mesh of the 8 fake devices, the teacher's packed blocks sharded): the same losses and
    the same dense student."""
    kw = {"policy.lmbda": lmbda, "policy.seq_kd": True, "train.steps": 2, "train.sample_every": 0,
          "train.eval_every": 0, "train.checkpoint_every": 2, "student.init": "random", **parallel}
    runs = {}
    for quantized in (False, True):
        run = tr.setup(tiny_config(files["llama", "Q4_0"], tmp_path / str(quantized),
                                   **kw, **{"teacher.quantized": quantized}))
        runs[quantized] = run, [tr.one_step(run, i)[0]["loss"] for i in range(2)]
        run.logger.close()
    (dense, dense_losses), (packed, packed_losses) = runs[False], runs[True]
    assert quant.is_quantized(packed.teacher.params["layers"]["q"])
    assert not any(quant.is_quantized(x) for x in jax.tree_util.tree_leaves(
        packed.state.params, is_leaf=quant.is_quantized))
    assert min(dense_losses) > 0.1  # a random student: the teacher's logits matter
    np.testing.assert_allclose(packed_losses, dense_losses, rtol=1e-5)
    chex.assert_trees_all_close(packed.state.params, dense.state.params, atol=1e-5)


def test_random_quantized_teacher_and_its_step_row():
    """bench.py quantized_step's teacher: every matrix a QuantizedWeight of the dense layout's shape, holding the
    file bytes its type implies, finite when dequantized; abstract leaves with the same shapes; the step row
    runs (and compiles from abstract arguments) with its memory figures."""
    import types

    from so8t_jax import quant_bench
    from so8t_jax.config import ModelConfig
    t_cfg = ModelConfig(family="qwen2", vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=16, ffn_dim=96, attn_bias=True)
    s_cfg = t_cfg.replace(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
    dense = model_lib.init_params(t_cfg, jax.random.key(0))
    got = quant_bench.random_quantized(t_cfg, "float32", "Q8_0", jax.random.key(1))
    abstract = quant_bench.random_quantized(t_cfg, "float32", "Q8_0")
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(abstract)
    for path, x in jax.tree_util.tree_leaves_with_path(dense):
        q = got
        for k in path:
            q = q[k.key]
        assert q.shape == x.shape, path
        if quant.is_quantized(q):
            assert q.nbytes == x.size // 32 * 34  # Q8_0: 34 bytes a block of 32
            assert np.isfinite(np.asarray(quant.dequantize(q))).all()
    with pytest.raises(ValueError, match="Q4_K blocks hold 256 values"):
        quant_bench.random_quantized(t_cfg, "float32", "Q4_K")
    args = types.SimpleNamespace(teacher_preset="tiny", student_preset="tiny", qtype="Q8_0", dtype="float32",
                                 batch=2, prompt_len=4, new=4, repeats=1, freeze="embed", compile_only=False)
    row = quant_bench.step_row(t_cfg, s_cfg, args, 1.0)
    assert row["seconds"] > 0 and row["teacher_bytes"] == quant.nbytes(got) and row["freeze"] == "embed"
    assert row["static_peak_bytes"] == row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + \
        row["temp_bytes"] > row["teacher_bytes"]
    compiled_only = quant_bench.step_row(t_cfg, s_cfg, types.SimpleNamespace(**{**vars(args), "compile_only": True}),
                                         1.0)
    assert "seconds" not in compiled_only and compiled_only["argument_bytes"] == row["argument_bytes"]


def test_student_cut_from_a_quantized_teacher_is_dense(files):
    path = files["llama_k", "Q4_K"]
    s = build.student_from_teacher(so8t_jax.load(path, quantized=True), 2, "float32")
    ref = build.student_from_teacher(so8t_jax.load(path), 2, "float32")
    chex.assert_trees_all_equal(s.params, ref.params)


def test_requantize_gguf(files, tmp_path):
    """A Q8_0 file re-quantized to Q4_0: the same metadata and config, F32 norms copied, each quantized tensor
    what gguf.quants.quantize makes of its dequantized values."""
    src = files["llama", "Q8_0"]
    out = quant.requantize_gguf(src, tmp_path / "l.Q4_0.gguf", "Q4_0")
    a, b = GGUFFile(src), GGUFFile(out)
    assert set(b.metadata) == set(a.metadata) and not (tmp_path / "l.Q4_0.gguf.tmp").exists()
    for key in set(a.metadata) - {"general.file_type"}:
        np.testing.assert_equal(b.metadata[key], a.metadata[key])
    assert b.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    for name in ("blk.1.attn_q.weight", "token_embd.weight", "blk.0.attn_norm.weight"):
        qtype, shape, start, n = b.tensors[name]
        want = a.read(name) if a.tensors[name][0].name == "F32" else \
            gguf.quants.quantize(a.read(name), gguf.GGMLQuantizationType.Q4_0)
        got = b.data[start:start + n].view(np.float32).reshape(shape) if qtype.name == "F32" else \
            b.data[start:start + n].reshape(want.shape)
        assert qtype.name == ("F32" if name.endswith("norm.weight") else "Q4_0")
        np.testing.assert_array_equal(got, want)
    m = so8t_jax.load(out, quantized=True)
    assert m.config == so8t_jax.load(src).config and m.params["layers"]["q"].qtypes == ("Q4_0",)


def test_config_teacher_quantized(files, tmp_path):
    c = tiny_config(files["llama", "Q4_0"], tmp_path)
    del c.teacher["quantized"]  # (a bool field refuses a str; a config read back from JSON has no such guard)
    c.teacher.quantized = "yes"
    with pytest.raises(ConfigError, match="teacher.quantized must be True or False"):
        check_config(c)
    c = tiny_config(tmp_path, tmp_path, **{"teacher.quantized": True})
    with pytest.raises(ConfigError, match="is a folder"):
        check_config(c)


@pytest.mark.slow
def test_smollm2_q4_1_kept_quantized():
    """The real SmolLM2-135M Q4_1 file (Q8_0 embeddings): logits equal the dequantized float32 teacher's, and the
    device holds the file's ~97 MB instead of ~540 MB."""
    path = smollm2_gguf()
    q, d = so8t_jax.load(path, quantized=True), so8t_jax.load(path)
    assert q.params["layers"]["q"].qtypes == ("Q4_1",) and q.params["embed"].qtypes == ("Q8_0",)
    tokens = _tokens(q.config.vocab_size, 2, 16)
    assert np.abs(np.asarray(q.logits(tokens)) - np.asarray(d.logits(tokens))).max() <= 1e-3
    assert q.nbytes <= 1.25 * quant.file_tensor_bytes(GGUFFile(path)) and d.nbytes > 5 * q.nbytes
