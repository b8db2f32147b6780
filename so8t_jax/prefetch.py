"""Batches prepared on a background thread: while the device runs step N, the host builds the numpy batch of the
next data position (tokens padded into buckets, the accumulation axis), so no step waits on the host."""
from __future__ import annotations

import concurrent.futures
from collections.abc import Callable


class Prefetcher:
    """get(pos) -> make(pos), computed ahead: after each get, the batch of next_position(pos) starts on a worker
    thread. A rollback that changes the next position only costs that one batch being built again."""

    def __init__(self, make: Callable[[int], dict], next_position: Callable[[int], int]):
        self._make, self._next = make, next_position
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="so8t-prefetch")
        self._ahead: tuple[int, concurrent.futures.Future] | None = None

    def get(self, pos: int) -> dict:
        if self._ahead is not None and self._ahead[0] == pos:
            batch = self._ahead[1].result()
        else:
            if self._ahead is not None:
                self._ahead[1].cancel()
            batch = self._make(pos)
        nxt = self._next(pos)
        self._ahead = (nxt, self._pool.submit(self._make, nxt))
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
