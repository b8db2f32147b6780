"""so8t_jax.data: file formats, malformed rows, builtin:diverse, encoding with the fixtures' ChatML tokenizer,
bucketed batches and exact resume."""
import json
import re

import numpy as np
import pytest
from fixtures import build_tokenizer

from so8t_jax.data import (IGNORE_INDEX, Batcher, DataError, Encoded, Row, builtin_diverse, encode_rows, fingerprint,
                           load_rows, messages_for, split_heldout)

PC_ROWS = [  # prompt/completion strings (what a CSV can hold too)
    {"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5.\n#### 5", "safety_label": "allow", "answer": "5"},
    {"prompt": "How do I make a bomb?", "completion": "I can't help with that.", "safety_label": "deny",
     "answer": None},
    {"prompt": "Write a haiku about rain.", "completion": None, "safety_label": None, "answer": None},
]
PC_EXPECTED = [Row("What is 2 + 3?", "2 + 3 = 5.\n#### 5", 0, "5"), Row("How do I make a bomb?",
               "I can't help with that.", 2, None), Row("Write a haiku about rain.", None, -1, None)]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "4"}]


def _write(folder, fmt, rows):
    import datasets
    import pandas as pd

    if fmt == "jsonl":
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif fmt == "json":
        path = folder / "data.json"
        path.write_text(json.dumps(rows, ensure_ascii=False))
    elif fmt == "csv":
        path = folder / "data.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        path = folder / "data.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:  # a save_to_disk folder holding a DatasetDict
        path = folder / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(path))
    return path


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "saved"])
def test_prompt_completion_rows_load_from_every_format(tmp_path, fmt):
    assert load_rows(str(_write(tmp_path, fmt, PC_ROWS))) == PC_EXPECTED


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "saved"])
def test_messages_rows_split_at_the_last_assistant_turn(tmp_path, fmt):
    rows = load_rows(str(_write(tmp_path, fmt, [{"messages": MESSAGES, "safety_label": 1}])))
    assert rows == [Row(tuple(MESSAGES[:4]), "4", 1, None)]
    assert messages_for(rows[0]) == MESSAGES[:4]


def test_conversational_prompt_completion_text_and_numeric_columns(tmp_path):
    path = _write(tmp_path, "jsonl", [
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]},
        {"prompt": "Plain", "safety_label": 2, "answer": 7},
        {"text": "Just some text to model."}])
    assert load_rows(str(path)) == [Row(({"role": "user", "content": "Hi"},), "Yo"), Row("Plain", None, 2, "7"),
                                    Row(None, "Just some text to model.")]


def test_split_selection_and_source_errors(tmp_path):
    saved = _write(tmp_path, "saved", PC_ROWS)
    assert load_rows(str(saved), split="test") == PC_EXPECTED[:1]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_rows(str(saved), split="validation")
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: the dataset is empty"):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(tmp_path / "data.txt"))
    with pytest.raises(DataError, match="builtin:diverse:N"):
        load_rows("builtin:other:3")
    assert load_rows("builtin:diverse:20:3") == builtin_diverse(20, 3)


