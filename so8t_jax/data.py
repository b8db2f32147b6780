"""Rows, the built-in prompt generator, tokenization and bucketed batches (DESIGN.md section 6).

    rows = load_rows("data.jsonl")            # or a .json/.parquet/.csv file, a save_to_disk folder,
                                              # or "builtin:diverse:N[:seed]", "builtin:safety:N[:seed]"
    enc = encode_rows(rows, tokenizer, max_prompt_len=256, max_completion_len=128)
    batch = Batcher(enc, batch_size=8, seed=0, completion_len=128).batch(step)

Rows are checked before any tokenization (and before a run loads its teacher): a malformed row is a DataError
naming the source, the row and the problem (rows.py reads and checks them), or, with skip_bad_rows, left out
and counted. Batches are a pure function of (seed, step), so a resumed run sees exactly the data an
uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Sequence

import numpy as np

from so8t_jax import defaults, teacher_prompts
from so8t_jax.builtin_prompts import generate_rows
from so8t_jax.completions import PolicyConfig
from so8t_jax.conventions import IGNORE_INDEX
from so8t_jax.loading import encode_prompt
from so8t_jax.rows import DataError, Row, parse_row, records

KEEP_ERRORS = 5  # the errors of skipped rows listed in a run's results and audit log


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of a row: completion_ids ends with eos unless truncated, and is empty without a completion."""
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    safety_label: int = -1
    answer: str | None = None


# ------------------------------------------------------------------------------------------------ loading


def load_rows(source: str, split: str = "train", skip_bad_rows: bool = False,
              max_row_chars: int | None = None) -> list[Row]:
    """Rows of a local file (.jsonl .json .parquet .csv), a `save_to_disk` folder (split picks from a
    DatasetDict; a single file or Dataset is its own split), `builtin:diverse:N[:seed]` or
    `builtin:safety:N[:seed]` (only the safety-labelled requests). See read_rows."""
    return read_rows(source, split, skip_bad_rows, max_row_chars)[0]


def read_rows(source: str, split: str = "train", skip_bad_rows: bool = False,
              max_row_chars: int | None = None) -> tuple[list[Row], dict]:
    """(rows, {"rows": kept, "skipped": bad rows left out, "skipped_first": the first KEEP_ERRORS errors}).

    A bad row is a DataError naming the file, the row (JSONL / CSV: "line 5 (row 3)", the 1-based line and the
    0-based row; JSON / parquet / folders: "row 3") and the problem; with skip_bad_rows it is left out and
    counted instead. A damaged file (a truncated JSON list, an unreadable parquet file), an empty one, or one
    with no good row is a DataError either way. max_row_chars (default: defaults.py's data.max_row_chars):
    a longer row is a bad row."""
    source = str(source)
    if source.startswith("builtin:"):
        parts = source.split(":")
        if len(parts) not in (3, 4) or parts[1] not in ("diverse", "safety") \
                or not all(p.isdigit() for p in parts[2:]):
            raise DataError(f"{source}: a built-in source is builtin:diverse:N[:seed] or builtin:safety:N[:seed]")
        seed = int(parts[3]) if len(parts) == 4 else 0
        rows = generate_rows(int(parts[2]), seed, safety_only=True) if parts[1] == "safety" \
            else builtin_diverse(int(parts[2]), seed)
        return rows, {"rows": len(rows), "skipped": 0, "skipped_first": []}
    path = pathlib.Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or folder")
    max_row_chars = defaults.DEFAULTS.data.max_row_chars if max_row_chars is None else max_row_chars
    rows, n_bad, first = [], 0, []
    for where, raw in records(path, split, max_row_chars):
        try:
            if isinstance(raw, DataError):
                raise raw
            rows.append(parse_row(raw, where))
        except DataError as e:
            n_bad += 1
            first += [str(e)][:KEEP_ERRORS - len(first)]
    if n_bad and not skip_bad_rows:
        more = f"{n_bad} bad rows in all; " if n_bad > 1 else ""
        raise DataError(f"{first[0]} ({more}data.skip_bad_rows=True leaves bad rows out)")
    if not rows:
        raise DataError(f"{source}: the dataset is empty" if not n_bad else
                        f"{source}: no usable row: all {n_bad} are bad (the first: {first[0]})")
    return rows, {"rows": len(rows), "skipped": n_bad, "skipped_first": first}


