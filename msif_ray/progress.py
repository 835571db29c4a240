"""Progress lines with throughput and ETA for the long passes."""

from __future__ import annotations

import time
from typing import Callable


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Counts finished shards (and their tokens) of one pass; prints at most every ``every`` seconds.

    The ETA assumes the remaining shards run at the average rate so far.
    """

    def __init__(self, name: str, total: int, log: Callable[[str], None] = print, every: float = 5.0):
        self.name, self.total, self.log, self.every = name, total, log, every
        self.done = self.tokens = self.documents = 0
        self.start = self._last = time.monotonic()

    def update(self, tokens: int = 0, documents: int = 0) -> None:
        self.done += 1
        self.tokens += tokens
        self.documents += documents
        now = time.monotonic()
        if now - self._last >= self.every or self.done == self.total:
            self._last = now
            self.log(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        remaining = (self.total - self.done) * elapsed / max(self.done, 1)
        return (
            f"[{self.name}] shards {self.done}/{self.total}  docs {self.documents}  "
            f"{self.tokens / elapsed:,.0f} tok/s  elapsed {format_duration(elapsed)}  ETA {format_duration(remaining)}"
        )

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start
