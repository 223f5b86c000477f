"""What the multiplexed pool (`_pool.py`) holds: calls, their jobs, and workers with their pipes' I/O.

A `Worker` is a `Child` (`_child.py`) with what the pool needs on top: the jobs it holds in flight,
in the order it answers them, a write buffer drained by its writer task, and the read loop that
hands each frame to the pool. `launch` starts a task of the current event loop that no caller waits
for: the per-worker reader, and the spawns of replacement workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import sniffio

from .. import _protocol
from .._closures import Payload, WorkerMirror
from .._tasks import Outcome, Task
from ._child import Child

__all__ = ["Call", "Job", "Worker", "launch"]

logger = logging.getLogger("starlette_concurrency")


def launch(tasks: set[Any], fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run `fn(*args)` as a task of the current event loop that no caller waits for.

    trio: a system task; asyncio: a task kept alive by `tasks`. Either ends with its loop, and an
    exception it raises is logged, never raised into the loop (trio would end the run for it).
    """
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:  # in an asyncio selector callback: no current task
        library = "asyncio"
    if library == "trio":
        import trio

        trio.lowlevel.spawn_system_task(_guarded, fn, *args)
    else:
        import asyncio

        task = asyncio.get_running_loop().create_task(_guarded(fn, *args), context=contextvars.Context())
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _guarded(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    try:
        await fn(*args)
    except Exception:
        logger.exception("a background task of the process pool failed")


@dataclass(eq=False, slots=True)
class Call:
    tasks: Sequence[Task]
    outcomes: list[Outcome | None]
    background: bool
    remaining: int
    done: anyio.Event = field(default_factory=anyio.Event)
    abandoned: bool = False
    error: BaseException | None = None  # the pool failed the call as a whole (closed, workers cannot start)

    def settle(self, index: int, outcome: Outcome) -> None:
        if self.outcomes[index] is None:
            self.outcomes[index] = outcome
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = self.error or error
        self.done.set()


@dataclass(eq=False, slots=True)
class Job:
    id: int
    call: Call
    index: int
    payload: Payload  # its callable, or (slot >= 0) a group's list of callables, shared by the group's jobs
    slot: int = -1  # where its callable is in the group's list
    sent_at: float = 0.0

    @property
    def task(self) -> Task:
        return self.call.tasks[self.index]


class Worker(Child):
    """A pool worker: its process, what it holds in flight, and its reader."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ready = False
        self.retired = False
        self.inflight: deque[Job] = deque()
        self.deferred = 0  # how many of the jobs in flight are deferred work
        # asyncio: the loop whose selector calls this worker's callbacks (see attach)
        self.selector_loop: asyncio.AbstractEventLoop | None = None
        self._on_frames: Callable[[Worker], str | None] | None = None
        self._on_gone: Callable[[Worker, str], None] | None = None
        self._on_batch: Callable[[], None] | None = None
        self.frame_sizes: deque[int] = deque()  # tasks per frame in flight
        self.mirror = WorkerMirror()  # the function skeletons this process was sent: none yet
        self.outbox = bytearray()
        self.wake_writer: anyio.Event | None = None
        self.loop: object = None  # the event loop its reader runs in
        self.scope: anyio.CancelScope | None = None
        self.tasks_done = 0
        self.last_answer = 0.0
        self.start_attempt = 0
        self.dead = False  # gone or going: nothing more is sent to it
        self.stopped_at = 0.0
        _live_workers.add(self)

    def send(self, data: bytes) -> None:
        """Write a frame: at once what the pipe takes, the rest through the writer task, in order."""
        if not self.outbox and self.to_child is not None:
            try:
                written = os.write(self.to_child, data)
            except BlockingIOError:
                written = 0
            except OSError:
                return  # it died: its reader sees it and gives the tasks back
            data = data[written:]
        if data:
            self.outbox += data
            if self.wake_writer is not None:
                self.wake_writer.set()
            if self.selector_loop is not None and self.to_child is not None:
                self.selector_loop.add_writer(self.to_child, self._writable)

    # asyncio: callbacks straight from the selector, no task per worker ---------------------------
    # A reader task would cost each answer one more trip through the event loop before it reaches
    # its caller; a selector callback reads and delivers it at once. (trio has no such callbacks:
    # there, `read_loop` and `write_loop` run as a system task.)

    def attach(
        self,
        loop: asyncio.AbstractEventLoop,
        on_frames: Callable[[Worker], str | None],
        on_gone: Callable[[Worker, str], None],
        on_batch: Callable[[], None],
    ) -> None:
        """Have `loop` call `on_frames` after each read (it takes the complete frames from `frames`),
        `on_batch` after that, then `on_gone` once with why the worker is gone."""
        self.selector_loop, self._on_frames, self._on_gone, self._on_batch = loop, on_frames, on_gone, on_batch
        loop.add_reader(self.from_child, self._readable)
        if self.pidfd is not None:
            loop.add_reader(self.pidfd, self._exited)
        if self.outbox and self.to_child is not None:
            loop.add_writer(self.to_child, self._writable)

    def detach(self) -> None:
        """Stop the selector callbacks (before the fds close, or when another loop takes over)."""
        loop, self.selector_loop = self.selector_loop, None
        if loop is None or loop.is_closed():
            return
        for fd in (self.from_child, self.pidfd):
            if fd is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(fd)
        if self.to_child is not None:
            with contextlib.suppress(Exception):
                loop.remove_writer(self.to_child)

    def _readable(self) -> None:
        assert self._on_frames is not None
        try:
            reason = self._on_frames(self) if self.read_available() else "exit"
            if reason is None and self._on_batch is not None:
                self._on_batch()  # once per read, not per answer: the answers of a chunk cost one dispatch
        except _protocol.ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except Exception:  # a bug of ours: the worker cannot be trusted to be in step any more
            logger.exception("reading a process worker's answers failed")
            reason = "protocol error: see the log"
        if reason is not None:
            self._gone(reason)

    def _exited(self) -> None:
        self._gone("exit")

    def _gone(self, reason: str) -> None:
        self.detach()
        if self._on_gone is not None:
            on_gone, self._on_gone = self._on_gone, None
            on_gone(self, reason)

    def _writable(self) -> None:
        if self.to_child is None or self.closed:
            return
        try:
            written = os.write(self.to_child, self.outbox)
        except BlockingIOError:
            return
        except OSError:  # it died: the reader side sees it
            written = len(self.outbox)
        del self.outbox[:written]
        if not self.outbox and self.selector_loop is not None:
            self.selector_loop.remove_writer(self.to_child)

    async def write_loop(self) -> None:
        """Drain the write buffer whenever the pipe has room (a frame larger than the pipe, say)."""
        while not self.closed and self.to_child is not None:
            if not self.outbox:
                self.wake_writer = anyio.Event()
                await self.wake_writer.wait()
                continue
            try:
                await anyio.wait_writable(self.to_child)
                written = os.write(self.to_child, self.outbox)
            except BlockingIOError:
                continue
            except (OSError, anyio.ClosedResourceError):
                return  # it died: the reader sees it
            del self.outbox[:written]

    async def read_loop(self, handle: Callable[[Worker], str | None], on_batch: Callable[[], None]) -> str:
        """After each read, have `handle` take the complete frames, until it returns a reason to stop;
        return why ("exit": EOF). `on_batch` is called after `handle`, each time."""
        try:
            while True:
                reason = handle(self)
                if reason is not None:
                    return reason
                on_batch()
                try:
                    await anyio.wait_readable(self.from_child)
                except (anyio.ClosedResourceError, OSError):
                    return "exit"
                if not self.read_available():
                    return "exit"
        except _protocol.ProtocolError as exc:
            return f"protocol error: {exc}"


# Every live worker of every pool, so that a child forked from the server (the fork driver's, a
# multiprocessing one) lets go of their pipes: holding them, it would keep the workers alive after the
# server died, and could corrupt their protocol by using them.
_live_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


def _forget_workers_in_forked_child() -> None:
    for worker in list(_live_workers):
        worker.close_quietly()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_workers_in_forked_child)