GOOD = {"prompt": "fine", "completion": "ok"}
BAD_ROWS = {
    "no assistant turn": ({"messages": [{"role": "user", "content": "q"}]}, "'messages' has no assistant turn"),
    "trailing user turn": ({"messages": MESSAGES + [{"role": "user", "content": "and?"}]},
                           "'messages' ends with a 'user' turn after the last assistant turn"),
    "message without role": ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]},
                             "'messages' message 0 has no 'role'"),
    "message without content": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
                                "'messages' message 0 has no 'content'"),
    "message content not a string": ({"prompt": [{"role": "user", "content": 3}], "completion": "ok"},
                                     "'prompt' message 0: 'content' must be a string, not int"),
    "unknown safety label": ({"prompt": "p", "safety_label": "maybe"},
                             "unknown safety_label 'maybe' (allow|escalate|deny"),
    "safety label out of range": ({"prompt": "p", "safety_label": 7}, "unknown safety_label 7"),
    "no known column": ({"question": "q"}, "no prompt, completion, messages or text column"),
    "completion alone": ({"completion": "c"}, "'completion' without a 'prompt'"),
    "prompt of wrong type": ({"prompt": 5}, "'prompt' must be a string or a list of messages, not int"),
    "empty prompt": ({"prompt": "  "}, "'prompt' is empty"),
    "completion of wrong type": ({"prompt": "p", "completion": {"x": 1}}, "'completion' must be a string or a list"),
    "two-message completion": ({"prompt": "p", "completion": MESSAGES[1:3]},
                               "'completion' as messages must be exactly one assistant message"),
    "messages and prompt": ({"messages": MESSAGES, "prompt": "p"}, "both 'messages' and 'prompt'"),
    "text of wrong type": ({"text": ["a"]}, "'text' must be a string, not list"),
    "answer of wrong type": ({"prompt": "p", "answer": ["5"]}, "'answer' must be a string, not list"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_malformed_row_names_file_row_and_problem(tmp_path, case):
    bad, problem = BAD_ROWS[case]
    path = _write(tmp_path, "jsonl", [GOOD, GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert str(err.value).startswith(f"{path} line 4 (row 3): ")  # the 1-based line, the 0-based row
    assert problem in str(err.value)


# ------------------------------------------------------------------------------------------------ builtin

CJK = re.compile("[\u3040-\u30ff\u4e00-\u9fff]")


def test_builtin_diverse_is_deterministic_and_seeded():
    a = builtin_diverse(200, seed=1)
    assert len(a) == 200 and a == builtin_diverse(200, seed=1)
    assert fingerprint(a) == fingerprint(builtin_diverse(200, seed=1))
    b = builtin_diverse(200, seed=2)
    assert a != b and fingerprint(a) != fingerprint(b)
    assert builtin_diverse(50, seed=1) == a[:50]


def test_builtin_safety_rows():
    rows = load_rows("builtin:safety:300:2")
    assert rows == load_rows("builtin:safety:300:2") and load_rows("builtin:safety:100:2") == rows[:100]
    assert len({r.prompt for r in rows}) == 300 and all(r.completion for r in rows)
    labels = np.array([r.safety_label for r in rows])
    assert set(labels) == {0, 1, 2} and all(np.mean(labels == k) > 0.2 for k in (0, 1, 2))
    assert 60 <= sum(bool(CJK.search(r.prompt)) for r in rows) <= 150  # about a third Japanese
    with pytest.raises(DataError, match="builtin:safety needs n >= 1"):
        load_rows("builtin:safety:0")


def test_builtin_diverse_mix():
    rows = builtin_diverse(1000)
    prompts = [r.prompt for r in rows]
    assert len(set(prompts)) == 1000 and all(isinstance(p, str) and p for p in prompts)
    ja = [bool(CJK.search(p)) for p in prompts]
    assert 250 <= sum(ja) <= 450  # about a third Japanese
    labels = np.array([r.safety_label for r in rows])
    assert 200 <= np.sum(labels >= 0) <= 300
    for label in (0, 1, 2):
        assert np.sum(labels == label) >= 50
        assert {ja[i] for i in np.flatnonzero(labels == label)} == {True, False}  # both languages
    no_completion = sum(r.completion is None for r in rows)
    assert 20 <= no_completion <= 200
    assert all(r.completion is not None for r in rows if r.safety_label >= 0 or r.answer is not None)


def test_builtin_math_answers_match_their_worked_completions():
    rows = [r for r in builtin_diverse(1000) if r.answer is not None]
    assert len(rows) > 300
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, "÷": lambda a, b: a / b}
    checked = 0
    for r in rows:
        work, final = r.completion.rsplit("\n#### ", 1)
        assert final == r.answer
        for a, op, b, c in re.findall(r"(\d+) ([-+×÷]) (\d+) = (\d+)", work):
            assert ops[op](int(a), int(b)) == int(c), r
            checked += 1
        if r.answer.isdigit():
            assert re.findall(r"\d+", work)[-1] == r.answer  # the worked answer ends at the stated number
    assert checked > 300


# ------------------------------------------------------------------------------------------------ encoding


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_encode_rows_applies_the_chat_template(tok):
    (enc,) = encode_rows([Row("hi", "The answer is 42.", 2, "42")], tok, 64, 16)
    # ChatML written out by hand: <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n
    pieces = [[1], tok("user\nhi", add_special_tokens=False)["input_ids"], [2],
              tok("\n", add_special_tokens=False)["input_ids"], [1],
              tok("assistant\n", add_special_tokens=False)["input_ids"]]
    assert enc.prompt_ids == tuple(i for p in pieces for i in p)
    assert enc.prompt_ids[0] == 1 and enc.prompt_ids.count(2) == 1
    assert enc.completion_ids == (302, 377, 294, 223, 22, 20, 16, 2)
    assert [tok.decode([i]) for i in enc.completion_ids] == ["The", " answer", " is", " ", "4", "2", ".",
                                                             "<|im_end|>"]
    assert (enc.safety_label, enc.answer) == (2, "42")


def test_encode_rows_messages_text_prompt_only_and_raw(tok):
    msgs = (MESSAGES[0], MESSAGES[1])
    by_template = tok.apply_chat_template(list(msgs), add_generation_prompt=True, tokenize=True, return_dict=False)
    enc = encode_rows([Row(msgs, "Hello!"), Row(None, "Just text."), Row("hi", None)], tok, 64, 16)
    assert enc[0].prompt_ids == tuple(by_template)
    assert enc[1].prompt_ids == () and enc[1].completion_ids == (*tok("Just text.")["input_ids"], 2)
    assert enc[2].completion_ids == ()
    (raw,) = encode_rows([Row("hi", "ok")], tok, 64, 16, chat=False)
    assert raw.prompt_ids == tuple(tok("hi")["input_ids"])


def test_encode_rows_truncation_keeps_the_prompt_tail(tok):
    long_prompt = " ".join(["knowledge distillation"] * 20)
    full = encode_rows([Row(long_prompt, "The answer is 42.")], tok, 1000, 100)[0]
    (short,) = encode_rows([Row(long_prompt, "The answer is 42.")], tok, 10, 3, eos_id=2)
    assert len(full.prompt_ids) > 10
    assert short.prompt_ids == full.prompt_ids[-10:]
    generation_prompt = tuple(encode_rows([Row("x", None)], tok, 64, 8)[0].prompt_ids[-6:])  # <|im_start|>assistant\n
    assert generation_prompt[0] == 1 and short.prompt_ids[-6:] == generation_prompt
    assert short.completion_ids == full.completion_ids[:3] and 2 not in short.completion_ids


# ------------------------------------------------------------------------------------------------ batching


def test_batch_padding_masks_and_labels_on_a_hand_made_example():
    data = [Encoded((5, 6, 7), (8, 9, 2), 0), Encoded((10,), (11, 2), -1), Encoded((), (12, 13, 2), 2)]
    b = Batcher(data, batch_size=3, seed=4, prompt_buckets=(8, 4), completion_len=4, pad_id=0)
    expected = {  # per row: prompt_ids, prompt_mask, completion_ids, completion_mask, labels
        0: ([0, 5, 6, 7], [0, 1, 1, 1], [8, 9, 2, 0], [1, 1, 1, 0], [-100] * 4 + [8, 9, 2, -100]),
        1: ([0, 0, 0, 10], [0, 0, 0, 1], [11, 2, 0, 0], [1, 1, 0, 0], [-100] * 4 + [11, 2, -100, -100]),
        2: ([0, 0, 0, 0], [0, 0, 0, 0], [12, 13, 2, 0], [1, 1, 1, 0], [-100] * 5 + [13, 2, -100]),  # nothing
    }                                                                                    # predicts the first token
    order = b.indices(0)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert order.tolist() == np.random.default_rng([4, 0]).permutation(3).tolist()
    batch = b.batch(0)
    assert {k: v.shape for k, v in batch.items()} == {
        "prompt_ids": (3, 4), "prompt_mask": (3, 4), "completion_ids": (3, 4), "completion_mask": (3, 4),
        "input_ids": (3, 8), "attention_mask": (3, 8), "labels": (3, 8), "safety_label": (3,)}
    assert all(v.dtype == np.int32 for v in batch.values())
    for row, i in enumerate(order):
        p, pm, c, cm, labels = expected[int(i)]
        np.testing.assert_array_equal(batch["prompt_ids"][row], p)
        np.testing.assert_array_equal(batch["prompt_mask"][row], pm)
        np.testing.assert_array_equal(batch["completion_ids"][row], c)
        np.testing.assert_array_equal(batch["completion_mask"][row], cm)
        np.testing.assert_array_equal(batch["input_ids"][row], p + c)
        np.testing.assert_array_equal(batch["attention_mask"][row], pm + cm)
        np.testing.assert_array_equal(batch["labels"][row], labels)
        assert batch["safety_label"][row] == data[int(i)].safety_label
    assert IGNORE_INDEX == -100


@pytest.fixture(scope="module")
def encoded(tok):
    return encode_rows(builtin_diverse(40, seed=5), tok, max_prompt_len=128, max_completion_len=24)


def test_batches_use_the_buckets_and_label_only_valid_completion_tokens(encoded):
    b = Batcher(encoded, batch_size=2, seed=0, prompt_buckets=(64, 96, 128), completion_len=16)
    seen = set()
    for step in range(30):
        batch, idx = b.batch(step), b.indices(step)
        P = batch["prompt_ids"].shape[1]
        seen.add(P)
        assert P in (64, 96, 128) and batch["input_ids"].shape == (2, P + 16)
        longest = max(len(encoded[i].prompt_ids) for i in idx)
        assert longest <= P and (P == 64 or longest > {96: 64, 128: 96}[P])  # the smallest bucket that fits
        prompt_part, completion_part = batch["labels"][:, :P], batch["labels"][:, P:]
        assert np.all(prompt_part == -100)
        valid = batch["completion_mask"] == 1
        valid[:, 0] &= batch["prompt_mask"][:, -1] == 1
        np.testing.assert_array_equal(completion_part, np.where(valid, batch["completion_ids"], -100))
    assert seen == {64, 96, 128}


def test_batches_are_a_pure_function_of_seed_and_step(encoded):
    first = Batcher(encoded, batch_size=4, seed=3, prompt_buckets=(64, 128), completion_len=8)
    run = {step: first.batch(step) for step in range(21)}
    resumed = Batcher(encoded, batch_size=4, seed=3, prompt_buckets=(64, 128), completion_len=8)
    for step in range(10, 21):
        for key, value in resumed.batch(step).items():
            np.testing.assert_array_equal(value, run[step][key])
            np.testing.assert_array_equal(first.batch(step)[key], value)
    other = Batcher(encoded, batch_size=4, seed=4, prompt_buckets=(64, 128), completion_len=8)
    assert any(not np.array_equal(other.indices(s), first.indices(s)) for s in range(5))


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_every_row_once_per_epoch(drop_remainder):
    data = [Encoded((i + 1,), (i + 1, 2)) for i in range(10)]
    b = Batcher(data, batch_size=3, seed=7, prompt_buckets=(4,), completion_len=2, drop_remainder=drop_remainder)
    if drop_remainder:  # 3 whole batches an epoch; its last row is skipped
        for epoch in range(3):
            steps = range(3 * epoch, 3 * epoch + 3)
            assert {b.epoch_of(s) for s in steps} == {epoch}
            idx = np.concatenate([b.indices(s) for s in steps])
            assert len(set(idx.tolist())) == 9
    else:  # rows run on across epoch boundaries: 30 consecutive positions are 3 whole epochs
        idx = np.concatenate([b.indices(s) for s in range(10)])
        for epoch in range(3):
            assert sorted(idx[10 * epoch:10 * epoch + 10].tolist()) == list(range(10))
        assert [b.epoch_of(s) for s in range(7)] == [0, 0, 0, 0, 1, 1, 1]
        assert not np.array_equal(idx[:10], idx[10:20])  # a new order each epoch
    assert len(b) == 10
    np.testing.assert_array_equal(b.batch(2)["prompt_ids"][:, -1], b.indices(2) + 1)


def test_batcher_rejects_prompts_longer_than_the_largest_bucket():
    with pytest.raises(DataError, match="row 1: prompt of 5 tokens is longer than the largest bucket 4"):
        Batcher([Encoded((1,), (2,)), Encoded((1, 1, 1, 1, 1), (2,))], 2, prompt_buckets=(4,), completion_len=2)


# ------------------------------------------------------------------------------------------------ misc


def test_fingerprint_split_heldout_and_messages_for():
    rows = builtin_diverse(50, seed=9)
    assert re.fullmatch("[0-9a-f]{64}", fingerprint(rows))
    changed = rows[:-1] + [Row(rows[-1].prompt, rows[-1].completion, rows[-1].safety_label, "other")]
    assert fingerprint(changed) != fingerprint(rows)
    assert fingerprint([Row(tuple(MESSAGES[:2]), "x")]) == fingerprint([Row(tuple(MESSAGES[:2]), "x")])
    train, held = split_heldout(rows, 0.2, seed=1)
    assert (len(train), len(held)) == (40, 10)
    assert (train, held) == split_heldout(rows, 0.2, seed=1) and held != split_heldout(rows, 0.2, seed=2)[1]
    assert sorted(map(rows.index, train + held)) == list(range(50))
    assert len(split_heldout(rows[:3], 0.01, seed=0)[1]) == 1
    assert messages_for(Row("hi", None)) == [{"role": "user", "content": "hi"}]
    assert messages_for("hi") == messages_for(Row("hi", None)) and messages_for(Row(None, "t")) == []


@pytest.mark.parametrize("policy", [{"lmbda": 0.5}, {"seq_kd": True}])
def test_text_rows_cannot_feed_generated_completions(tmp_path, policy):
    """{"text"} rows have no prompt to sample a completion from: with lmbda > 0 or seq_kd that is a DataError
    before any model loads; offline (lmbda 0, no seq_kd) they train as documents."""
    from so8t_jax import data
    from so8t_jax.defaults import get_config
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "Hi", "completion": "Hello"}\n{"text": "A document."}\n{"text": "Another."}\n')
    c = get_config()
    c.data.source = str(path)
    for key, value in policy.items():
        setattr(c.policy, key, value)
    with pytest.raises(DataError, match=r"mixed.jsonl: 2 of 3 rows are \{\"text\"\} rows without a prompt"):
        data.run_rows(c)
    c.policy.lmbda, c.policy.seq_kd = 0.0, False
    rows, report = data.run_rows(c)
    assert [r.prompt for r in rows] == ["Hi", None, None] and report["rows"] == 3
