"""Rows, the built-in prompt generator, tokenization and bucketed batches (DESIGN.md section 6).

    rows = load_rows("data.jsonl")            # or a .json/.parquet/.csv file, a save_to_disk folder,
                                              # or "builtin:diverse:N[:seed]", "builtin:safety:N[:seed]"
    enc = encode_rows(rows, tokenizer, max_prompt_len=256, max_completion_len=128)
    batch = Batcher(enc, batch_size=8, seed=0, completion_len=128).batch(step)

Rows are checked before any tokenization: a malformed row is a DataError naming the source, the row
(0-based, as ds[i]) and the problem. Batches are a pure function of (seed, step), so a resumed run sees
exactly the data an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from so8t_jax.builtin_prompts import generate_rows
from so8t_jax.conventions import IGNORE_INDEX, SAFETY_LABELS
from so8t_jax.loading import encode_prompt
from so8t_jax.rows import DataError, Row

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of a row: completion_ids ends with eos unless truncated, and is empty without a completion."""
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    safety_label: int = -1
    answer: str | None = None


# ------------------------------------------------------------------------------------------------ loading


def load_rows(source: str, split: str = "train") -> list[Row]:
    """Rows of a local file (.jsonl .json .parquet .csv), a `save_to_disk` folder (split picks from a
    DatasetDict; a single file or Dataset is its own split), `builtin:diverse:N[:seed]` or
    `builtin:safety:N[:seed]` (only the safety-labelled requests)."""
    source = str(source)
    if source.startswith("builtin:"):
        parts = source.split(":")
        if len(parts) not in (3, 4) or parts[1] not in ("diverse", "safety") \
                or not all(p.isdigit() for p in parts[2:]):
            raise DataError(f"{source}: a built-in source is builtin:diverse:N[:seed] or builtin:safety:N[:seed]")
        seed = int(parts[3]) if len(parts) == 4 else 0
        if parts[1] == "safety":
            return generate_rows(int(parts[2]), seed, safety_only=True)
        return builtin_diverse(int(parts[2]), seed)
    path = pathlib.Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or folder")
    raws = _read(path, split)
    if not raws:
        raise DataError(f"{source}: the dataset is empty")
    return [parse_row(raw, f"{source} row {i}") for i, raw in enumerate(raws)]


def _read(path: pathlib.Path, split: str) -> list[dict]:
    import datasets

    if path.is_file() and path.stat().st_size == 0:
        return []
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r} (it has {', '.join(ds)})")
                ds = ds[split]
            return ds.to_list()
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (.jsonl .json .parquet .csv, "
                            "or a folder written by save_to_disk)")
        with tempfile.TemporaryDirectory() as cache:  # no stale or shared cache of a local file
            return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True).to_list()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read it as a dataset ({type(e).__name__}: {e})") from e


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))  # CSV blanks come back as None or NaN


def parse_row(raw: dict[str, Any], where: str = "row") -> Row:
    """Check one raw row (TRL formats: messages | prompt [+ completion] | text) and make a Row."""
    def fail(problem):
        raise DataError(f"{where}: {problem}")

    if not isinstance(raw, dict):
        fail(f"a row must be a mapping of columns, not {type(raw).__name__}")
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
                 else f"'text' must be a string, not {type(completion).__name__}")
    return Row(prompt, completion, _safety_label(raw.get("safety_label"), fail), _answer(raw.get("answer"), fail))


def _text_or_messages(value, column: str, fail):
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return _messages(value, column, fail)
    fail(f"{column!r} must be a string or a list of messages, not {type(value).__name__}")


def _messages(value, column: str, fail) -> tuple[dict[str, str], ...]:
    if not isinstance(value, (list, tuple)):
        fail(f"{column!r} must be a list of messages, not {type(value).__name__}")
    if not value:
        fail(f"{column!r} is an empty list")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            fail(f"{column!r} message {j} must be a mapping with 'role' and 'content', not {type(m).__name__}")
        for key in ("role", "content"):
            if m.get(key) is None:
                fail(f"{column!r} message {j} has no {key!r}")
            if not isinstance(m[key], str):
                fail(f"{column!r} message {j}: {key!r} must be a string, not {type(m[key]).__name__}")
        out.append({"role": m["role"], "content": m["content"]})  # extra keys (arrow adds None ones) dropped
    return tuple(out)


