"""The worker process of the `process` driver: a fresh interpreter that runs tasks sent over a pipe.

```
   parent (event loop)                                   worker (this module)
   ───────────────────                                   ────────────────────
   spawn: python _worker.py R W  ──────────────────────▶ read INIT frame: sys.path, initializer, limits
                                  ◀───────── READY ────  import cloudpickle, run initializer
   TASKS frame [fn, ...]          ── pipe R ───────────▶ unpickle the chunk; call each, await if needed
                                  ◀──────── pipe W ────  one RESULT frame per task, in order
   close pipe R (or die)          ─────── EOF/HUP ─────▶ exit
```

Every frame is a 4-byte big-endian length and a body; a result body is one tag byte and a pickle.
Because a worker answers the tasks of a TASKS frame strictly in order and writes each answer before
starting the next task, the parent knows exactly which task a worker was running when it died.
Results never travel on stdout or stderr, so a task may print freely; the worker flushes both after
every task, so that what a task printed shows in the server's output even if the worker is killed later.

The two pipe ends are the worker's only link to the parent, and nothing it starts inherits them: they
are made non-inheritable (an `os.system("… &")` in a task does not keep them open) and replaced by
/dev/null in any child forked without exec (multiprocessing's "fork", a bare `os.fork()`). Otherwise
such a child would hold the result pipe open after the worker died, and the parent, which learns of a
death from EOF on that pipe, would wait for it forever.

This file imports nothing from the package and only the standard library at start-up (cloudpickle
is imported before READY), so it can be started by path: `python -m starlette_concurrency._worker`
would first import the package root, which pulls in starlette and anyio — about 30 ms and 9 MiB
per worker for nothing.
"""

from __future__ import annotations

import contextlib
import copyreg
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
    _keep_to_this_process(reader, writer.fileno())
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

    try:
        for module in config["preload"]:
            __import__(module)
        if config["initializer"] is not None:
            cloudpickle.loads(config["initializer"])()
    except BaseException as exc:  # instead of READY: the parent raises it as the reason it failed to start
        _write(writer, frame(REMOTE, _describe(exc)))
        return 1
    idle_timeout: float | None = config["idle_timeout"]

    _write(writer, frame(READY, str(os.getpid()).encode()))
    while True:
        if idle_timeout is not None and not _readable_within(reader, idle_timeout):
            _write(writer, frame(IDLE_EXIT, b""))
            return 0
        body = _read_frame(reader)
        if body is None:
            return 0
        try:
            fns = pickle.loads(body)
        except BaseException as exc:  # one answer for the whole chunk: the parent resends it task by task
            _write(writer, frame(LOAD_FAILED, _describe(exc)))
            continue
        for fn in fns:
            result = result_frame(fn, cloudpickle.dumps)
            _flush_stdio()  # before the answer, so that the output shows before run() returns
            _write(writer, result)
        del fns


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
    if isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt... raised in the server would stop it
        # An exception pickles as (type, args); one whose __init__ wants other arguments than it
        # passed to Exception.__init__ pickles fine and then fails to load, so try it here, then try
        # rebuilding it without calling __init__. What still fails travels as a RemoteError.
        cls = type(exc)  # a class with a __reduce__ of its own said how it pickles: respect that
        by_default = cls.__reduce__ in _BUILTIN_REDUCE and cls.__reduce_ex__ is object.__reduce_ex__
        for candidate in (exc, _ByState(exc)) if by_default else (exc,):
            try:
                body = dumps((candidate, text))
                pickle.loads(body)
            except BaseException:
                continue
            return frame(ERROR, body)
    return frame(REMOTE, pickle.dumps((_qualname(exc), _str(exc), text)))


_BUILTIN_REDUCE = (BaseException.__reduce__, OSError.__reduce__)


class _ByState:
    """Pickles as the exception it wraps, rebuilt from its args and attributes without calling __init__."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        base = next(cls for cls in type(exc).__mro__ if cls.__module__ == "builtins")
        state = {**getattr(exc, "__dict__", {}), "args": exc.args}
        if isinstance(exc, OSError):
            state.update(errno=exc.errno, strerror=exc.strerror, filename=exc.filename, filename2=exc.filename2)
        return copyreg._reconstructor, (type(exc), base, None), state  # type: ignore[attr-defined]


def _describe(exc: BaseException) -> bytes:
    text = "".join(traceback.format_exception(exc))
    return pickle.dumps((_qualname(exc), _str(exc), text))


def _str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:
        return "<exception str() failed>"


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


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a task closed or replaced it: its problem, not the protocol's
            stream.flush()


def _keep_to_this_process(*fds: int) -> None:
    """Make sure no process a task starts holds the pipes (see the module docstring)."""
    for fd in fds:
        os.set_inheritable(fd, False)

    def blind() -> None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in fds:
            os.dup2(devnull, fd, inheritable=False)
        os.close(devnull)

    os.register_at_fork(after_in_child=blind)


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
