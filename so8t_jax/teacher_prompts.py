"""data.source = "teacher:N[:seed]": training prompts written by the teacher itself (Magpie, Xu et al. 2024).

An instruction-tuned teacher given only its chat template's opening of a user turn (everything before the user's
text: the default system turn, then "<|im_start|>user\\n" in ChatML) writes a plausible user request, drawn from
the requests it was tuned on. Sampled at temperature 1 and kept only when the teacher closes the turn itself
(its turn-end token; a request cut at MAX_NEW_TOKENS is dropped), duplicates and near-empty ones dropped, N of
them cover far more ground than any template set and need no dataset (docs/RESULTS.md measures what they do for
prompts from another source). The rows are prompt-only: policy.seq_kd (the teacher's completions, cached) or
on-policy steps give them their completions.

They are made once and cached like seq-KD's completions: `<output_dir>/.teacher_prompts/<key>.jsonl`, the key a
sha256 of the teacher's weights (tree digest), the opening's token ids, N, the seed and the sampling settings. A
changed teacher or setting writes afresh; a rerun, a resumed run or the evaluation of the run reads the file.
"""
from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np

from so8t_jax import audit, runs, sampling
from so8t_jax.rows import DataError, Row

PREFIX = "teacher:"
MAX_NEW_TOKENS = 64   # a request longer than this is dropped (not cut: a cut request is not a whole turn)
TEMPERATURE = 1.0     # Magpie's setting: the teacher's own distribution of requests, untempered
BATCH = 32
MIN_CHARS = 8         # shorter requests ("Hi", "?") teach nothing
MAX_DRAWS = 8         # draws per wanted prompt before giving up with an error
_SENTINEL = "\u2063so8t-user-text\u2063"


def is_source(source: str) -> bool:
    return str(source).startswith(PREFIX)


def parse(source: str) -> tuple[int, int]:
    """(N, seed) of "teacher:N[:seed]"; DataError otherwise."""
    parts = str(source).split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]) or int(parts[1]) < 1:
        raise DataError(f"{source}: a teacher-written source is teacher:N[:seed] with N >= 1 (e.g. teacher:1024)")
    return int(parts[1]), int(parts[2]) if len(parts) == 3 else 0


def opening_ids(tokenizer, source: str = PREFIX) -> tuple[int, ...]:
    """Token ids of the chat template's text before a user message's content (with its default system turn)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: the teacher's tokenizer has no chat template, so it cannot be asked to write a "
                        f"user's request; use a dataset file or builtin:diverse:N")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    if _SENTINEL not in text:
        raise DataError(f"{source}: the teacher's chat template does not write the user's text as given")
    return tuple(tokenizer(text[:text.index(_SENTINEL)], add_special_tokens=False)["input_ids"])


def cache_key(teacher_digest: str, opening, n: int, seed: int) -> str:
    settings = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE, "min_chars": MIN_CHARS,
                "batch": BATCH, "n": n, "seed": seed, "opening": list(opening)}
    blob = json.dumps({"teacher": teacher_digest, "settings": settings}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def keep(tokens_BxN, lengths_B, end_id: int, tokenizer, seen: set) -> list[str]:
    """The requests of one sampled batch worth training on: closed by end_id, at least MIN_CHARS long once
    decoded and stripped, not seen before (`seen` is updated)."""
    out = []
    for row, n in zip(np.asarray(tokens_BxN), np.asarray(lengths_B)):
        ids = [int(t) for t in row[:n]]
        if not ids or ids[-1] != end_id:
            continue
        text = tokenizer.decode(ids[:-1], skip_special_tokens=True).strip()
        if len(text) >= MIN_CHARS and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def write_prompts(params, cfg, tokenizer, n: int, seed: int, source: str = PREFIX) -> tuple[list[str], int]:
    """(n requests the teacher wrote, draws it took): batches of BATCH samples after the opening, a pure function
    of (params, tokenizer, n, seed). DataError when MAX_DRAWS * n draws give fewer than n."""
    end_id = sampling.turn_end_id(tokenizer)
    if end_id is None:
        raise DataError(f"{source}: the teacher's chat template closes no turn with a special token")
    opening = opening_ids(tokenizer, source)
    fn = sampling.make_sample_fn(cfg, MAX_NEW_TOKENS, sampling.Sampler(TEMPERATURE, 0, 1.0), (end_id,), 0)
    tokens = np.asarray([opening] * BATCH, np.int32)
    key, prompts, seen, draws = jax.random.key(seed), [], set(), 0
    while len(prompts) < n and draws < MAX_DRAWS * n:
        res = fn(params, tokens, np.ones_like(tokens), jax.random.fold_in(key, draws // BATCH))
        prompts += keep(res.tokens_BxN, res.lengths_B, end_id, tokenizer, seen)
        draws += BATCH
    if len(prompts) < n:
        raise DataError(f"{source}: the teacher wrote only {len(prompts)} usable requests (closed by its turn end, "
                        f">= {MIN_CHARS} characters, distinct) in {draws} draws of {MAX_NEW_TOKENS} tokens; ask "
                        f"for fewer, or use a dataset file (is the teacher an instruction-tuned chat model?)")
    return prompts[:n], draws


def run_rows(config, teacher) -> tuple[list[Row], dict]:
    """data.run_rows for a teacher:N[:seed] source: the rows (prompt-only) and a report with the cache's key,
    path and whether it hit; read from the cache when its key matches, else written and saved."""
    source = config.data.source
    n, seed = parse(source)
    opening = opening_ids(teacher.tokenizer, source)
    key = cache_key(audit.tree_digest(teacher.params), opening, n, seed)
    path = pathlib.Path(config.output_dir) / ".teacher_prompts" / f"{key}.jsonl"
    try:  # written atomically; a file edited by hand to another count or shape is written again
        prompts = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines()]
        hit = len(prompts) == n and all(isinstance(p, str) and p for p in prompts)
    except (OSError, ValueError, KeyError, TypeError):
        hit = False
    if not hit:
        prompts, _ = write_prompts(teacher.params, teacher.config, teacher.tokenizer, n, seed, source)
        runs.write_text(path, "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts))
    report = {"rows": n, "skipped": 0, "skipped_first": [],
              "teacher_prompts": {"key": key, "path": str(path), "hit": hit}}
    return [Row(prompt=p, completion=None) for p in prompts], report
