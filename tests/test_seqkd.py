"""seq-KD: the teacher's completions made once, cached, reused (across epochs and runs) and invalidated when the
teacher, the prompts or the sampling settings change; a run trains on exactly those completions."""
import dataclasses

import jax
import numpy as np
import pytest
from fixtures import make_hf_model, write_gguf
from test_trainer import tiny_config

import so8t_jax
from so8t_jax import sampling, seqkd
from so8t_jax import trainer as tr
from so8t_jax.completions import PolicyConfig

EOS = 2


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return so8t_jax.load(make_hf_model("llama", tmp_path_factory.mktemp("seqkd") / "t"))


def _prompts(m, n=5, seed=0):
    rng = np.random.RandomState(seed)
    return [tuple(rng.randint(3, m.config.vocab_size, k).tolist()) for k in rng.randint(2, 7, n)]


def test_greedy_completions_equal_each_prompt_alone(teacher):
    """Batched, left-padded generation == each prompt generated alone (an independent path)."""
    policy = PolicyConfig(temperature=0.0, max_new_tokens=6, eos_ids=(EOS,))
    prompts = _prompts(teacher)
    got = seqkd.generate(teacher.params, teacher.config, prompts, policy, seed=0, batch_size=4)
    fn = sampling.make_sample_fn(teacher.config, 6, sampling.GREEDY, (EOS,), 0)
    for p, c in zip(prompts, got):
        tokens, mask = sampling.left_pad([p], len(p))
        out = fn(teacher.params, tokens, mask, jax.random.key(0))
        assert c == tuple(np.asarray(out.tokens_BxN)[0, :int(out.lengths_B[0])].tolist())


def test_cache_is_reused_and_invalidated(teacher, tmp_path, monkeypatch):
    policy = PolicyConfig(temperature=0.9, max_new_tokens=5, eos_ids=(EOS,))
    prompts = _prompts(teacher)
    first, info = seqkd.teacher_completions(teacher.params, teacher.config, prompts, policy, 0, tmp_path)
    assert not info["hit"] and len(first) == len(prompts)
    real = seqkd.generate
    monkeypatch.setattr(seqkd, "generate", lambda *a, **k: pytest.fail("generated although cached"))
    again, info2 = seqkd.teacher_completions(teacher.params, teacher.config, prompts, policy, 0, tmp_path)
    assert info2["hit"] and again == first and info2["key"] == info["key"]
    monkeypatch.setattr(seqkd, "generate", real)
    changed = jax.tree.map(lambda x: x, teacher.params)
    changed["final_norm"] = changed["final_norm"] * 1.001  # another teacher
    variants = {"teacher": (changed, prompts, policy, 0), "prompts": (teacher.params, prompts[:-1], policy, 0),
                "sampling": (teacher.params, prompts, dataclasses.replace(policy, temperature=0.5), 0),
                "seed": (teacher.params, prompts, policy, 1)}
    keys = {info["key"]}
    for name, (params, ps, pol, seed) in variants.items():
        _, inf = seqkd.teacher_completions(params, teacher.config, ps, pol, seed, tmp_path)
        assert not inf["hit"], name
        keys.add(inf["key"])
    assert len(keys) == 5
    path = tmp_path / f"{info['key']}.npz"  # a damaged cache file is generated again, never read as valid
    path.write_bytes(path.read_bytes()[:40])
    again, info3 = seqkd.teacher_completions(teacher.params, teacher.config, prompts, policy, 0, tmp_path)
    assert not info3["hit"] and again == first
    assert not list(tmp_path.glob(".*tmp*"))


def test_run_trains_on_the_cached_teacher_completions(tmp_path_factory):
    root = tmp_path_factory.mktemp("seqkd_run")
    gguf_path = write_gguf(make_hf_model("llama", root / "hf", num_hidden_layers=3), root / "t.gguf", "F32")
    cfg = dict(**{"policy.seq_kd": True, "policy.lmbda": 0.0, "policy.temperature": 0.0, "train.steps": 2,
                  "train.sample_every": 0, "train.eval_every": 0, "train.checkpoint_every": 2,
                  "data.source": "builtin:diverse:12"})
    run = tr.setup(tiny_config(gguf_path, root / "out", **cfg))
    assert run.host["seq_kd_cache"]["hit"] is False and not run.policy.seq_kd  # the step reads them as data
    teacher = run.teacher
    fn = sampling.make_sample_fn(teacher.config, 8, sampling.GREEDY, run.policy.eos_ids, run.policy.pad_id)
    for e in run.batcher.data[:3]:
        tokens, mask = sampling.left_pad([e.prompt_ids], len(e.prompt_ids))
        out = fn(teacher.params, tokens, mask, jax.random.key(0))
        assert e.completion_ids == tuple(np.asarray(out.tokens_BxN)[0, :int(out.lengths_B[0])].tolist())
    tr.close(run)
    run2 = tr.setup(tiny_config(gguf_path, root / "out", **cfg, run_name="second"))
    assert run2.host["seq_kd_cache"]["hit"] is True
    assert [e.completion_ids for e in run2.batcher.data] == [e.completion_ids for e in run.batcher.data]
    tr.close(run2)


def test_length_sorted_batches_keep_each_prompts_completion(teacher):
    """Prompts of lengths across several pad buckets, batched shortest first: each completion still equals the
    prompt generated alone, in the prompts' own order."""
    policy = PolicyConfig(temperature=0.0, max_new_tokens=4, eos_ids=(EOS,))
    rng = np.random.RandomState(3)
    prompts = [tuple(rng.randint(3, teacher.config.vocab_size, k).tolist()) for k in (40, 3, 70, 5, 33, 2)]
    got = seqkd.generate(teacher.params, teacher.config, prompts, policy, seed=0, batch_size=2)
    fn = sampling.make_sample_fn(teacher.config, 4, sampling.GREEDY, (EOS,), 0)
    for p, c in zip(prompts, got):
        out = fn(teacher.params, *sampling.left_pad([p], len(p)), jax.random.key(0))
        assert c == tuple(np.asarray(out.tokens_BxN)[0, :int(out.lengths_B[0])].tolist())
