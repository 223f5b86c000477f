"""The work every peer runs: module-level functions, so that each one can pickle them by reference."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def add(a: int, b: int) -> int:
    """A trivial task."""
    return a + b


def burn(loops: int) -> int:
    """A CPU-bound task: pure-Python arithmetic, so it holds the GIL the whole time."""
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


def probe(delay: float) -> int:
    """Hold a worker for `delay` seconds and say which one it was (start-up and RSS measurements)."""
    time.sleep(delay)
    return os.getpid()


def call(fn: Callable[[], Any]) -> Any:
    """Call a zero-argument callable (for `Executor.map`, which wants a function and arguments)."""
    return fn()


def calibrate(milliseconds: float) -> int:
    """Return the `burn()` loop count that takes about `milliseconds` on this machine, when it is not busy."""
    loops = 100_000
    while True:
        # The fastest of a few runs: a busy neighbour makes a run slower, never faster.
        elapsed = min(_timed_burn(loops) for _ in range(3))
        if elapsed > 0.02:
            return max(1, int(loops * milliseconds / 1000 / elapsed))
        loops *= 2


def _timed_burn(loops: int) -> float:
    start = time.perf_counter()
    burn(loops)
    return time.perf_counter() - start
