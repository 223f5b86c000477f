"""Module-level task functions: workers import them by reference, as they would an app's own module."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `predicate()` holds (polling: files and processes have no event to wait on)."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)


V = TypeVar("V")


def identity(value: V) -> V:
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


# Process driver: reliability and fault injection (tests/drivers/test_process.py, tests/faults/) -------------

WORKER_SCRIPT = "worker.py"


def worker_children() -> list[int]:
    """The pids of this process's children that are process-driver workers (zombies included)."""
    import psutil

    pids = []
    for child in psutil.Process().children():
        try:
            if any(arg.endswith(WORKER_SCRIPT) for arg in child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:  # it exited meanwhile (or is a zombie with no command line left)
            continue
    return pids


def gone(pid: int) -> bool:
    """True once the process has exited (a zombie waiting for a parent that no longer exists counts)."""
    import psutil

    try:
        # A child of ours: exited means waitable. /proc shows a killed process as a zombie as soon as
        # its main thread is gone, but waitpid() reports it only once its other threads are gone too.
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        pass  # not our child (a worker of a server we started), or reaped already
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def timed_burn(n: int) -> tuple[int, float, float]:
    """Burn CPU; return (pid, start, end) on the system-wide monotonic clock."""
    start = time.monotonic()
    burn(n)
    return os.getpid(), start, time.monotonic()


def report_then_sleep(path: Path, seconds: float, value: object) -> object:
    """Write this worker's pid to `path` (atomically), sleep, return `value`."""
    partial = path.with_suffix(".tmp")
    partial.write_text(str(os.getpid()))
    partial.rename(path)
    time.sleep(seconds)
    return value


def report_sleep_touch(pid_path: Path, marker: Path, seconds: float) -> None:
    """Report the pid, then leave a side effect after a blocking (uncooperative) sleep."""
    report_then_sleep(pid_path, seconds, None)
    marker.write_text("ran")


def echo_or_crash(value: object, crash: bool) -> object:
    if crash:
        os._exit(7)
    return value


def echo_raise_or_crash(value: object, fate: str) -> object:
    if fate == "crash":
        os._exit(7)
    if fate == "raise":
        raise ValueError(value)
    return value


def close_result_pipe_and_hang() -> None:
    """Close the worker's result pipe (its fd is argv[2]) but stay alive: EOF without an exit status."""
    import sys

    os.close(int(sys.argv[2]))
    time.sleep(30)


def spawn_then_crash(pid_path: Path) -> None:
    """Leave a long-lived child that inherits whatever it can (close_fds=False), then die."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], close_fds=False)
    pid_path.write_text(str(child.pid))
    os._exit(3)


def fork_then_crash(pid_path: Path) -> None:
    """Leave a forked (not exec'd) child behind, then die."""
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    pid_path.write_text(str(child))
    os._exit(3)


def fork_and_return() -> tuple[str, int]:
    """Fork; both processes return into the worker's loop. Only the worker's answer may reach the parent."""
    child = os.fork()
    return ("child", os.getpid()) if child == 0 else ("parent", os.getpid())


_hoard: list[bytes] = []


def hoard(nbytes: int) -> int:
    """Keep `nbytes` of touched memory alive in this worker; return its pid."""
    if nbytes:
        _hoard.append(b"x" * nbytes)
    return os.getpid()


def chatter(value: object) -> object:
    """Write to stdout and stderr every way a task might, including bytes that look like frames."""
    import struct
    import sys
    import warnings

    frame_like = struct.pack("!I", 5) + b"Ohello"
    print(f"print {value}")
    print("no newline", end="")
    print(f"to stderr {value}", file=sys.stderr)
    sys.stdout.buffer.write(frame_like + b"\n")
    os.write(1, frame_like + f" os.write(1) {value}\n".encode())
    os.write(2, frame_like + f" os.write(2) {value}\n".encode())
    warnings.warn(f"warning {value}", UserWarning, stacklevel=1)
    return value


def print_a_lot(nbytes: int) -> int:
    print("y" * nbytes)
    return nbytes


def close_stdout() -> str:
    import sys

    sys.stdout.close()
    return "closed"


def read_stdin() -> str:
    return input()


def big_bytes(nbytes: int) -> bytes:
    return bytes(range(256)) * (nbytes // 256)


def digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def surroundings(variable: str) -> tuple[str, list[str], str | None, int]:
    """What a worker inherited: cwd, sys.path, one environment variable, and its parent's pid."""
    import sys

    return os.getcwd(), list(sys.path), os.environ.get(variable), os.getppid()


class ManyArgumentsError(Exception):
    def __init__(self, code: int, reason: str, retry: bool) -> None:
        super().__init__(f"{code} {reason}")
        self.code, self.reason, self.retry = code, reason, retry


class KeywordOnlyError(Exception):
    def __init__(self, *, field: str) -> None:
        super().__init__(f"bad field {field}")
        self.field = field


class UnpicklableAttributeError(Exception):
    def __init__(self, message: str) -> None:
        import threading

        super().__init__(message)
        self.lock = threading.Lock()


class RefusesPicklingError(Exception):
    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("I do not travel")


class BadStrError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("nor pickling")


class CustomOSError(OSError):
    def __init__(self, path: str, hint: str) -> None:
        super().__init__(2, "No such file or directory", path)
        self.hint = hint


class Unloadable:
    """Pickles in the worker; unpickling it fails (in the parent)."""

    def __reduce__(self) -> tuple[object, ...]:
        return int, ("not a number",)


def raise_(exc: BaseException) -> None:
    raise exc


def raise_many_arguments_error() -> None:
    raise ManyArgumentsError(503, "busy", True)


def raise_keyword_only_error() -> None:
    raise KeywordOnlyError(field="email")


def raise_unpicklable_attribute_error() -> None:
    raise UnpicklableAttributeError("has a lock")


def raise_refuses_pickling_error() -> None:
    raise RefusesPicklingError("stay")


def raise_bad_str_error() -> None:
    raise BadStrError()


def raise_custom_os_error() -> None:
    raise CustomOSError("/nope", "check the path")


def return_lock() -> object:
    import threading

    return threading.Lock()


def return_generator() -> object:
    return (i for i in range(3))


def return_unloadable() -> object:
    return Unloadable()


def exit_worker(code: int) -> None:
    import sys

    sys.exit(code)


def interrupt() -> None:
    raise KeyboardInterrupt


def scheduler_address(scheduler_file: Path, scheduler: subprocess.Popen[bytes]) -> str:
    """Wait for a `dask scheduler --scheduler-file` process to write its address, and return it."""
    deadline = time.monotonic() + 60
    while scheduler.poll() is None and time.monotonic() < deadline:
        try:
            address: str = json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):  # not written yet, or half written
            time.sleep(0.05)
        else:
            return address
    raise RuntimeError(f"the dask scheduler did not start (exit code {scheduler.poll()})")
