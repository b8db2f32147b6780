"""A dataset row and the error a bad one raises: what data.py parses into and builtin_prompts.py generates."""
from __future__ import annotations

import dataclasses


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
