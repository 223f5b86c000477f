"""The `fork` driver: one child `os.fork()`ed per task, at call time, a rolling cap of `workers` at once.

```
 run([t0 … tn])                         ForkDriver (the caller's task)                child (a copy of the server)
 ──────────────                         ──────────────────────────────                ────────────────────────────
 one lane per slot, min(workers, n):
    lane: take the next index i
          acquire a slot (FIFO; every call shares the `workers` slots)
          os.pipe(); os.fork() ──────────────────────────────────────────────────▶ forget the server: signal handlers,
                                                                                   wakeup fd, other children's pipes,
                                                                                   event loops; gc.freeze()
                                                                                   frame = result_frame(ti.target)
          log records: to the server's loggers ◀── LOG frames (as they are logged)
          read the pipe (anyio.wait_readable) ◀── RESULT frame (the one write) ── write it, os._exit(0)
          waitpid: reap it
          outcome[i] = decode(frame)
          no frame    → WorkerCrashed(exit code or signal)
          cancelled   → SIGKILL + waitpid, re-raise
          release the slot: the next waiting lane forks at once
```

The closure is never pickled: the child has it already, as the parent's memory at the moment of
the fork. Only the result (or the exception and its traceback) travels back, in the same frames as
the `process` driver's workers send. Every child is reaped before its slot is released, so at most
`workers` child processes exist at any moment and none is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pickle
import signal
import sys
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

import anyio
import anyio.lowlevel

from .._config import Settings, check_workers, default_workers
from .._exceptions import ConcurrencyClosed, ConfigurationError, WorkerCrashed
from .._logs import handle as handle_record, load as load_record, task_extra
from .._pickling import decode_outcome, dumps
from .._stats import Stats, TaskCounters
from .._tasks import Outcome, Task
from .._wire.outcome import result_frame
from .._wire.protocol import LOG
from .._wire.worker import die_with_parent, log_forwarder
from ._child import Child
from .base import Driver

__all__ = ["ForkDriver"]

_EXIT_GRACE = 1.0  # seconds a child that sent its result or closed its pipe gets to exit before it is killed
_SETUP_FAILED = 70  # EX_SOFTWARE: the child could not even run the task (a bug of ours; traceback on stderr)

# The read ends of every live child's pipe, whichever driver made it: a new child closes its copies,
# so that no child keeps another's pipe open.
_read_ends: set[int] = set()


class _Forked(Child):
    """A forked child: the parent's read end of its result pipe, its exit event and its process group."""

    lingered = False  # it sent its result or closed its pipe, but did not exit: we killed it

    async def reap(self) -> None:
        """Wait (briefly) for a child that sent its result or closed its pipe to exit; kill it if it lingers."""
        if not await self.wait_exit_within(_EXIT_GRACE):
            self.kill()
            await self.wait_exit_within(_EXIT_GRACE)
            self.lingered = True

    def close(self) -> None:
        _read_ends.discard(self.from_child)
        super().close()


