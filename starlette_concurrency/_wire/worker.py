"""The worker process of the `process` driver: a fresh interpreter that runs tasks sent over a pipe.

```
   parent (event loop)                                   worker (this module)
   ───────────────────                                   ────────────────────
   spawn: python worker.py R W PPID ───────────────────▶ die with the parent (PR_SET_PDEATHSIG)
          INIT frame ──────────────────────────────────▶ sys.path, initializer, preload, limits
                                  ◀───────── READY ────  import cloudpickle, run initializer
   TASKS frame: definitions,      ── pipe R ───────────▶ load_definitions(blob); for each entry:
     entries (first id, count,                             one task: fn = load_task(payload), or a group:
     start, payload) …                                     fns = load_task(payload), run fns[start:start+count]
                                                           each called, awaited if needed
                                  ◀──────── pipe W ────  one answer per task, in order, naming its id
                                  ◀─ RESEND id, count ─  a group that would not load: none of it ran
   SKIP ids (a cancelled call's)  ── pipe R ───────────▶ read between tasks (_Inbox): one not started yet
                                  ◀──── SKIPPED id ────    is answered so, never run
   close pipe R (or die)          ─────── EOF/HUP ─────▶ exit
```

Framing and tags live in `protocol.py`; how a task's end becomes an answer, in `outcome.py`. Because a
worker answers the tasks of a TASKS frame strictly in order and writes each answer before starting the
next task, the parent knows exactly which task a worker was running when it died; the id in each answer
lets it check that, frame by frame. A group (several tasks pickled in one dump by the parent) is loaded
once for the range of it an entry runs; if it will not load, the worker says RESEND and the parent sends
those tasks again one by one, so that only the one that cannot load fails.
`load_definitions` and `load_task` are the two places where what the parent pickled is loaded.
Results never travel on stdout or stderr, so a task may print freely; the worker flushes both after
every task, so that what a task printed shows in the server's output even if the worker is killed later.

The two pipe ends are the worker's only link to the parent, and nothing it starts inherits them: they
are made non-inheritable (an `os.system("… &")` in a task does not keep them open) and replaced by
/dev/null in any child forked without exec (multiprocessing's "fork", a bare `os.fork()`). Otherwise
such a child would hold the result pipe open after the worker died, and the parent, which learns of a
death from EOF on that pipe, would wait for it forever.

This file imports nothing from the package but its own folder, and only the standard library at
start-up (cloudpickle is imported before READY), so it is started by path: `python -m
starlette_concurrency._wire.worker` would first import the package root, which pulls in starlette
and anyio — about 30 ms and 9 MiB per worker for nothing. Started so, it loads its folder as the
package ``starlette_concurrency._wire`` (see `__init__.py`) and runs that copy of itself: one module
object, and no top-level name an app's module could have.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # started by path (see above)
    import importlib.util

    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        del sys.path[0]  # this folder is no place for an app's imports (INIT sets the server's sys.path)
    _spec = importlib.util.spec_from_file_location(
        "starlette_concurrency._wire", os.path.join(_here, "__init__.py"), submodule_search_locations=[_here]
    )
    assert _spec is not None
    assert _spec.loader is not None
    sys.modules[_spec.name] = _package = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_package)
    from starlette_concurrency._wire.worker import main as _main

    sys.exit(_main(sys.argv))

import atexit
import contextlib
import math
import pickle
import signal
import threading
import time
from collections import deque
from typing import Any, BinaryIO

from .closure_store import WorkerStore
from .outcome import describe, encode
from .protocol import (
    IDLE_EXIT,
    INIT,
    LEVELS,
    LOAD_FAILED,
    LOG,
    READY,
    RESEND,
    SINGLE,
    SKIP,
    SKIPPED,
    SLOW_IMPORT,
    START_FAILED,
    TASKS,
    ProtocolError,
    answer,
    frame,
    parse_tasks,
    read_frame,
    resend_body,
    split_skip,
)

# The function skeletons this process was sent (see _closures.py): its parent's mirror of it decides
# what goes in and out, in frame order.
_STORE = WorkerStore()


def load_definitions(blob: bytes) -> None:
    """Load the function skeletons a TASKS frame brings (the ones this worker lacks), forget evicted ones."""
    _STORE.load_definitions(blob)


def load_task(payload: bytes) -> Any:
    """Unpickle one task's callable, or a group's list of them (pickled by `_pickling` in the parent)."""
    return _STORE.load(payload)


def main(argv: list[str]) -> int:
    """Serve tasks from the parent until it closes the pipe."""
    reader = int(argv[1])
    writer: BinaryIO = os.fdopen(int(argv[2]), "wb")
    _keep_to_this_process(reader, writer.fileno())
    if len(argv) > 3:
        die_with_parent(int(argv[3]))
    atexit.register(stop_descendants)  # also called by the pipe watcher, which ends the worker with os._exit
    # The parent owns this process's lifetime: Ctrl-C in a terminal reaches the whole process
    # group, and a worker that died of it would fail a task the server is about to drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    init = read_frame(reader)
    if init is None or init[0] != INIT:
        return 0
    config = pickle.loads(init[1])
    sys.path[:] = config["sys_path"]
    _watch_parent(reader)

    import cloudpickle  # type: ignore[import-untyped]  # imported before READY so that the first task does not pay for it

    if config.get("log_levels") is not None:  # before the initializer: what it logs is forwarded too
        forward_logs(writer, config["log_levels"])
    try:
        for module in config["preload"]:
            __import__(module)
        if config["initializer"] is not None:
            cloudpickle.loads(config["initializer"])()
    except BaseException as exc:  # instead of READY: the parent raises it as the reason it failed to start
        _write(writer, frame(START_FAILED, describe(exc)))
        return 1
    idle_timeout: float | None = config["idle_timeout"]

    _write(writer, frame(READY, str(os.getpid()).encode()))
    first_task = True
    # The last group this worker loaded, by the id its slot 0 has: a group whose tasks come in several
    # frames (the pool cuts chunks as the queue shortens) is loaded once here. At most one is held.
    held_base, held_fns = -1, None
    inbox = _Inbox(reader)
    while True:
        if not inbox.ahead:
            inbox.skip.clear()  # every task sent so far is answered: what was to be skipped is past
            if idle_timeout is not None and not _readable_within(reader, idle_timeout):
                _write(writer, frame(IDLE_EXIT, b""))
                return 0
        message = inbox.next()  # a ProtocolError ends the worker: the parent sees a crash
        if message is None:
            return 0
        definitions, entries = parse_tasks(message[1])
        del message
        try:
            load_definitions(definitions)
        except BaseException as exc:  # none of the frame can run; each task says so by name
            failure = describe(exc)
            for first, count, _, _ in entries:
                for task_id in range(first, first + count):
                    _write(writer, answer(LOAD_FAILED, task_id, failure))
            continue
        entries.reverse()  # popped from the end: each payload is let go of once its tasks ran
        skip = inbox.skip
        while entries:
            first, count, start, payload = entries.pop()
            if start != SINGLE:  # a group pickled in one dump: one load for its tasks
                if first - start == held_base and held_fns is not None:
                    fns: list[Any] = held_fns
                else:
                    held_base, held_fns = -1, None
                    try:
                        fns = _load(payload, writer, first_task)
                    except BaseException:  # none ran: the parent sends them one by one, so only the culprit fails
                        _write(writer, frame(RESEND, resend_body(first, count)))
                        continue
                    finally:
                        first_task = False
                    held_base, held_fns = first - start, fns
                del payload
                for offset in range(count):
                    fn = fns[start + offset]
                    fns[start + offset] = None  # let it go once it ran
                    inbox.look()
                    if skip and first + offset in skip:
                        _write(writer, answer(SKIPPED, first + offset, b""))
                        continue
                    _running[0] = first + offset
                    _answer(writer, first + offset, encode(fn, cloudpickle.dumps))
                    del fn
                del fns
                continue
            inbox.look()
            if skip and first in skip:
                _write(writer, answer(SKIPPED, first, b""))
                continue
            try:
                fn = _load(payload, writer, first_task)
            except BaseException as exc:
                _answer(writer, first, (LOAD_FAILED, describe(exc)))
            else:
                _running[0] = first
                _answer(writer, first, encode(fn, cloudpickle.dumps))
                del fn
            finally:
                first_task = False
            del payload


class _Inbox:
    """The frames from the parent: TASKS in order, and a look ahead between tasks for SKIP and LEVELS.

    A call cancelled while its tasks wait in this worker (pipelined behind another call's, or later in
    a chunk) sends SKIP with their ids; a task not started when its id arrives is answered SKIPPED
    instead of run. Looking costs a poll() (about a microsecond), so it is done before a task only if
    `LOOK_EVERY` seconds passed since the last look: a task behind one that ran longer than that is
    always looked for, and µs tasks in a row pay one poll per `LOOK_EVERY`. TASKS frames
    read while looking wait in `ahead`, in order; the parent counts them as read (see Pool._unread),
    which is safe: they still run in order, after the task in progress.
    """

    LOOK_EVERY = 0.0005

    def __init__(self, reader: int) -> None:
        import select

        self.reader = reader
        self.ahead: deque[tuple[bytes, bytes]] = deque()
        self.skip: set[int] = set()
        self._poller = select.poll()
        self._poller.register(reader, select.POLLIN)
        self._next_look = 0.0

    def next(self) -> tuple[bytes, bytes] | None:
        """The next TASKS frame (blocking), or None at the end of input."""
        while not self.ahead:
            message = read_frame(self.reader)
            if message is None:
                return None
            self._take(message)
        return self.ahead.popleft()

    def look(self) -> None:
        """Before a task: read what the parent sent meanwhile, if it is time to look."""
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + self.LOOK_EVERY
        while self._poller.poll(0):
            message = read_frame(self.reader)
            if message is None:  # the parent closed the pipe: the tasks already sent still run
                self._poller.unregister(self.reader)
                self._next_look = math.inf
                return
            self._take(message)

    def _take(self, message: tuple[bytes, bytes]) -> None:
        tag, body = message
        if tag == TASKS:
            self.ahead.append(message)
        elif tag == SKIP:
            self.skip.update(split_skip(body))
        elif tag == LEVELS:
            set_levels(pickle.loads(body))
        else:
            raise ProtocolError(f"unexpected frame tag {tag!r}")


def _answer(writer: BinaryIO, task_id: int, how: tuple[bytes, bytes]) -> None:
    _flush_stdio()  # before the answer, so that the output shows before run() returns
    _write(writer, answer(how[0], task_id, how[1]))


def _load(payload: bytes, writer: BinaryIO, first: bool) -> Any:
    # What a worker's first load imports is timed and told to the parent (see SLOW_IMPORT).
    return _load_timed(payload, writer) if first else load_task(payload)


SLOW_IMPORT_SECONDS = 1.0  # a first task that takes longer than this to load is worth a warning


def _load_timed(payload: bytes, writer: BinaryIO) -> Any:
    """Load a worker's first task, and tell the parent when its imports took more than a second.

    Loading a task imports the module its function lives in, with everything that module imports
    (a single-file app's `main.py` and its whole framework, say): a cost every fresh worker pays.
    """
    before, began = set(sys.modules), time.perf_counter()
    try:
        return load_task(payload)
    finally:
        seconds = time.perf_counter() - began
        if seconds > SLOW_IMPORT_SECONDS:
            modules = sorted({name.partition(".")[0] for name in set(sys.modules) - before})
            report = f"{seconds:.2f} {','.join(modules[:12])}".encode("ascii", "replace")
            _write(writer, frame(SLOW_IMPORT, report))


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, even while a task holds the GIL (Linux).

    Elsewhere the pipe watcher (`_watch_parent`) does it, between two bytecodes.
    """
    if not sys.platform.startswith("linux"):  # pragma: no cover - platform dependent
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the pipe watcher remains
        return
    if os.getppid() != parent:  # the parent died before the request was made: nobody will signal us
        os._exit(0)


def stop_descendants() -> None:
    """SIGKILL whatever this worker's tasks started that still runs, in its process group or not (Linux).

    Called as the worker ends. The parent kills the worker's process group, but a process in a session
    of its own (``start_new_session=True``, ``setsid``) has left it; it is still this process's
    descendant, though, until this process exits. Freeze the tree round by round (a stopped process
    forks no more), then kill all of it. Self-contained: the parent's side of this, for a worker it
    kills, is `_drivers/_descendants.py`, which this file cannot import.
    """
    if not sys.platform.startswith("linux"):  # pragma: no cover - /proc is Linux's
        return
    seen: set[int] = set()
    for _ in range(100):
        tree, queue = [], [os.getpid()]
        while queue:
            pid = queue.pop()
            with contextlib.suppress(OSError):
                for thread in os.listdir(f"/proc/{pid}/task"):  # a child belongs to the thread that forked it
                    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{thread}/children") as file:
                        children = [int(child) for child in file.read().split()]
                        tree += children
                        queue += children
        new = [pid for pid in tree if pid not in seen]
        if not new:
            break
        for pid in new:
            seen.add(pid)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
    for pid in seen:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


_running = [0]  # the id of the task this worker runs (or last ran): the one its log records belong to
# Frames are written whole under this lock: a task's threads may log while the main thread answers.
_write_lock = threading.Lock()


def _write(writer: BinaryIO, data: bytes) -> None:
    # Straight to the fd, whole: a buffered writer's write-then-flush costs two layers per answer.
    fd = writer.fileno()
    try:
        with _write_lock:
            written = os.write(fd, data)
            while written < len(data):  # a blocking pipe writes all of it but for a signal; be exact anyway
                written += os.write(fd, memoryview(data)[written:])
    except BrokenPipeError:
        os._exit(0)  # the parent is gone: nobody is left to answer


def forward_logs(writer: BinaryIO, levels: dict[str, int]) -> None:
    """Send every log record emitted in this worker to the parent (see `_logs.py`), not to stderr.

    Handlers an initializer added stay; the last-resort stderr handler is no longer used.
    """
    import logging

    logging.root.addHandler(log_forwarder(writer))
    set_levels(levels)


def log_forwarder(writer: BinaryIO) -> Any:
    """A `logging.Handler` that writes each record to `writer` in a LOG frame, as it is emitted.

    The frame names the task running then; the record's message is formatted and its exception
    rendered as text here, so that its args and exc_info need not pickle.
    """
    import logging

    standard = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
    scalars = (str, int, float, bool, type(None))
    exceptions = logging.Formatter()

    class LogForwarder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                fields = {key: value for key, value in record.__dict__.items() if key not in standard}
                fields = {key: value for key, value in fields.items() if isinstance(value, scalars)}  # extra=
                fields.update(
                    name=record.name,
                    levelno=record.levelno,
                    levelname=record.levelname,
                    msg=record.getMessage(),
                    pathname=record.pathname,
                    filename=record.filename,
                    module=record.module,
                    lineno=record.lineno,
                    funcName=record.funcName,
                    created=record.created,
                    msecs=record.msecs,
                    thread=record.thread,
                    threadName=record.threadName,
                    process=record.process,
                    processName=record.processName,
                    exc_text=exceptions.formatException(record.exc_info) if record.exc_info else record.exc_text,
                    stack_info=record.stack_info,
                )
                body = pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
                _write(writer, answer(LOG, _running[0], body))
            except RecursionError:
                raise
            except Exception:
                self.handleError(record)

    return LogForwarder()


_levels_set: set[str] = set()  # the loggers set_levels gave a level: it takes it back when the server does


def set_levels(levels: dict[str, int]) -> None:
    """Give this process's loggers the levels the server's have (LEVELS), so that what it drops is not sent."""
    import logging

    for name in _levels_set - levels.keys():
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name, level in levels.items():
        (logging.getLogger(name) if name else logging.root).setLevel(level)
    _levels_set.clear()
    _levels_set.update(name for name in levels if name)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        # A task closed or replaced it: its problem, not the protocol's. A try costs less than
        # contextlib.suppress, and this runs after every task.
        try:  # noqa: SIM105
            stream.flush()
        except Exception:
            pass


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
                    stop_descendants()
                    os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
