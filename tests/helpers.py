"""Module-level task functions: workers import them by reference, as they would an app's own module."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import anyio


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `predicate()` holds (polling: files and processes have no event to wait on)."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)


def identity(value: object) -> object:
    return value


def pid() -> int:
    return os.getpid()


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


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


def crash(code: int) -> None:
    os._exit(code)


def burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


class Counter:
    def __init__(self, start: int) -> None:
        self.start = start

    def next(self) -> int:
        return self.start + 1


class TwoArgumentError(Exception):
    """An exception whose __init__ takes other arguments than it passes on: it pickles, then fails to load."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code


def raise_two_argument_error() -> None:
    raise TwoArgumentError(418, "teapot")