def _safety_label(v, fail) -> int:
    if _missing(v) or (isinstance(v, str) and not v.strip()):
        return -1
    if isinstance(v, str) and v.strip().lower() in SAFETY_LABELS:
        return SAFETY_LABELS.index(v.strip().lower())
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) in (-1.0, 0.0, 1.0, 2.0):
        return int(v)
    fail(f"unknown safety_label {v!r} (allow|escalate|deny, or 0|1|2)")


def _answer(v, fail) -> str | None:
    if _missing(v):
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):  # parquet/CSV may give numbers
        return str(int(v)) if float(v).is_integer() else str(v)
    fail(f"'answer' must be a string, not {type(v).__name__}")


def messages_for(row: Row | str | Sequence[dict] | None) -> list[dict[str, str]]:
    """Chat messages of a row's prompt (or of a prompt): a string becomes one user message."""
    prompt = row.prompt if isinstance(row, Row) else row
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def fingerprint(rows: Sequence[Row]) -> str:
    """sha256 of the rows' canonical JSON (for the audit log)."""
    blob = json.dumps([dataclasses.asdict(r) for r in rows], sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def split_heldout(rows: Sequence[Row], fraction: float, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(train, heldout), each in the original order; a fraction > 0 holds out at least one row and
    leaves at least one for training."""
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout fraction must be in [0, 1), not {fraction}")
    n = len(rows)
    k = round(n * fraction)
    if fraction > 0 and n > 1:
        k = min(max(k, 1), n - 1)
    held = set(np.random.default_rng([seed, 1]).permutation(n)[:k].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# ------------------------------------------------------------------------------------------------ tokens


def encode_rows(rows: Sequence[Row], tokenizer, max_prompt_len: int, max_completion_len: int,
                eos_id: int | None = None, chat: bool = True) -> list[Encoded]:
    """Token ids of rows. Prompts: the chat template with the generation prompt when chat and the tokenizer
    has one (message-list prompts without a template: their contents joined by blank lines), else the raw
    text with the tokenizer's special tokens; too long -> the LAST max_prompt_len tokens (the generation
    prompt survives). Completions: the text without special tokens, then eos_id (default: the tokenizer's).
    {"text"} rows: empty prompt, completion = the text with special tokens (BOS where the tokenizer adds one)."""
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; pass eos_id")
    if max_prompt_len < 1 or max_completion_len < 1:
        raise ValueError("max_prompt_len and max_completion_len must be >= 1")
    templated = chat and bool(getattr(tokenizer, "chat_template", None))
    out = []
    for row in rows:
        if row.prompt is None:
            prompt = []
            completion = list(tokenizer(row.completion, add_special_tokens=True)["input_ids"])
            if not completion or completion[-1] != eos:
                completion.append(eos)
        else:
            p = row.prompt
            if not isinstance(p, str):
                p = list(p) if templated else "\n\n".join(m["content"] for m in p)
            prompt = encode_prompt(tokenizer, p, chat)[-max_prompt_len:]
            completion = [] if row.completion is None else (
                list(tokenizer(row.completion, add_special_tokens=False)["input_ids"]) + [eos])
        out.append(Encoded(tuple(int(t) for t in prompt), tuple(int(t) for t in completion[:max_completion_len]),
                           row.safety_label, row.answer))
    return out


def prepare(config, rows: Sequence[Row], tokenizer, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int):
    """(training batcher, held-out rows, their encodings): a run's rows split, tokenized and bucketed."""
    train_rows, heldout_rows = split_heldout(rows, config.data.heldout_fraction, config.seed)
    encode = dict(tokenizer=tokenizer, max_prompt_len=config.data.max_prompt_len,
                  max_completion_len=max_new_tokens, eos_id=eos_ids[0] if eos_ids else None, chat=config.data.chat)
    train_enc = encode_rows(train_rows, **encode)
    heldout_enc = encode_rows(heldout_rows, **encode) if heldout_rows else []
    batcher = Batcher(train_enc, config.train.batch_size * config.optim.grad_accum_steps, config.seed,
                      tuple(config.data.prompt_buckets), max_new_tokens, pad_id)
    return batcher, heldout_rows, heldout_enc


class Batcher:
    """Bucketed batches as a pure function of (seed, step), for exact resume.

    Rows are read in the order of np.random.default_rng([seed, epoch]).permutation(len), consecutively across
    epoch boundaries (a batch may hold the end of one epoch and the start of the next); with drop_remainder
    each epoch gives len // batch_size whole batches and its last rows are skipped.

    batch(step) -> numpy int32 arrays:
      prompt_ids, prompt_mask          [B, P]   LEFT-padded; P = smallest bucket >= the longest prompt
      completion_ids, completion_mask  [B, N]   RIGHT-padded; N = completion_len (= max_new_tokens)
      input_ids, attention_mask        [B, P+N] prompt then completion (the offline training view)
      labels                           [B, P+N] completion tokens, else -100 (also a first token that follows
                                                only padding, i.e. of an empty prompt: nothing predicts it)
      safety_label                     [B]      -1 unlabelled
    """

    def __init__(self, encoded: Sequence[Encoded], batch_size: int, seed: int = 0,
                 prompt_buckets: Sequence[int] = (32, 64, 128, 256), completion_len: int = 128, pad_id: int = 0,
                 drop_remainder: bool = False):
        self.data = list(encoded)
        if not self.data:
            raise DataError("no rows to batch")
        if batch_size < 1 or completion_len < 1 or not prompt_buckets:
            raise ValueError("batch_size and completion_len must be >= 1 and prompt_buckets non-empty")
        self.batch_size, self.seed, self.pad_id, self.drop_remainder = batch_size, seed, pad_id, drop_remainder
        self.buckets, self.completion_len = tuple(sorted(prompt_buckets)), completion_len
        lens = [len(e.prompt_ids) for e in self.data]
        i = int(np.argmax(lens))
        if lens[i] > self.buckets[-1]:
            raise DataError(f"row {i}: prompt of {lens[i]} tokens is longer than the largest bucket "
                            f"{self.buckets[-1]}; encode with max_prompt_len <= {self.buckets[-1]}")
        if drop_remainder and len(self.data) < batch_size:
            raise DataError(f"{len(self.data)} rows make no whole batch of {batch_size} (drop_remainder)")
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.data)

    def epoch_of(self, step: int) -> int:
        """The epoch of the batch's first row."""
        n, b = len(self.data), self.batch_size
        return step // (n // b) if self.drop_remainder else step * b // n

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Row indices (into `encoded`) of batch `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, not {step}")
        n, b = len(self.data), self.batch_size
        if self.drop_remainder:
            start = (step % (n // b)) * b
            return self._perm(self.epoch_of(step))[start:start + b].copy()
        pos = step * b + np.arange(b)
        return np.array([self._perm(int(p) // n)[int(p) % n] for p in pos])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = [self.data[i] for i in self.indices(step)]
        longest = max(len(r.prompt_ids) for r in rows)
        P = next(b for b in self.buckets if b >= longest)
        N, B = self.completion_len, len(rows)
        prompt = np.full((B, P), self.pad_id, np.int32)
        completion = np.full((B, N), self.pad_id, np.int32)
        prompt_mask, completion_mask = np.zeros((B, P), np.int32), np.zeros((B, N), np.int32)
        for b, r in enumerate(rows):
            p, c = r.prompt_ids, r.completion_ids[:N]
            if p:
                prompt[b, P - len(p):], prompt_mask[b, P - len(p):] = p, 1
            completion[b, :len(c)], completion_mask[b, :len(c)] = c, 1
        input_ids = np.concatenate([prompt, completion], axis=1)
        attention_mask = np.concatenate([prompt_mask, completion_mask], axis=1)
        follows_token = np.pad(attention_mask[:, :-1], ((0, 0), (1, 0))) == 1
        is_target = np.pad(completion_mask, ((0, 0), (P, 0))) == 1
        labels = np.where(is_target & follows_token, input_ids, IGNORE_INDEX).astype(np.int32)
        return {"prompt_ids": prompt, "prompt_mask": prompt_mask, "completion_ids": completion,
                "completion_mask": completion_mask, "input_ids": input_ids, "attention_mask": attention_mask,
                "labels": labels, "safety_label": np.array([r.safety_label for r in rows], np.int32)}


def builtin_diverse(n: int, seed: int = 0) -> list[Row]:
    """n seeded, varied prompts (math, code, summaries, reasoning, knowledge, safety-labelled requests;
    English and Japanese): see so8t_jax/builtin_prompts.py."""
    return generate_rows(n, seed)
