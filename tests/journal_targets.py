"""Deferred tasks for the journal's tests: module functions, so that a replaying process loads them by name."""

from __future__ import annotations

import os
import time


def record(path: str, tag: str, number: int) -> None:
    """Append ``<tag> <number> <server pid>`` to `path` (the worker's parent is the server)."""
    with open(path, "a") as file:
        file.write(f"{tag} {number} {os.getppid()}\n")


def slow(path: str, number: int) -> None:
    """Record a start, wait while ``<path>.hold`` exists, record the end."""
    record(path, "start", number)
    while os.path.exists(path + ".hold"):
        time.sleep(0.05)
    record(path, "end", number)


def crash() -> None:
    """Kill the worker that runs it."""
    os._exit(3)
