"""The lifecycle half of the facade: entering and leaving (async and sync), closing, waiting for deferred work.

See `_core` for the states: not started, hosted by a lifespan or by the facade's own loop, closed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from contextvars import ContextVar
from types import TracebackType
from typing import Self

import anyio
import anyio.to_thread

from ._core import Core
from ._host import Host, refuse_in_event_loop
from ._tasks import Outcome

__all__ = ["Lifecycle"]

# The facades whose pool this task hosts (entered with `async with` here), each with what closes it: a
# mapping, since one task may host several facades (`async with a, b:`); replaced, never mutated.
_hosting: ContextVar[Mapping[Core, AsyncExitStack] | None] = ContextVar("starlette_concurrency.hosting", default=None)


class Lifecycle:
    """Start, stop and wait: mixed into `Concurrency`."""

    _core: Core

    async def wait_deferred(self, timeout: float | None = None) -> None:
        """Wait until every deferred batch handed over so far has finished (for tests).

        Args:
            timeout: seconds to wait at most; default: no limit.

        Raises:
            TimeoutError: work was still running after `timeout` seconds.
        """
        await self._core.work.wait(timeout)

    def wait_deferred_blocking(self, timeout: float | None = None) -> None:
        """Wait, from sync code, until every deferred batch handed over so far has finished.

        Raises:
            TimeoutError: work was still running after `timeout` seconds.
            WrongContext: called on a thread that runs an event loop; use `wait_deferred()`.
        """
        refuse_in_event_loop("wait_deferred_blocking()", "await concurrency.wait_deferred()")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._core.work.launched:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"deferred work was still running after {timeout} s")
            time.sleep(0.01)

    async def __aenter__(self) -> Self:
        """Start the default driver's workers on this loop (or join the lifespan that already did).

        Raises:
            Exception: the driver failed to start (a worker initializer that raises...).
        """
        core = self._core
        with core.lock:
            core.check_fork()
            core.closed = False
            core.users += 1
            host_here = core.host is None and core.claimed is None
            if host_here:
                core.claimed = threading.get_ident()
        try:
            if host_here:
                stack = AsyncExitStack()
                try:
                    await stack.enter_async_context(core.hosting(own=False, warm=True))
                except BaseException as exc:
                    with core.lock:
                        core.claimed = None
                        core.hosted.notify_all()
                    raise _single(exc) from None
                _hosting.set({**(_hosting.get() or {}), core: stack})
            else:
                # Another lifespan hosts the pool: only check that the default driver starts.
                host = core.live_host() or core.ensure_host()
                if host.here():
                    await self._warm()
                else:
                    await host.portal.call_async(self._warm)
        except BaseException:
            with core.lock:
                core.users -= 1
            raise
        return self

    async def _warm(self) -> list[Outcome]:
        await self._core.started_driver(self._core.default)
        return []

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Leave: the last one out drains deferred work and stops the workers (not started again)."""
        core = self._core
        hosting = _hosting.get() or {}
        if core in hosting:
            _hosting.set({other: stack for other, stack in hosting.items() if other is not core})
            await hosting[core].aclose()
        with core.lock:
            core.users -= 1
            last = core.users <= 0
        if last:
            await anyio.to_thread.run_sync(core.stop_own)

    def __enter__(self) -> Self:
        """Start the facade from sync code: its own loop thread and the default driver's workers.

        Raises:
            WrongContext: called on a thread that runs an event loop; use ``async with``.
            Exception: the driver failed to start.
        """
        refuse_in_event_loop("`with concurrency:`", "async with concurrency:")
        core = self._core
        with core.lock:
            core.check_fork()
            core.closed = False
            core.users += 1
        try:
            core.ensure_host().portal.call(self._warm)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Leave: the last one out drains deferred work and stops the workers (not started again)."""
        core = self._core
        with core.lock:
            core.users -= 1
            last = core.users <= 0
        if last:
            core.stop_own()

    async def aclose(self) -> None:
        """Drain deferred work (up to `drain_timeout`), then stop every driver's workers.

        Idempotent. Afterwards `run()` and `defer()` raise `ConcurrencyClosed`, until the facade is
        entered again.
        """
        core = self._core
        host = self._close("aclose()")
        if host is None:
            return
        if host.own:
            await anyio.to_thread.run_sync(core.stop_own)
        elif host.here():
            await core.shutdown(host)
        else:
            await host.portal.call_async(core.shutdown, host)

    def close(self) -> None:
        """Drain deferred work (up to `drain_timeout`), then stop every driver's workers; from sync code.

        Idempotent. Afterwards `run()` and `defer()` raise `ConcurrencyClosed`, until the facade is
        entered again.

        Raises:
            WrongContext: called on a thread that runs an event loop; use ``await aclose()``.
        """
        refuse_in_event_loop("close()", "await concurrency.aclose()")
        host = self._close("close()")
        if host is None:
            return
        if host.own:
            self._core.stop_own()
        else:
            host.portal.call(self._core.shutdown, host)

    def _close(self, by: str) -> Host | None:
        core = self._core
        with core.lock:
            core.check_fork()
            if not core.closed:
                core.closed, core.closed_by = True, by
            return core.host


def _single(exc: BaseException) -> BaseException:
    """Unwrap the exception groups the host's task groups put around one start-up failure."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
