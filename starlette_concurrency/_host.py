"""The event loop that serves a facade's drivers, and how work from elsewhere gets onto it.

A driver's pool is served by one event loop at a time: its host. The host is the loop of an app's
lifespan (``async with concurrency:``, the middleware), or, when nothing hosts the facade, the loop
of its first async caller (adopted: a background task there serves it until that loop ends), or,
for callers that have no loop at all (a WSGI server's threads, a script), a loop the facade runs
in a daemon thread of its own. Either way the host runs an anyio `BlockingPortal`, so that calls
from any other thread or event loop are forwarded to it and never touch the pool from a loop it
does not belong to. Nothing here ever blocks an event loop's thread: `Host.submit` hands work over
without waiting for the host to take it.

This module is mechanism only; `_runtime` decides when a host starts and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import sniffio
from anyio.abc import TaskGroup
from anyio.from_thread import BlockingPortal
from anyio.lowlevel import EventLoopToken

from ._exceptions import WrongContext

__all__ = ["Host", "HostKind", "OwnLoop", "adopt", "in_event_loop", "refuse_in_event_loop"]


class HostKind(enum.Enum):
    """Who runs the host loop."""

    LIFESPAN = "lifespan"  # an app's lifespan or an `async with` block: it decides when the host ends
    ADOPTED = "adopted"  # the loop of the first async caller: the host ends with that loop
    OWN = "own"  # the facade's own daemon thread: for callers without a loop


@dataclass(eq=False)
class Host:
    """The loop serving the drivers: its portal, task group and token, its thread and process.

    Attributes:
        portal: how other threads and loops call into this loop (and wait for the answer).
        task_group: where deferred batches run.
        token: how other threads and loops hand work to this loop without waiting.
        thread: the ident of the loop's thread.
        pid: the process the loop runs in (a forked child must not use its parent's host).
        kind: who runs the loop.
        stop: set (on the host loop) to end a host that waits for it (adopted, own).
        stopped: set once the host has drained and stopped its drivers.
    """

    portal: BlockingPortal
    task_group: TaskGroup
    token: EventLoopToken
    thread: int
    pid: int
    kind: HostKind
    stop: anyio.Event = field(default_factory=anyio.Event)
    stopped: threading.Event = field(default_factory=threading.Event)

    def here(self) -> bool:
        """Tell whether the caller runs on the host loop's thread."""
        return threading.get_ident() == self.thread

    def alive(self) -> bool:
        """Tell whether this host belongs to this process (not a parent's, copied by fork)."""
        return self.pid == os.getpid()

    def submit(
        self,
        fn: Callable[[], Coroutine[Any, Any, None]],
        failed: Callable[[BaseException], None],
        *,
        later: bool = False,
    ) -> None:
        """Start `fn` in the background on the host loop, from any thread, without waiting.

        Exactly one of two things happens: `fn` starts, or `failed` is called with the reason (the
        host loop has ended, or its task group has closed). `later`: go through the loop's queue even
        on its own thread (from a signal handler, where no task runs).
        """

        def start() -> None:
            try:
                self.task_group.start_soon(fn)
            except BaseException as exc:
                failed(exc)

        if self.here() and not later:
            start()
            return
        try:
            self.token.backend_class.run_sync_soon(start, (), self.token.native_token)
        except BaseException as exc:  # RunFinishedError, or a closed asyncio loop
            failed(exc)

    def request_stop(self) -> None:
        """Ask a host that waits on `stop` to drain and end (from any thread, a signal handler too; never waits)."""
        with contextlib.suppress(BaseException):  # the loop has ended: its host is ending or gone already
            self.token.backend_class.run_sync_soon(self.stop.set, (), self.token.native_token)


Serve = Callable[[HostKind], Awaitable[None]]


def adopt(serve: Serve) -> None:
    """Run `serve` in the background on the calling task's event loop, until that loop ends.

    On asyncio a task of the loop (cancelled when ``asyncio.run`` finishes); on trio a system task
    (cancelled when the run's main task has finished). `serve` must never raise.
    """
    if sniffio.current_async_library() == "trio":
        trio = sys.modules["trio"]
        trio.lowlevel.spawn_system_task(serve, HostKind.ADOPTED, name="starlette-concurrency host")
        return
    loop = asyncio.get_running_loop()
    task: asyncio.Task[None] = loop.create_task(
        _as_coroutine(serve, HostKind.ADOPTED), name="starlette-concurrency host"
    )
    _adopted.add(task)
    task.add_done_callback(_adopted.discard)


async def _as_coroutine(serve: Serve, kind: HostKind) -> None:
    await serve(kind)


_adopted: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones


class OwnLoop:
    """A daemon thread running an event loop that hosts the facade until asked to stop."""

    def __init__(self, serve: Serve) -> None:
        self._serve = serve
        self.thread = threading.Thread(target=self._main, name="starlette-concurrency", daemon=True)

    def start(self) -> None:
        """Start the thread; `serve` reports when it hosts (or why it could not)."""
        self.thread.start()

    def _main(self) -> None:
        anyio.run(self._serve, HostKind.OWN)

    def join(self) -> None:
        """Wait until the thread has finished (not from the thread itself)."""
        if self.thread is not threading.current_thread() and self.thread.ident is not None:
            self.thread.join()


def in_event_loop() -> bool:
    """Tell whether the calling thread is running an event loop (blocking it would stall it)."""
    try:
        anyio.lowlevel.current_token()  # raises when no asyncio or trio loop runs in this thread
    except Exception:
        return False
    return True


def refuse_in_event_loop(what: str, instead: str) -> None:
    """Refuse a blocking call on an event loop's thread, saying what to call instead.

    Raises:
        WrongContext: the calling thread runs an event loop.
    """
    if in_event_loop():
        raise WrongContext(
            f"{what} was called on a thread that runs an event loop: it would block that loop (and hang if "
            f"the loop hosts the pool). Use `{instead}` there, or call {what} from a worker thread "
            "(a sync endpoint, anyio.to_thread.run_sync)"
        )
