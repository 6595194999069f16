"""Long jobs of the daemon's trio thread, cut into slices (`cowfs.control` runs them).

A job is a generator that yields after each slice of about `SLICE_SECONDS`, leaving what it
changes consistent at every yield; the caller lets FUSE requests run in between, so no control
operation holds the FUSE loop for long, however many names it touches."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import TypeVar

SLICE_SECONDS = 0.02
T = TypeVar("T")


class Slices:
    """Tells a job when its slice is used up (it reads the clock every few steps only)."""

    def __init__(self, seconds: float = SLICE_SECONDS) -> None:
        self.seconds = seconds
        self._steps = 0
        self._ends = time.monotonic() + seconds

    def used_up(self) -> bool:
        self._steps += 1
        if self._steps % 32 or time.monotonic() < self._ends:
            return False
        self._ends = time.monotonic() + self.seconds
        return True


def run_whole(job: Generator[None, None, T]) -> T:
    """Run a sliced job to its end at once (tests, and callers with nothing to let in)."""
    while True:
        try:
            next(job)
        except StopIteration as done:
            value: T = done.value
            return value