def run_rows(config, teacher=None) -> tuple[list[Row], dict]:
    """A run's rows and read_rows' report (config.data: source, skip_bad_rows, max_row_chars), for the results
    and the audit log. A teacher:N[:seed] source (teacher_prompts.py) needs the loaded teacher."""
    d = config.data  # .get: the config of a run from before these keys existed
    if teacher_prompts.is_source(d.source):
        if teacher is None:
            raise ValueError(f"{d.source}: the teacher writes these rows: pass the loaded teacher")
        rows, report = teacher_prompts.run_rows(config, teacher)
    else:
        rows, report = read_rows(d.source, skip_bad_rows=d.get("skip_bad_rows", False),
                                 max_row_chars=d.get("max_row_chars"))
    if config.policy.lmbda > 0 or config.policy.seq_kd:
        bare = sum(r.prompt is None for r in rows)
        if bare:  # a completion generated from nothing: no prompt to condition on, no turn to end
            raise DataError(f"{d.source}: {bare} of {len(rows)} rows are {{\"text\"}} rows without a prompt, but "
                            f"policy.lmbda = {config.policy.lmbda} / policy.seq_kd = {config.policy.seq_kd} generate "
                            "completions from prompts: use prompt (+ completion) or messages rows, or set "
                            "policy.lmbda=0 and policy.seq_kd=False")
    p = PolicyConfig(**config.policy.to_dict())
    bare = sum(r.prompt is not None and r.completion is None for r in rows)
    if bare == len(rows) and p.offline_steps and not p.seq_kd:  # every offline step would train on nothing
        raise DataError(f"{d.source}: all {bare} rows have a prompt but no completion, and the offline "
                        f"steps (policy.lmbda = {p.lmbda}, lmbda_start = {p.lmbda_start}, schedule "
                        f"{p.lmbda_schedule!r}) train on the dataset's completions: set "
                        f"policy.seq_kd=True (the teacher completes them once, cached) or policy.lmbda=1 with a "
                        f"constant schedule (every step on-policy)")
    return rows, report


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
    prompt survives). Completions: the text without special tokens, then eos_id (default: the tokenizer's; runs
    pass sampling.eos_ids_of(...)[0], the chat template's turn end). {"text"} rows: empty prompt, completion =
    the text with special tokens (BOS where the tokenizer adds one), then the tokenizer's EOS."""
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
            text_eos = eos if tokenizer.eos_token_id is None else tokenizer.eos_token_id  # a document, not a turn
            if not completion or completion[-1] != text_eos:
                completion.append(text_eos)
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


def prepare(config, rows: Sequence[Row], tokenizer, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
            relabel=None):
    """(training batcher, held-out rows, their encodings): a run's rows split, tokenized and bucketed.
    relabel: encoded rows -> the rows to train on (seq_kd: the teacher's completions, seqkd.py), applied to the
    training and the held-out rows."""
    train_rows, heldout_rows = split_heldout(rows, config.data.heldout_fraction, config.seed)
    encode = dict(tokenizer=tokenizer, max_prompt_len=config.data.max_prompt_len,
                  max_completion_len=max_new_tokens, eos_id=eos_ids[0] if eos_ids else None, chat=config.data.chat)
    train_enc = encode_rows(train_rows, **encode)
    heldout_enc = encode_rows(heldout_rows, **encode) if heldout_rows else []
    if relabel is not None:  # held-out rows too (one call, one cache): the held-out loss measures what is trained on
        both = relabel(train_enc + heldout_enc)
        train_enc, heldout_enc = both[:len(train_enc)], both[len(train_enc):]
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

    def batch(self, step: int, part: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Batch `step`, or only its rows at the positions `part` (one process's share of the batch, with
        several hosts): padded to the whole batch's prompt bucket, so the shares make up the same batch."""
        rows = [self.data[i] for i in self.indices(step)]
        longest = max(len(r.prompt_ids) for r in rows)
        P = next(b for b in self.buckets if b >= longest)
        rows = rows if part is None else [rows[i] for i in part]
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
