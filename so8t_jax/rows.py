"""A dataset row, the error a bad one raises, and reading raw rows from a file one at a time with their numbers.

    for where, raw in records(path, "train", max_row_chars):   # raw: a dict, or the DataError of a bad row
        row = parse_row(raw, where)                             # where: "data.jsonl line 5 (row 3)"

JSON lines and CSV are parsed here line by line rather than by `datasets` / pyarrow, which read a file
whole: one bad row there fails the file without its row number, and a column's type is inferred across
rows. A bad row (invalid JSON or UTF-8, a wrong field count, too long) comes back as a DataError so that a
caller can skip it; a damaged file (a truncated .json list, a CSV without a usable header) raises at once.
Parquet files and save_to_disk folders are typed already: `datasets` reads them, and parse_row checks each.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import re
import tempfile
from collections.abc import Iterator
from typing import Any

from so8t_jax.conventions import SAFETY_LABELS

ROLES = ("system", "developer", "user", "assistant", "tool")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_WS = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by errors="surrogateescape"


class DataError(ValueError):
    """A data source or row that cannot be used; the message names the source, the row and the problem."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One example. prompt: a string, a tuple of {"role", "content"} messages, or None ({"text"} rows);
    completion: None when the student or teacher generates it; safety_label: 0/1/2 or -1."""
    prompt: str | tuple[dict[str, str], ...] | None
    completion: str | None
    safety_label: int = -1
    answer: str | None = None


# ------------------------------------------------------------------------------------------------ files


def records(path: pathlib.Path, split: str, max_row_chars: int) -> Iterator[tuple[str, dict | DataError]]:
    """(where, raw row or the DataError of a bad one) for each row of a file or save_to_disk folder."""
    if path.is_file() and path.stat().st_size == 0:
        return iter(())
    suffix = path.suffix.lower()
    if path.is_file() and suffix not in _FORMATS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (.jsonl .json .parquet .csv, "
                        "or a folder written by save_to_disk)")
    if path.is_file() and suffix == ".jsonl":
        return _jsonl(path, max_row_chars)
    if path.is_file() and suffix == ".json":
        return _json(path, max_row_chars)
    if path.is_file() and suffix == ".csv":
        return _csv(path, max_row_chars)
    return _typed(path, split, max_row_chars)


def _too_long(where: str, size, max_row_chars: int) -> DataError:
    size = f"{size:,} characters" if isinstance(size, int) else size
    return DataError(f"{where}: the row is longer than data.max_row_chars = {max_row_chars:,} ({size})")


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")  # json accepts NaN / Infinity; JSON (and pyarrow) do not


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _jsonl(path: pathlib.Path, max_row_chars: int) -> Iterator[tuple[str, dict | DataError]]:
    limit = 4 * max_row_chars + 2  # bytes: a longer line is too long whatever its characters; never read whole
    with open(path, "rb") as f:
        line_no, n = 0, 0
        while raw := f.readline(limit):
            line_no += 1
            too_long = len(raw) == limit and not raw.endswith(b"\n")
            while too_long and (rest := f.readline(limit)) and not rest.endswith(b"\n"):
                pass
            if not too_long and not raw.strip():
                continue  # blank lines are not rows
            where = f"{path} line {line_no} (row {n})"
            n += 1
            if too_long:
                yield where, _too_long(where, f"more than {limit:,} bytes", max_row_chars)
                continue
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                       "of the line)")
                continue
            if len(text.rstrip("\r\n")) > max_row_chars:
                yield where, _too_long(where, len(text.rstrip("\r\n")), max_row_chars)
                continue
            try:
                yield where, _DECODER.decode(text.strip())
            except ValueError as e:
                yield where, DataError(f"{where}: not valid JSON ({e})")


def _json(path: pathlib.Path, max_row_chars: int) -> Iterator[tuple[str, dict | DataError]]:
    """A .json file: a list of rows, or one row per line (as `datasets` reads it)."""
    blob = path.read_bytes()
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = blob.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{blob[e.start]:02x})") from e
    start = _WS.match(text).end()
    if not text.startswith("[", start):
        return _jsonl(path, max_row_chars)
    return _json_list(path, text, start + 1, max_row_chars)


def _json_list(path, text: str, i: int, max_row_chars: int) -> Iterator[tuple[str, dict | DataError]]:
    # Element by element (raw_decode), so an error names the row it is in and the rows before it are kept.
    def broken(what: str, pos: int, problem: str) -> DataError:
        line, col = text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
        ends = pos >= len(text.rstrip()) or problem.startswith("Unterminated string")
        return DataError(f"{path}{what}: not valid JSON ({problem}: line {line} column {col} (char {pos}))"
                         + ("; the file ends there (truncated?)" if ends else ""))

    i, n = _WS.match(text, i).end(), 0
    while n or not text.startswith("]", i):  # an empty list is no row
        try:
            raw, end = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise broken(f" row {n}", e.pos, e.msg) from e
        except ValueError as e:  # NaN / Infinity
            raise broken(f" row {n}", i, str(e)) from e
        where = f"{path} row {n}"
        yield where, raw if end - i <= max_row_chars else _too_long(where, end - i, max_row_chars)
        n, i = n + 1, _WS.match(text, end).end()
        if text.startswith("]", i):
            break
        if not text.startswith(",", i):
            raise broken(f" after row {n - 1}", i, "expected ',' or ']'")
        i = _WS.match(text, i + 1).end()
    if text[i + 1:].strip():
        raise broken(f" after row {n - 1}" if n else "", _WS.match(text, i + 1).end(), "extra data after the list")


def _csv(path: pathlib.Path, max_row_chars: int) -> Iterator[tuple[str, dict | DataError]]:
    """A CSV file with a header line; a blank cell is a missing value (as pandas reads it)."""
    old_limit = csv.field_size_limit(max_row_chars)  # a longer field is a csv.Error: too long, not a memory blow-up
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.reader(f, strict=True)
            try:
                header = next(reader)
            except csv.Error as e:
                raise DataError(f"{path} line 1: the header line is not valid CSV ({e})") from e
            if (bad := [h for h in header if not h.strip() or _SURROGATE.search(h)]) or len(set(header)) < len(header):
                problem = f"a column name {bad[0]!r} that is empty or not UTF-8" if bad else "a repeated column name"
                raise DataError(f"{path} line 1: the header has {problem} ({', '.join(map(repr, header))})")
            n = 0
            while True:
                where = f"{path} line {reader.line_num + 1} (row {n})"
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    fields = e
                if fields == []:
                    continue  # a blank line is no row
                n += 1
                yield where, _csv_row(where, header, fields, max_row_chars)
    finally:
        csv.field_size_limit(old_limit)


def _csv_row(where: str, header: list[str], fields, max_row_chars: int) -> dict | DataError:
    if isinstance(fields, csv.Error):
        if "field larger than field limit" in str(fields):
            return _too_long(where, f"a field of more than {max_row_chars:,} characters", max_row_chars)
        return DataError(f"{where}: not valid CSV ({fields})")
    if len(fields) != len(header):
        return DataError(f"{where}: {len(fields)} fields, but the header has {len(header)} columns")
    for name, value in zip(header, fields):
        if _SURROGATE.search(value):
            return DataError(f"{where}: column {name!r} is not valid UTF-8")
    if (size := sum(map(len, fields))) > max_row_chars:
        return _too_long(where, size, max_row_chars)
    return {k: v if v != "" else None for k, v in zip(header, fields)}


def _typed(path: pathlib.Path, split: str, max_row_chars: int) -> Iterator[tuple[str, dict | DataError]]:
    """Parquet files and save_to_disk folders, read by `datasets` (their columns are typed already)."""
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r} (it has {', '.join(ds)})")
                ds = ds[split]
        else:
            with tempfile.TemporaryDirectory() as cache:  # no stale or shared cache of a local file
                ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=cache,
                                           keep_in_memory=True)
        raws = ds.to_list()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read it as a dataset ({type(e).__name__}: {e})") from e
    for i, raw in enumerate(raws):
        where = f"{path} row {i}"
        size = len(json.dumps(raw, ensure_ascii=False, default=str))
        yield where, raw if size <= max_row_chars else _too_long(where, size, max_row_chars)


# ------------------------------------------------------------------------------------------------ rows


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))  # parquet may hold NaN for a missing number


def parse_row(raw: dict[str, Any], where: str = "row") -> Row:
    """Check one raw row (TRL formats: messages | prompt [+ completion] | text) and make a Row."""
    def fail(problem):
        raise DataError(f"{where}: {problem}")

    if not isinstance(raw, dict):
        fail(f"a row must be a mapping of columns (a JSON object), not {_type(raw)}")
    kinds = [k for k in ("messages", "prompt", "text") if not _missing(raw.get(k))]
    if not kinds:
        fail("'completion' without a 'prompt'" if not _missing(raw.get("completion"))
             else "no prompt, completion, messages or text column")
    if len(kinds) > 1 or (kinds[0] != "prompt" and not _missing(raw.get("completion"))):
        both = kinds if len(kinds) > 1 else [kinds[0], "completion"]
        fail(f"both {both[0]!r} and {both[1]!r}; a row has messages, prompt (+ completion) or text")
    kind = kinds[0]
    if kind == "messages":
        msgs = _messages(raw["messages"], "messages", fail)
        if not any(m["role"] == "assistant" for m in msgs):
            fail("'messages' has no assistant turn")
        if msgs[-1]["role"] != "assistant":
            fail(f"'messages' ends with a {msgs[-1]['role']!r} turn after the last assistant turn")
        if len(msgs) == 1:
            fail("'messages' has nothing before its assistant turn (a plain text row is {\"text\": ...})")
        prompt, completion = msgs[:-1], msgs[-1]["content"]
    elif kind == "prompt":
        prompt = _text_or_messages(raw["prompt"], "prompt", fail)
        if isinstance(prompt, str) and not prompt.strip():
            fail("'prompt' is empty")
        completion = raw.get("completion")
        completion = None if _missing(completion) else _text_or_messages(completion, "completion", fail)
        if isinstance(completion, tuple):
            if len(completion) != 1 or completion[0]["role"] != "assistant":
                fail("'completion' as messages must be exactly one assistant message")
            completion = completion[0]["content"]
    else:
        prompt, completion = None, raw["text"]
        if not isinstance(completion, str) or not completion.strip():
            fail("'text' must be a non-empty string" if isinstance(completion, str)
                 else f"'text' must be a string, not {_type(completion)}")
    if completion is not None and not completion.strip():
        fail("the completion is empty (leave it out, or null, for one to be generated)")
    return Row(prompt, completion, _safety_label(raw.get("safety_label"), fail), _answer(raw.get("answer"), fail))


def _type(v) -> str:
    return "null" if v is None else type(v).__name__


def _text_or_messages(value, column: str, fail):
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return _messages(value, column, fail)
    fail(f"{column!r} must be a string or a list of messages, not {_type(value)}")


def _messages(value, column: str, fail) -> tuple[dict[str, str], ...]:
    if not isinstance(value, (list, tuple)):
        fail(f"{column!r} must be a list of messages, not {_type(value)}")
    if not value:
        fail(f"{column!r} is an empty list")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            fail(f"{column!r} message {j} must be a mapping with 'role' and 'content', not {_type(m)}")
        for key in ("role", "content"):
            if m.get(key) is None:
                fail(f"{column!r} message {j} has no {key!r}")
            if not isinstance(m[key], str):
                fail(f"{column!r} message {j}: {key!r} must be a string, not {_type(m[key])}")
        if m["role"] not in ROLES:
            fail(f"{column!r} message {j}: unknown role {m['role']!r} ({', '.join(ROLES)})")
        out.append({"role": m["role"], "content": m["content"]})  # extra keys (arrow adds None ones) dropped
    return tuple(out)


def _safety_label(v, fail) -> int:
    if _missing(v) or (isinstance(v, str) and not v.strip()):
        return -1
    if isinstance(v, str) and v.strip().lower() in SAFETY_LABELS:
        return SAFETY_LABELS.index(v.strip().lower())
    number = float(v) if isinstance(v, str) and re.fullmatch(r"-?[0-9]+(\.0*)?", v.strip()) else v  # CSV: "2.0"
    if isinstance(number, (int, float)) and not isinstance(number, bool) and float(number) in (-1.0, 0.0, 1.0, 2.0):
        return int(number)
    fail(f"unknown safety_label {v!r} (allow|escalate|deny, or 0|1|2)")


def _answer(v, fail) -> str | None:
    if _missing(v):
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):  # parquet/JSON may give numbers
        return str(int(v)) if float(v).is_integer() else str(v)
    fail(f"'answer' must be a string, not {_type(v)}")
