"""The tasks the driver contract kit (`starlette_concurrency.testing`) runs; stdlib and anyio only.

They live in the package, not in the test module, so that a worker anywhere the package is installed
imports them by reference (as it would an app's own functions), without importing pytest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio


class Abort(BaseException):
    """A custom `BaseException`: a task raising it must come back as an outcome, not unwind the server."""


def identity(value: object) -> object:
    return value


def pid() -> int:
    return os.getpid()


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def raise_(exc: BaseException) -> None:
    raise exc


async def fail_later(message: str, seconds: float) -> None:
    await anyio.sleep(seconds)
    raise LookupError(message)


def sleep_then(value: object, seconds: float) -> object:
    time.sleep(seconds)
    return value


async def async_sleep_then(value: object, seconds: float) -> object:
    await anyio.sleep(seconds)
    return value


async def sleep_then_touch(path: Path, seconds: float) -> None:
    """Cooperative (so that the `sync` driver can be cancelled too), with a side effect to look for."""
    await anyio.sleep(seconds)
    await anyio.Path(path).write_text("ran")


class Counter:
    def __init__(self, start: int) -> None:
        self.start = start

    def next(self) -> int:
        return self.start + 1