class ForkDriver(Driver):
    """Run each task in a child `os.fork()`ed from the server at call time, at most `workers` at once.

    The child is a copy of the server as of the call, so the closure is never pickled: it may capture
    locks, sockets, open files, large objects, anything. Only its result or exception travels back,
    pickled, on a private pipe that the caller reads without blocking the event loop. A task's
    exception keeps its type, with the child's traceback as ``__cause__``.

    Slots roll: a new child starts as soon as one has ended, and concurrent calls share the
    `workers` slots first come, first served. A child that dies fails its task with `WorkerCrashed`
    (its exit code or signal); on a timeout or a cancellation the call's running children are killed
    and its waiting tasks never start. Every child is reaped before its slot is given back.

    The child leaves the server's world alone: signal handlers go back to their defaults (SIGINT is
    ignored, as in the `process` driver's workers, so that Ctrl-C in a terminal does not kill tasks
    the server is about to drain), the signal wakeup fd and the pipes of other children are closed,
    objects inherited from the server are never garbage-collected in it (`gc.freeze`), the inherited
    event loop is forgotten (a coroutine task runs in a loop of its own, with `asyncio.run`), and it
    ends with `os._exit`: no atexit handlers, no server shutdown, no second flush of the server's
    buffers (the caller flushes `sys.stdout` and `sys.stderr` before forking; `print()` in a task
    shows once, in the server's output).

    What it cannot do: run where there is no `fork` (Windows; `ConfigurationError` at creation);
    make a threaded server safe to fork: a lock that another thread held at the moment of the fork
    stays locked forever in the child (CPython 3.12+ warns about this on every fork; this driver
    silences that warning, see the README). A task sees the server's state as of the call, and
    nothing it changes comes back but its result. A child keeps copies of the server's file
    descriptors (listening and client sockets too) until it exits. If the server is killed outright
    (SIGKILL), a running child is not stopped: it finishes its task, finds nobody to answer, and
    exits. The `process` driver's options (`max_tasks_per_worker`, `initializer`, `preload`, ...)
    do not apply: a child runs one task and is gone.

    Args:
        workers: how many children may run at once (default: the CPU count).

    Raises:
        ConfigurationError: this platform has no `os.fork`, or `workers` is not a positive integer.
    """

    name = "fork"

    def __init__(self, workers: int | None = None) -> None:
        if not hasattr(os, "fork"):
            raise ConfigurationError(
                f"the 'fork' driver needs os.fork(), which this platform ({sys.platform}) does not have; "
                "use the 'process' driver"
            )
        self.workers: int = check_workers("workers", workers) or default_workers()
        # The slots: how many children run, and the lanes waiting for one, first come first served.
        # Plain state and one anyio.Event per wait, so that the driver serves any event loop, one
        # after the other (a TestClient without `with` runs each request in a loop of its own).
        self._running = 0
        self._waiting: deque[anyio.Event] = deque()
        self._children: set[_Forked] = set()
        self._closed = False
        self._pid = os.getpid()
        self._counters = TaskCounters()

    @property
    def pids(self) -> list[int]:
        """The process ids of the children running now (for tests, metrics and the curious)."""
        return sorted(child.pid for child in self._children)

    async def start(self) -> None:
        """Nothing to start ahead: children are forked at call time. After `aclose()`, open again."""
        self._closed = False

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        """Run every task in a child of its own, `workers` at a time; see `Driver.execute`."""
        if self._closed:
            raise ConcurrencyClosed("this fork driver has been closed")
        if os.getpid() != self._pid:
            # run() inside a forked task: the slots, the waiting lanes and the children are the parent's,
            # copied by the fork (every slot may be taken by the very task running here). This process
            # starts with slots of its own, as a fresh driver would.
            self._pid = os.getpid()
            self._running = 0
            self._waiting = deque()
            self._children = set()
        indices = iter(range(len(tasks)))
        lanes = min(len(tasks), self.workers)
        if lanes == 1:
            await self._lane(indices, tasks, outcomes)
        elif lanes:
            async with anyio.create_task_group() as tg:
                for _ in range(lanes):
                    tg.start_soon(self._lane, indices, tasks, outcomes)

    async def _lane(self, indices: Iterator[int], tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        for index in indices:  # shared by the call's lanes: each takes the next task not yet taken
            await self._acquire()
            started = time.monotonic()
            try:
                outcome = outcomes[index] = await self._run(tasks[index])
            except BaseException:
                self._counters.timed_out += 1
                raise
            finally:
                self._release()
            self._counters.record(outcome, time.monotonic() - started)

    async def _acquire(self) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller forks nothing
        if self._running < self.workers and not self._waiting:
            self._running += 1
            return
        slot = anyio.Event()
        self._waiting.append(slot)
        try:
            await slot.wait()
        except BaseException:
            if slot.is_set():  # the slot was handed over as we were cancelled: pass it on
                self._release()
            else:
                self._waiting.remove(slot)
            raise

    def _release(self) -> None:
        if self._waiting:
            self._waiting.popleft().set()  # hand the slot over: the count stays
        else:
            self._running -= 1

    async def _run(self, task: Task) -> Outcome:
        began = time.monotonic()
        try:
            child = _fork(task.target)
        except OSError as exc:  # EAGAIN, ENOMEM: this task could not start, the others may
            return Outcome(error=exc)
        self._children.add(child)
        try:
            message = await child.receive()
            while message is not None and message[0] == LOG:  # what the task logged, ahead of its result
                handle_record(load_record(message[1]), task_extra(self.name, child.pid, task))
                message = await child.receive()
            await child.reap()
        except BaseException:  # cancelled (a timeout, the caller went away): the task must not go on
            child.kill()
            with anyio.CancelScope(shield=True):
                await child.wait_exit_within(_EXIT_GRACE)  # SIGKILL: reaped at once, never a zombie
            raise
        finally:
            self._children.discard(child)
            child.close()
        if message is not None:
            if task.trace is not None:  # its span says where it ran, and for how long
                task.trace.ran(child.pid, time.monotonic() - began)
            return decode_outcome(*message, task)
        child.kill()  # it crashed: what its task started (its process group) goes with it
        what = f"the child process (pid {child.pid}) running {task.label}"
        if child.lingered:
            return Outcome(error=WorkerCrashed.from_returncode(None, what))
        if child.returncode is None:
            return Outcome(
                error=WorkerCrashed(f"{what} ended without a result; its exit status was collected elsewhere")
            )
        return Outcome(error=WorkerCrashed.from_returncode(child.returncode, what))

    async def aclose(self) -> None:
        """Kill the children still running (calls in progress get cancelled by their owners anyway)."""
        self._closed = True
        for child in list(self._children):
            child.kill()

    def stats(self) -> Stats:
        """Return the children running now, the lanes waiting for a slot and the counters so far.

        Task time is measured in the parent, from the fork to the answer.
        """
        return self._counters.snapshot(
            self.name, workers=len(self._children), busy=len(self._children), queued=len(self._waiting)
        )


def _fork(fn: Callable[[], Any]) -> _Forked:
    """Fork a child that runs `fn` and sends back its RESULT frame; return the parent's handle on it."""
    read_end, write_end = os.pipe()
    _read_ends.add(read_end)
    # What the server printed must reach the terminal before the fork, or the child's final flush
    # would print it a second time.
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # pragma: no cover - a closed or broken stream is not ours to fix
            pass
    # No signal handler may run between the fork and the child's reset of the handlers: in the child
    # it would be the server's (a shutdown, or a byte written to the event loop's wakeup fd).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    parent = os.getpid()
    try:
        with warnings.catch_warnings():
            # CPython 3.12+ warns on every fork of a process that has threads, and a server nearly
            # always has some (anyio's and asyncio's worker threads). Choosing this driver is choosing
            # fork: the README explains the trade-off once, instead of one warning per task that
            # nobody can act on. Only that warning, only around this call.
            warnings.filterwarnings("ignore", r".*use of fork\(\) may lead to deadlocks", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: it never returns from here
            _child_main(fn, write_end, mask, parent)
        with contextlib.suppress(OSError):  # also in the parent: no window in which killpg would miss it
            os.setpgid(pid, pid)
    except BaseException:
        _read_ends.discard(read_end)
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return _Forked(pid, read_end)


def _child_main(fn: Callable[[], Any], write_end: int, mask: Iterable[int], parent: int) -> NoReturn:
    """Run `fn` in the child, write its RESULT frame, and leave without running any of the server's code."""
    status = _SETUP_FAILED
    try:
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)  # a group of its own: stopping it stops what the task started
        die_with_parent(parent)
        _forget_the_server(mask)
        _forward_logs(write_end)
        message = result_frame(fn, _dumps_by_reference)
        for stream in (sys.stdout, sys.stderr):  # only what the task printed: the server flushed before the fork
            try:
                if stream is not None:
                    stream.flush()
            except Exception:
                pass
        view = memoryview(message)
        while view:
            view = view[os.write(write_end, view) :]
        status = 0
    except BrokenPipeError:  # the server is gone, or gave up on this task
        status = 0
    except BaseException:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
    finally:
        os._exit(status)


def _dumps_by_reference(obj: Any) -> bytes:
    """Pickle as the parent will resolve it: classes the parent has (those of `__main__` too) by reference.

    The child is a copy of the parent, so whatever plain pickle can name here, the parent has under that
    name: `except PaymentDeclined` catches the task's own `PaymentDeclined`. cloudpickle (by value) is
    the fallback for what has no importable name (a lambda, a class made inside a function).
    """
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return dumps(obj)


def _forget_the_server(mask: Iterable[int]) -> None:
    for signum in signal.valid_signals():
        handler = signal.getsignal(signum)
        if handler not in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.set_wakeup_fd(-1)  # the event loop's: a signal here must not wake the server up
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for fd in _read_ends:
        with contextlib.suppress(OSError):
            os.close(fd)
    _read_ends.clear()
    # The server's objects are the server's: collecting its garbage here could run a finalizer that
    # flushes a file or closes a connection a second time. Also keeps the copy-on-write pages shared.
    gc.freeze()
    _forget_event_loops()


def _forward_logs(write_end: int) -> None:
    """Send what the task logs to the server, ahead of its result, instead of through the server's handlers.

    The child has the server's loggers, levels and handlers; run here, a handler that buffers (a
    queue, an error tracker's client) would never send before `os._exit`. So every logger that has
    handlers gets the forwarder instead, and stops there: each record is sent once, and the server's
    logger of its name hands it to the same handlers, in the server.
    """
    forwarder = log_forwarder(os.fdopen(write_end, "wb", closefd=False))
    loggers = [
        logging.root,
        *(node for node in logging.Logger.manager.loggerDict.values() if isinstance(node, logging.Logger)),
    ]
    for logger in loggers:
        if logger.handlers:
            logger.handlers = [forwarder]
            logger.propagate = False
    if not logging.root.handlers:
        logging.root.handlers = [forwarder]


def _forget_event_loops() -> None:
    """Make the event loop the fork happened in invisible here, so that a task can run a loop of its own.

    The inherited loop shares its epoll instance with the server's: driving it from the child would
    corrupt the server's. Each library keeps "the running loop" in thread-local state, copied by fork.
    """
    asyncio._set_running_loop(None)
    with contextlib.suppress(Exception):  # policy machinery (deprecated from 3.14 on): best effort
        asyncio.set_event_loop(None)
    sniffio = sys.modules.get("sniffio")
    if sniffio is not None:
        sniffio.thread_local.name = None
        sniffio.current_async_library_cvar.set(None)
    trio_run = sys.modules.get("trio._core._run")
    if trio_run is not None:
        # Private, but what trio itself does at the end of a run; without it, trio.run() in a task
        # says it is already inside a run, and trio calls would reach the server's runner.
        trio_run.GLOBAL_RUN_CONTEXT.__dict__.clear()


def create(settings: Settings) -> ForkDriver:
    """Build the driver from a facade's settings."""
    return ForkDriver(settings.workers)
