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


def flaky(path: str, tag: str, fails: int) -> None:
    """Append ``<tag> <attempt> <server pid> <key> <entry id>`` (`current_deferral`); fail attempts up to `fails`."""
    from starlette_concurrency import current_deferral

    deferral = current_deferral()
    assert deferral is not None, "a deferred task always has its deferral"
    with open(path, "a") as file:
        file.write(f"{tag} {deferral.attempt} {os.getppid()} {deferral.key} {deferral.entry_id}\n")
    if deferral.attempt <= fails:
        raise RuntimeError(f"attempt {deferral.attempt} fails on purpose")


def deferral() -> object:
    """What `current_deferral()` says here (None in a `run()` task)."""
    from starlette_concurrency import current_deferral

    return current_deferral()
