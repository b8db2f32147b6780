"""A corpus of malformed rows in every file format: each is a DataError naming the file, the row (JSONL / CSV:
the 1-based line and the 0-based row; JSON / parquet / save_to_disk folders: the row) and the problem, raised
before the trainer loads any model; data.skip_bad_rows leaves them out and counts them in the run's results
and audit log."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures import make_hf_model, write_gguf
from test_trainer import tiny_config

from so8t_jax import audit, build, data, defaults
from so8t_jax import trainer as tr
from so8t_jax.data import DataError, Row, load_rows, read_rows

GOOD = {"prompt": "What is 2 + 3?", "completion": "5", "safety_label": "allow"}
GOOD_ROW = Row("What is 2 + 3?", "5", 0, None)
USER, ASSISTANT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
BIG = 1_100_000  # characters: more than data.max_row_chars' default (1 MiB)

# name: (a bad row as a JSON object, or raw bytes for the line; what the error says)
JSON_ROWS = {
    "prompt of wrong type": ({"prompt": 5}, "'prompt' must be a string or a list of messages, not int"),
    "missing keys": ({"question": "q", "reply": "a"}, "no prompt, completion, messages or text column"),
    "empty messages": ({"messages": []}, "'messages' is an empty list"),
    "no assistant turn": ({"messages": [USER]}, "'messages' has no assistant turn"),
    "only an assistant turn": ({"messages": [ASSISTANT]}, "'messages' has nothing before its assistant turn"),
    "unknown role": ({"messages": [{"role": "human", "content": "Hi"}, ASSISTANT]},
                     "'messages' message 0: unknown role 'human'"),
    "content not a string": ({"messages": [USER, {"role": "assistant", "content": ["Hello"]}]},
                             "'messages' message 1: 'content' must be a string, not list"),
    "message not an object": ({"messages": ["Hi", ASSISTANT]}, "'messages' message 0 must be a mapping"),
    "unknown safety_label": ({**GOOD, "safety_label": "harmful"}, "unknown safety_label 'harmful'"),
    "safety_label out of range": ({**GOOD, "safety_label": 3}, "unknown safety_label 3"),
    "safety_label a bool": ({**GOOD, "safety_label": True}, "unknown safety_label True"),
    "row not an object": ([GOOD], "a row must be a mapping of columns (a JSON object), not list"),
    "row null": (None, "a row must be a mapping of columns (a JSON object), not null"),
    "empty completion": ({**GOOD, "completion": " "}, "the completion is empty"),
    "empty assistant turn": ({"messages": [USER, {"role": "assistant", "content": ""}]},
                             "the completion is empty"),
    "text not a string": ({"text": 3}, "'text' must be a string, not int"),
    "answer not a string": ({**GOOD, "answer": {"value": 5}}, "'answer' must be a string, not dict"),
    "prompt and text": ({**GOOD, "text": "t"}, "both 'prompt' and 'text'"),
    "huge row": ({"prompt": "x" * BIG}, f"the row is longer than data.max_row_chars = {1 << 20:,} "
                                        f"({BIG + 14:,} characters)"),
}
LINE_ROWS = {  # JSON lines only: what a line can hold that a JSON value cannot
    "invalid UTF-8": (b'{"prompt": "caf\xe9 au lait"}', "not valid UTF-8 (byte 0xe9 at byte 16 of the line)"),
    "invalid JSON": (b'{"prompt": "p", "completion": }', "not valid JSON (Expecting value: line 1 column 31"),
    "truncated line": (b'{"prompt": "p", "compl', "not valid JSON (Unterminated string"),
    "NaN": (b'{"prompt": NaN}', "not valid JSON (NaN is not valid JSON)"),
}


def _jsonl(path, bad):
    """Rows 0, 1 on lines 1, 2; a blank line 3; the bad row 2 on line 4; a good row after it."""
    line = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
    good = json.dumps(GOOD).encode()
    path.write_bytes(b"\n".join([good, good, b"", line, good]) + b"\n")
    return path, f"{path} line 4 (row 2): "


def _json(path, bad):
    path.write_text(json.dumps([GOOD, GOOD, bad, GOOD]))
    return path, f"{path} row 2: "


CSV_HEADER = "prompt,completion,safety_label\n"
CSV_ROWS = {  # the bad record's text, what the error says
    "too many fields": ("p,c,allow,extra", "4 fields, but the header has 3 columns"),
    "too few fields": ("p,c", "2 fields, but the header has 3 columns"),
    "missing prompt": (",c,allow", "'completion' without a 'prompt'"),
    "unknown safety_label": ("p,c,maybe", "unknown safety_label 'maybe'"),
    "invalid UTF-8": (b"p,caf\xe9,allow".decode("utf-8", "surrogateescape"), "column 'completion' is not valid UTF-8"),
    "stray quote": ('p,"c"x,allow', "not valid CSV"),
    "huge field": ("p," + "c" * BIG + ",allow",
                   f"the row is longer than data.max_row_chars = {1 << 20:,} (a field of more than"),
}


def _csv(path, bad):
    """Row 0 spans lines 2-3 (a quoted newline), row 1 line 4, a blank line 5, the bad row 2 on line 6."""
    text = CSV_HEADER + '"What is\n2 + 3?",5,allow\np,c,deny\n\n' + bad + "\np,c,\n"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path, f"{path} line 6 (row 2): "


PARQUET_TABLES = {  # a column of the wrong type makes every row bad: the error names row 0
    "prompt column of integers": (pa.table({"prompt": pa.array([1, 2, 3], pa.int64())}), 0,
                                  "'prompt' must be a string or a list of messages, not int"),
    "messages of wrong struct": (pa.table({"messages": [[{"role": "user", "content": 1}]] * 3}), 0,
                                 "'messages' message 0: 'content' must be a string, not int"),
    "safety_label of floats": (pa.table({"prompt": ["a", "b", "c"], "safety_label": [0.0, 2.0, 0.5]}), 2,
                               "unknown safety_label 0.5"),
    "messages without an assistant turn": (pa.table({"messages": [[USER, ASSISTANT], [USER, ASSISTANT], [USER]]}),
                                           2, "'messages' has no assistant turn"),
}


def _corpus():
    cases = [(f"jsonl: {n}", "jsonl", bad, problem) for n, (bad, problem) in {**JSON_ROWS, **LINE_ROWS}.items()]
    cases += [(f"json: {n}", "json", bad, problem) for n, (bad, problem) in JSON_ROWS.items()]
    cases += [(f"csv: {n}", "csv", bad, problem) for n, (bad, problem) in CSV_ROWS.items()]
    cases += [(f"parquet: {n}", "parquet", n, problem) for n, (_, _, problem) in PARQUET_TABLES.items()]
    cases += [("saved: unknown role", "saved", {"messages": [{"role": "bot", "content": "x"}, ASSISTANT]},
               "'messages' message 0: unknown role 'bot'")]
    return {name: case for name, *case in cases}


CORPUS = _corpus()


def write_case(tmp_path, fmt, bad):
    """The file of a corpus case and the start its error must have."""
    if fmt == "jsonl":
        return _jsonl(tmp_path / "data.jsonl", bad)
    if fmt == "json":
        return _json(tmp_path / "data.json", bad)
    if fmt == "csv":
        return _csv(tmp_path / "data.csv", bad)
    if fmt == "parquet":
        table, row, _ = PARQUET_TABLES[bad]
        pq.write_table(table, tmp_path / "data.parquet")
        return tmp_path / "data.parquet", f"{tmp_path / 'data.parquet'} row {row}: "
    import datasets

    datasets.Dataset.from_list([{"messages": [USER, ASSISTANT]}] * 2 + [bad]).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved", f"{tmp_path / 'saved'} row 2: "


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")
    monkeypatch.setattr(build, "load_teacher", refuse)
    monkeypatch.setattr(build, "make_student", refuse)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_each_bad_row_is_named_with_its_row_before_any_model_loads(case, tmp_path, no_model_loads):
    fmt, bad, problem = CORPUS[case]
    path, where = write_case(tmp_path, fmt, bad)
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    message = str(err.value)
    assert message.startswith(where) and problem in message, message
    assert message.endswith("data.skip_bad_rows=True leaves bad rows out)")
    config = defaults.get_config()  # teacher "smollm2": the packaged GGUF, never reached
    config.data.source = str(path)
    with pytest.raises(DataError) as err:
        tr.setup(config)
    assert str(err.value) == message
    if fmt == "parquet" and PARQUET_TABLES[bad][1] == 0:  # the whole column is bad: nothing left to skip to
        with pytest.raises(DataError, match=f"{path}: no usable row: all 3 are bad"):
            read_rows(str(path), skip_bad_rows=True)
        return
    kept, report = read_rows(str(path), skip_bad_rows=True)
    skipped = report["skipped_first"]
    assert [e[:len(where)] for e in skipped] == [where] and problem in skipped[0]  # only that row is bad ...
    assert len(kept) == report["rows"] == {"parquet": 2, "saved": 2}.get(fmt, 3)  # ... and every other row is kept
    assert report["skipped"] == 1
    if fmt in ("jsonl", "json"):
        assert kept == [GOOD_ROW] * 3


# ------------------------------------------------------------------------------------------------ damaged files


@pytest.mark.parametrize("skip", [False, True])
def test_a_truncated_json_file_names_the_row_it_ends_in(tmp_path, skip):
    pieces = [json.dumps(r) for r in (GOOD, {"messages": [USER, ASSISTANT]}, GOOD, GOOD)]
    text = "[" + ", ".join(pieces) + "]"
    starts = [1 + sum(len(p) + 2 for p in pieces[:k]) for k in range(4)]  # where rows 0..3 begin
    assert json.loads(text) and all(text.startswith(p, i) for p, i in zip(pieces, starts))
    path = tmp_path / "data.json"
    for row, start in enumerate(starts):
        for cut in (start + 1, start + 15, start + 40):  # in a key, in a value, in the messages list
            path.write_text(text[:cut])
            with pytest.raises(DataError) as err:  # a damaged file is never a bad row to skip
                read_rows(str(path), skip_bad_rows=skip)
            assert str(err.value).startswith(f"{path} row {row}: not valid JSON (")
            assert str(err.value).endswith("; the file ends there (truncated?)")
    path.write_text(text[:-1])  # every row complete, the list not closed
    with pytest.raises(DataError, match=r"data.json after row 3: not valid JSON \(expected ',' or '\]': line 1 "
                                        r"column \d+ \(char \d+\)\); the file ends there \(truncated\?\)"):
        read_rows(str(path), skip_bad_rows=skip)


def test_other_damaged_json_files(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n{"prompt": "a"}\n{"prompt": "b"}]')
    with pytest.raises(DataError, match=r"data.json after row 0: not valid JSON \(expected ',' or '\]': line 3 "
                                        r"column 1 \(char 18\)\)$"):
        load_rows(str(path))
    path.write_text('[{"prompt": "a"}] {"prompt": "b"}')
    with pytest.raises(DataError, match=r"data.json after row 0: not valid JSON \(extra data after the list: "
                                        r"line 1 column 19 \(char 18\)\)$"):
        load_rows(str(path))
    path.write_bytes(b'[\n{"prompt": "a"},\n{"prompt": "\xff"}]')
    with pytest.raises(DataError, match=r"data.json line 3: not valid UTF-8 \(byte 0xff\)"):
        load_rows(str(path))
    path.write_text("[]")
    with pytest.raises(DataError, match="data.json: the dataset is empty"):
        load_rows(str(path))
    # what `datasets` also reads as a .json file: one object a line, or a single object
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    assert load_rows(str(path)) == [GOOD_ROW] * 2
    path.write_text(json.dumps(GOOD, indent=2))
    with pytest.raises(DataError, match="data.json line 1 .row 0.: not valid JSON"):  # pretty-printed: not a line
        load_rows(str(path))


def test_csv_header_problems_and_pandas_floats(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,prompt,completion\na,b,c\n")
    with pytest.raises(DataError, match="data.csv line 1: the header has a repeated column name"):
        load_rows(str(path))
    path.write_text("prompt,,completion\na,b,c\n")
    with pytest.raises(DataError, match="data.csv line 1: the header has a column name '' that is empty"):
        load_rows(str(path))
    path.write_text("prompt,safety_label,answer\na,2.0,7\nb,,\n")  # pandas writes an int column with blanks as floats
    assert load_rows(str(path)) == [Row("a", None, 2, "7"), Row("b", None, -1, None)]


def test_a_line_past_the_byte_bound_is_skipped_without_losing_the_next_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"prompt": "p"})  # 15 characters
    path.write_text("\n".join([good, json.dumps({"prompt": "x" * 200}), json.dumps({"prompt": "y" * 30}), good]))
    rows, report = read_rows(str(path), skip_bad_rows=True, max_row_chars=16)
    assert rows == [Row("p", None)] * 2 and report["skipped"] == 2
    assert report["skipped_first"] == [
        f"{path} line 2 (row 1): the row is longer than data.max_row_chars = 16 (more than 66 bytes)",
        f"{path} line 3 (row 2): the row is longer than data.max_row_chars = 16 (44 characters)"]
    assert load_rows(str(path), max_row_chars=215) == [Row("p", None), Row("x" * 200, None), Row("y" * 30, None),
                                                       Row("p", None)]


def test_skip_bad_rows_counts_them_and_no_good_row_left_is_an_error(tmp_path):
    path = tmp_path / "data.jsonl"
    bad = [v for v, _ in list(JSON_ROWS.values()) + list(LINE_ROWS.values())]
    lines = []
    for b in bad:  # good, bad, good, bad, ...
        lines += [json.dumps(GOOD).encode(), b if isinstance(b, bytes) else json.dumps(b).encode()]
    path.write_bytes(b"\n".join(lines))
    config = defaults.get_config()
    config.data.source, config.data.skip_bad_rows = str(path), True
    rows, report = data.run_rows(config)
    assert rows == [GOOD_ROW] * len(bad)
    assert report["rows"] == len(bad) and report["skipped"] == len(bad)
    assert [e.split(": ")[0] for e in report["skipped_first"]] == [f"{path} line {2 * i + 2} (row {2 * i + 1})"
                                                                   for i in range(5)]
    config.data.skip_bad_rows = False
    with pytest.raises(DataError, match=fr"row 1\): .*\({len(bad)} bad rows in all; data.skip_bad_rows=True leaves"):
        data.run_rows(config)
    path.write_bytes(b"\n".join(ln for i, ln in enumerate(lines) if i % 2))  # only the bad rows
    config.data.skip_bad_rows = True
    with pytest.raises(DataError, match=f"data.jsonl: no usable row: all {len(bad)} are bad .the first: .*line 1 "):
        data.run_rows(config)


def test_config_bounds():
    from so8t_jax.config import ConfigError
    from so8t_jax.runs import check_config

    config = defaults.get_config()
    config.data.max_row_chars = 0
    with pytest.raises(ConfigError, match="data.max_row_chars must be >= 1, got 0"):
        check_config(config)


# ------------------------------------------------------------------------------------------------ a run


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    return write_gguf(make_hf_model("llama", root / "hf", num_hidden_layers=2), root / "teacher.gguf", "F32")


def test_a_run_with_skip_bad_rows_reports_them_in_results_and_audit(tiny_teacher, tmp_path):
    rows = data.builtin_diverse(24, 1)
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": r.prompt, "completion": r.completion}) for r in rows]
    lines[3:3] = [json.dumps({"prompt": "p", "safety_label": "unsure"}), "{oops"]  # lines 4 and 5
    lines.append(json.dumps({"messages": [USER]}))  # line 27
    path.write_text("\n".join(lines) + "\n")
    config = tiny_config(tiny_teacher, tmp_path / "out", **{
        "data.source": str(path), "data.skip_bad_rows": True, "data.heldout_fraction": 0.0, "train.steps": 1,
        "train.eval_every": 0, "train.sample_every": 0, "policy.lmbda": 0.0})
    results = tr.train(config)
    want = {"rows": 24, "skipped": 3, "skipped_first": [
        f"{path} line 4 (row 3): unknown safety_label 'unsure' (allow|escalate|deny, or 0|1|2)",
        f"{path} line 5 (row 4): not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1))",
        f"{path} line 27 (row 26): 'messages' has no assistant turn"]}
    assert results["data"] == want
    run_dir = tmp_path / "out" / config.run_name
    assert json.loads((run_dir / "distillation_results.json").read_text())["data"] == want
    start = audit.show(run_dir, kind=audit.RUN_START)[0]["payload"]
    assert start["data"] == want and start["dataset_fingerprint"] == data.fingerprint(
        [Row(r.prompt, r.completion) for r in rows])
    assert audit.verify(run_dir).ok
