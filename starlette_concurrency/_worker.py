"""The worker process of the `process` driver: a fresh interpreter that runs tasks sent over a pipe.

```
   parent (event loop)                                   worker (this module)
   ───────────────────                                   ────────────────────
   spawn: python _worker.py R W  ──────────────────────▶ read INIT frame: sys.path, initializer, limits
                                  ◀───────── READY ────  import cloudpickle, run initializer
   TASKS frame [payload, ...]     ── pipe R ───────────▶ for each payload: unpickle, call, await if needed
                                  ◀──────── pipe W ────  one RESULT frame per task, in order
   close pipe R (or die)          ─────── EOF/HUP ─────▶ exit
```

Every frame is a 4-byte big-endian length and a body; a result body is one tag byte and a pickle.
Because a worker answers the tasks of a TASKS frame strictly in order and writes each answer before
starting the next task, the parent knows exactly which task a worker was running when it died.
Results never travel on stdout or stderr, so a task may print freely.

This file imports nothing from the package and only the standard library at start-up (cloudpickle
is imported before READY), so it can be started by path: `python -m starlette_concurrency._worker`
would first import the package root, which pulls in starlette and anyio — about 30 ms and 9 MiB
per worker for nothing.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, BinaryIO

HEADER = struct.Struct("!I")

# Tags of the frames a worker sends.
READY = b"R"  # start-up done; body: the worker's pid
OK = b"O"  # the task returned; body: pickled value
ERROR = b"E"  # the task raised; body: pickled (exception, formatted traceback)
REMOTE = b"X"  # the task raised something that would not round-trip; body: pickled (type name, str, traceback)
UNPICKLABLE = b"S"  # the task returned something that would not pickle; body: pickled (type name, str, traceback)
LOAD_FAILED = b"L"  # the task itself would not unpickle here; body: pickled (type name, str, traceback)
IDLE_EXIT = b"I"  # leaving because no task came within the idle timeout; nothing of a later frame ran


def frame(tag: bytes, body: bytes) -> bytes:
    """Frame a message: length header, tag, body."""
    return HEADER.pack(len(body) + 1) + tag + body


def main(argv: list[str]) -> int:
    """Serve tasks from the parent until it closes the pipe."""
    reader = int(argv[1])
    writer: BinaryIO = os.fdopen(int(argv[2]), "wb")
    # The parent owns this process's lifetime: Ctrl-C in a terminal reaches the whole process
    # group, and a worker that died of it would fail a task the server is about to drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    init = _read_frame(reader)
    if init is None:
        return 0
    config = pickle.loads(init)
    sys.path[:] = config["sys_path"]
    _watch_parent(reader)

    import cloudpickle  # type: ignore[import-untyped]  # imported before READY so that the first task does not pay for it

    for module in config["preload"]:
        __import__(module)
    if config["initializer"] is not None:
        cloudpickle.loads(config["initializer"])()
    idle_timeout: float | None = config["idle_timeout"]

    _write(writer, frame(READY, str(os.getpid()).encode()))
    while True:
        if idle_timeout is not None and not _readable_within(reader, idle_timeout):
            _write(writer, frame(IDLE_EXIT, b""))
            return 0
        body = _read_frame(reader)
        if body is None:
            return 0
        for payload in pickle.loads(body):
            try:
                fn = pickle.loads(payload)
            except BaseException as exc:
                _write(writer, frame(LOAD_FAILED, _describe(exc)))
            else:
                _write(writer, result_frame(fn, cloudpickle.dumps))


def result_frame(fn: Callable[[], Any], dumps: Callable[[Any], bytes]) -> bytes:
    """Call `fn` (running a coroutine it returns to completion) and frame how it ended.

    Never raises: a failure, or a result that will not pickle, is framed too. `dumps` is
    cloudpickle's, the fallback for results that plain pickle refuses.
    """
    try:
        value = fn()
        if hasattr(value, "__await__"):
            value = _await(value)
    except BaseException as exc:
        return _encode_error(exc, dumps)
    try:
        return frame(OK, pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    except Exception:
        pass
    try:
        # cloudpickle is slower than pickle but also handles lambdas, local classes and __main__ objects.
        return frame(OK, dumps(value))
    except BaseException as exc:
        return frame(UNPICKLABLE, _describe(exc))


def _await(awaitable: Any) -> Any:
    import asyncio

    async def wrapper() -> Any:
        return await awaitable

    return asyncio.run(wrapper())


def _encode_error(exc: BaseException, dumps: Callable[[Any], bytes]) -> bytes:
    text = "".join(traceback.format_exception(exc))
    try:
        body = dumps((exc, text))
        # An exception pickles as (type, args); one whose __init__ wants other arguments than it
        # passed to Exception.__init__ pickles fine and then fails to load, so try it here.
        pickle.loads(body)
    except BaseException:
        return frame(REMOTE, pickle.dumps((_qualname(exc), str(exc), text)))
    return frame(ERROR, body)


def _describe(exc: BaseException) -> bytes:
    text = "".join(traceback.format_exception(exc))
    return pickle.dumps((_qualname(exc), str(exc), text))


def _qualname(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _read_frame(fd: int) -> bytes | None:
    # Unbuffered on purpose: the idle timeout selects on the fd, which must not hide buffered frames.
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    return _read_exactly(fd, size)


def _read_exactly(fd: int, size: int) -> bytes | None:
    first = os.read(fd, size) if size else b""
    if len(first) == size:
        return first
    data = bytearray(first)
    while first and len(data) < size:
        first = os.read(fd, size - len(data))
        data += first
    return bytes(data) if len(data) == size else None


def _write(writer: BinaryIO, data: bytes) -> None:
    try:
        writer.write(data)
        writer.flush()
    except BrokenPipeError:
        os._exit(0)  # the parent is gone: nobody is left to answer


def _readable_within(fd: int, timeout: float) -> bool:
    import select

    return bool(select.select([fd], [], [], timeout)[0])


def _watch_parent(fd: int) -> None:
    """Exit as soon as the parent's end of the task pipe closes, even in the middle of a long task."""
    import select

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, 0)  # POLLHUP is always reported, and only it: pending data is not an event here
        while True:
            for _, event in poller.poll():
                if event & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
