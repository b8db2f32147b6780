"""data.source teacher:N (so8t_jax/teacher_prompts.py): the chat template's opening of a user turn, the filter on
sampled requests, generation as a pure function of (teacher, N, seed), the cache (reused, invalidated by another
teacher or seed), a run trained on them, and the errors. The real SmolLM2 teacher writes real requests (slow)."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import build_tokenizer, make_hf_model, write_gguf
from test_trainer import tiny_config

import so8t_jax
from so8t_jax import data, teacher_prompts
from so8t_jax import trainer as tr
from so8t_jax.loading import smollm2_gguf
from so8t_jax.rows import DataError


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return write_gguf(make_hf_model("llama", root / "hf", num_hidden_layers=2), root / "t.gguf", "F32")


@pytest.fixture
def flat(teacher_file, monkeypatch):
    """The tiny teacher with a zero output layer (every token equally likely, so 1 / V for its turn end) and
    requests up to 400 tokens long, so that most draws close their turn."""
    monkeypatch.setattr(teacher_prompts, "MAX_NEW_TOKENS", 400)
    m = so8t_jax.load(teacher_file)
    return dataclasses.replace(m, params={**m.params, "lm_head": jnp.zeros_like(m.params["lm_head"])})


def test_parse():
    assert teacher_prompts.parse("teacher:1024") == (1024, 0)
    assert teacher_prompts.parse("teacher:8:3") == (8, 3)
    for bad in ("teacher:", "teacher:0", "teacher:x", "teacher:1:2:3", "teacher:-4"):
        with pytest.raises(DataError, match="teacher:N"):
            teacher_prompts.parse(bad)


def test_opening_is_the_template_before_the_users_text():
    tok = build_tokenizer()
    full = tok.apply_chat_template([{"role": "user", "content": "How tall is Mont Blanc?"}], tokenize=False)
    opening = tok.decode(list(teacher_prompts.opening_ids(tok)))
    assert full.startswith(opening) and full[len(opening):].startswith("How tall") and opening.endswith("user\n")
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        teacher_prompts.opening_ids(tok, "teacher:4")


def test_keep_takes_closed_long_distinct_requests():
    tok = build_tokenizer()
    end = 2
    ids = [tok("Where is Lima, Peru?", add_special_tokens=False)["input_ids"],
           tok("Hi?", add_special_tokens=False)["input_ids"],                     # too short
           tok("Where is Lima, Peru?", add_special_tokens=False)["input_ids"],   # a duplicate
           tok("Name three rivers", add_special_tokens=False)["input_ids"]]      # cut: not closed
    width = max(map(len, ids)) + 1
    tokens = np.zeros((4, width), np.int32)
    lengths = np.zeros(4, np.int32)
    for r, seq in enumerate(ids):
        seq = seq + [end] if r != 3 else seq
        tokens[r, :len(seq)], lengths[r] = seq, len(seq)
    seen = set()
    assert teacher_prompts.keep(tokens, lengths, end, tok, seen) == ["Where is Lima, Peru?"]
    assert teacher_prompts.keep(tokens, lengths, end, tok, seen) == []  # seen already


def test_write_prompts_is_a_pure_function_of_teacher_and_seed(flat):
    a, draws = teacher_prompts.write_prompts(flat.params, flat.config, flat.tokenizer, 6, seed=0)
    b, _ = teacher_prompts.write_prompts(flat.params, flat.config, flat.tokenizer, 6, seed=0)
    c, _ = teacher_prompts.write_prompts(flat.params, flat.config, flat.tokenizer, 6, seed=1)
    assert a == b and a != c and len(a) == len(set(a)) == 6 and draws == teacher_prompts.BATCH
    assert all(len(p) >= teacher_prompts.MIN_CHARS for p in a)


def test_too_few_requests_is_an_error_naming_the_source(flat, monkeypatch):
    monkeypatch.setattr(teacher_prompts, "MAX_NEW_TOKENS", 2)  # a turn closed within 2 tokens of 1 / V each
    with pytest.raises(DataError, match=r"teacher:9: the teacher wrote only \d+ usable requests .* in 96 draws"):
        teacher_prompts.write_prompts(flat.params, flat.config, flat.tokenizer, 9, 0, "teacher:9")


def test_cache_is_reused_and_follows_teacher_and_seed(flat, tmp_path, monkeypatch):
    config = tiny_config(tmp_path, tmp_path, **{"data.source": "teacher:5", "policy.seq_kd": True})
    rows, report = data.run_rows(config, flat)
    info = report["teacher_prompts"]
    assert not info["hit"] and len(rows) == report["rows"] == 5 and all(r.completion is None for r in rows)
    saved = [json.loads(line)["prompt"] for line in open(info["path"], encoding="utf-8")]
    assert saved == [r.prompt for r in rows]

    def no_sampling(*a, **k):
        raise AssertionError("the cache should have been read")
    with monkeypatch.context() as m:
        m.setattr(teacher_prompts, "write_prompts", no_sampling)
        again, report2 = data.run_rows(config, flat)
    assert report2["teacher_prompts"] == {**info, "hit": True} and again == rows
    other_seed, r3 = data.run_rows(tiny_config(tmp_path, tmp_path, **{"data.source": "teacher:5:1",
                                                                      "policy.seq_kd": True}), flat)
    assert r3["teacher_prompts"]["key"] != info["key"] and other_seed != rows
    changed = dataclasses.replace(flat, params={**flat.params, "final_norm": flat.params["final_norm"] * 2})
    assert data.run_rows(config, changed)[1]["teacher_prompts"]["key"] != info["key"]
    with pytest.raises(ValueError, match="pass the loaded teacher"):
        data.run_rows(config)


def test_prompt_only_rows_need_seq_kd_or_on_policy_steps(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(4)))
    with pytest.raises(DataError, match="all 4 rows have a prompt but no completion"):
        data.run_rows(tiny_config(tmp_path, tmp_path, **{"data.source": str(path), "policy.lmbda": 0.0}))
    for ok in ({"policy.seq_kd": True}, {"policy.lmbda": 1.0}):
        assert len(data.run_rows(tiny_config(tmp_path, tmp_path, **{"data.source": str(path), **ok}))[0]) == 4


def test_a_run_on_teacher_written_prompts(teacher_file, tmp_path, monkeypatch):
    """Two steps on 12 requests the (random) teacher wrote, completed by the teacher (seq_kd): the data report
    names the cache; the run's own held-out rows are teacher-written and teacher-completed too (a held-out loss),
    and a rerun reads the cache."""
    monkeypatch.setattr(teacher_prompts, "MAX_NEW_TOKENS", 400)
    kw = {"data.source": "teacher:12", "policy.seq_kd": True, "policy.lmbda": 0.0, "train.steps": 2,
          "train.eval_every": 0, "train.sample_every": 0, "data.heldout_fraction": 0.25}
    results = tr.train(tiny_config(teacher_file, tmp_path / "a", **kw))
    assert results["steps"] == 2 and np.isfinite(results["loss"]["last"])
    assert abs(results["loss"]["first"]) < 1e-6  # the student keeps both of the teacher's 2 layers: KL 0 at first
    info = results["data"]["teacher_prompts"]
    assert results["data"]["rows"] == 12 and not info["hit"]
    # the held-out requests got the teacher's completions too (seq_kd): a held-out loss, not 0 over no targets
    assert results["evaluation"]["heldout_loss_final"] > 0
    again = tr.train(tiny_config(teacher_file, tmp_path / "a", **{**kw, "run_name": "rerun"}))
    assert again["data"]["teacher_prompts"] == {**info, "hit": True}


@pytest.mark.slow
def test_smollm2_writes_real_requests(tmp_path):
    """The shipped SmolLM2-135M-Instruct writes closed, distinct English requests from its opening alone."""
    m = so8t_jax.load(smollm2_gguf())
    prompts, draws = teacher_prompts.write_prompts(m.params, m.config, m.tokenizer, 12, 0)
    assert len(set(prompts)) == 12 and draws <= 3 * teacher_prompts.BATCH
    words = " ".join(prompts).lower().split()
    assert sum(w in ("i", "you", "can", "how", "what", "the", "a", "me", "help") for w in words) > 12, prompts
