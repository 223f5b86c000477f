"""The event loop that owns a facade's drivers, and how calls from elsewhere get to it.

A driver's pool is served by one event loop at a time: its host. The host is either the loop of
an app's lifespan (``async with concurrency:``, the middleware) or, when nothing hosts the facade,
a loop the facade runs in a daemon thread of its own, started on first use. Either way the host
runs an anyio `BlockingPortal`, so that calls from any other thread or event loop (a threadpool
endpoint, ``asyncio.run`` in a thread, a WSGI server's threads, a second TestClient) are forwarded
to it and never touch the pool from a loop it does not belong to.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.from_thread import BlockingPortal

from ._exceptions import WrongContext

__all__ = ["Host", "OwnLoop", "in_event_loop", "refuse_in_event_loop"]


@dataclass(eq=False)
class Host:
    """The loop serving the drivers: its portal and task group, its thread and process.

    Attributes:
        portal: how other threads and loops get work onto this loop.
        task_group: where deferred batches run.
        thread: the ident of the loop's thread.
        pid: the process the loop runs in (a forked child must not use its parent's host).
        own: the facade's own thread (``False``: an app's lifespan loop).
    """

    portal: BlockingPortal
    task_group: TaskGroup
    thread: int
    pid: int
    own: bool

    def here(self) -> bool:
        """Tell whether the caller runs on the host loop's thread."""
        return threading.get_ident() == self.thread

    def alive(self) -> bool:
        """Tell whether this host belongs to this process (not a parent's, copied by fork)."""
        return self.pid == os.getpid()

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Start `fn` in the background on the host loop, from any thread.

        Raises:
            RuntimeError: the host loop has stopped.
        """
        if self.here():
            self.task_group.start_soon(fn)
        else:
            self.portal.start_task_soon(fn)


class OwnLoop:
    """A daemon thread running an event loop that hosts the facade until `stop()`.

    Args:
        serve: the coroutine function to run there; it receives a callback to call with the
            `Host` once it is ready, and an `anyio.Event` to wait on until stopped.
    """

    def __init__(self, serve: Callable[[Callable[[Host], None], anyio.Event], Awaitable[None]]) -> None:
        self._serve = serve
        self._ready = threading.Event()
        self._host: Host | None = None
        self._error: BaseException | None = None
        self._stop: anyio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="starlette-concurrency", daemon=True)

    def start(self) -> Host:
        """Start the thread and return its host once it serves.

        Raises:
            BaseException: whatever prevented the loop from hosting the facade.
        """
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        assert self._host is not None
        return self._host

    def _main(self) -> None:
        async def main() -> None:
            self._stop = anyio.Event()

            def ready(host: Host) -> None:
                self._host = host
                self._ready.set()

            await self._serve(ready, self._stop)

        try:
            anyio.run(main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def stop(self) -> None:
        """Ask the loop to drain and stop, and wait until it has (from any other thread)."""
        host, stop = self._host, self._stop
        if host is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already stopped
                host.portal.call(stop.set)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


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
