"""The state a facade and its `driver(name)` views share: drivers, the host loop, the lifecycle.

Lifecycle: a facade is *not started* until something needs its pool. A lifespan (``async with``,
the middleware) hosts it on the lifespan's loop, reference-counted so that two lifespans at once
behave as without the facade; anything else starts the facade's own loop thread lazily. When the
last user leaves, deferred work is drained, the drivers stop and the facade is not started again
(lazily usable). Only an explicit `aclose()` / `close()` makes it refuse work, until re-entered.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

import anyio
from anyio.from_thread import BlockingPortal

from ._config import Settings
from ._deferred import DeferredWork
from ._drivers.base import Driver
from ._exceptions import ConcurrencyClosed, ConfigurationError
from ._host import Host, OwnLoop

__all__ = ["BUILTIN_DRIVERS", "Core", "DriverFactory"]

logger = logging.getLogger("starlette_concurrency")

DriverFactory = Callable[[Settings], Driver]

# Built-in drivers, imported only when chosen (the dask one needs an optional dependency).
BUILTIN_DRIVERS: dict[str, str] = {
    "process": "starlette_concurrency._drivers.process:create",
    "fork": "starlette_concurrency._drivers.fork:create",
    "sync": "starlette_concurrency._drivers.sync:create",
    "dask": "starlette_concurrency._drivers.dask:create",
}


class Core:
    """State shared by a facade and the views `driver(name)` returns."""

    def __init__(self, settings: Settings, default: str | Driver) -> None:
        self.settings = settings
        self.factories: dict[str, DriverFactory | str] = dict(BUILTIN_DRIVERS)
        self.drivers: dict[str, Driver] = {}
        self.views: dict[str, object] = {}
        self.started: set[str] = set()
        # Drivers being started on the host loop, and the event their other callers wait on there.
        self.starting: dict[str, anyio.Event] = {}
        self.lock = threading.RLock()
        self.start_lock = threading.Lock()
        self.host: Host | None = None
        self.own: OwnLoop | None = None
        self.claimed: int | None = None  # the thread of a lifespan setting up as the host
        self.hosted = threading.Condition(self.lock)  # notified when a claim ends (a host, or a failure)
        self.users = 0  # lifespans and `with` blocks currently entered
        self.closed = False  # closed by aclose()/close(): refuse work until entered again
        self.closed_by = ""
        self.work = DeferredWork(settings.max_pending_deferred, settings.timeout, self.started_driver, self.spawn)
        self._at_exit = False
        if isinstance(default, Driver):
            self.default = default.name
            self.factories[default.name] = lambda settings: default
            self.drivers[default.name] = default
        else:
            self.default = default
            self.driver(default)  # fail at construction on an unknown name or a missing dependency

    @property
    def pending(self) -> int:
        """Deferred tasks accepted and not yet finished."""
        return self.work.pending

    def driver(self, name: str) -> Driver:
        with self.lock:
            if name not in self.drivers:
                factory = self.factories.get(name)
                if factory is None:
                    known = ", ".join(repr(known) for known in sorted(self.factories))
                    raise ConfigurationError(
                        f"unknown concurrency driver {name!r}; known drivers: {known} (register others with extend())"
                    )
                if isinstance(factory, str):
                    module, _, attribute = factory.partition(":")
                    factory = getattr(importlib.import_module(module), attribute)
                self.drivers[name] = factory(self.settings)
            return self.drivers[name]

    async def started_driver(self, name: str) -> Driver:
        """Return the driver of `name`, started; on the host loop only."""
        driver = self.driver(name)
        while name not in self.started:
            if name in self.starting:
                await self.starting[name].wait()
                continue  # started now, or the starter failed: then this caller tries in its turn
            self.starting[name] = anyio.Event()
            try:
                await driver.start()
                self.started.add(name)
            finally:
                self.starting.pop(name).set()
        return driver

    def check_closed(self, what: str) -> None:
        if self.closed:
            raise ConcurrencyClosed(
                f"{what} on a Concurrency closed by {self.closed_by or 'aclose()'}: enter it again "
                "(`async with concurrency:` / `with concurrency:`) or create a new one"
            )

    def check_fork(self) -> None:
        """Forget a host copied from a parent process (gunicorn --preload): this child starts afresh."""
        host = self.host
        if host is not None and not host.alive():
            # The parent's drivers, pipes and threads are not ours: drop them without closing them.
            self.host = self.own = None
            self.claimed = None
            self.drivers.clear()
            self.started.clear()
            self.starting.clear()
            self.users = 0
            self.work.forget()

    def live_host(self) -> Host | None:
        """The host, if one serves this process (no locking: the fast path of every call)."""
        host = self.host
        return host if host is not None and host.alive() else None

    def ensure_host(self) -> Host:
        """Return the host, starting the facade's own loop thread if nothing hosts it (any thread).

        Raises:
            ConcurrencyClosed: the facade was closed.
        """
        with self.start_lock:  # one starter at a time; `lock` stays free for the new loop to take
            with self.lock:
                self.check_fork()
                self.check_closed("use")
                # A lifespan on another loop is starting: use its host rather than start a second one.
                while self.host is None and self.claimed not in (None, threading.get_ident()):
                    self.hosted.wait()
                if self.host is not None:
                    return self.host
                own = OwnLoop(self._serve_own)
                self.own = own
            try:
                host = own.start()
            except BaseException:
                with self.lock:
                    self.own = None
                raise
            if not self._at_exit:
                self._at_exit = True
                atexit.register(_stop_at_exit, weakref.ref(self))
                _drain_on_sigterm(weakref.ref(self))
            return host

    def spawn(self, fn: Callable[[], object]) -> None:
        host = self.live_host() or self.ensure_host()
        host.spawn(fn)  # type: ignore[arg-type]

    async def _serve_own(self, ready: Callable[[Host], None], stop: anyio.Event) -> None:
        async with self.hosting(own=True, warm=False) as host:
            ready(host)
            await stop.wait()

    @asynccontextmanager
    async def hosting(self, *, own: bool, warm: bool) -> AsyncIterator[Host]:
        """Serve the drivers on the current loop for the duration of the block; drain and close after."""
        async with BlockingPortal() as portal, anyio.create_task_group() as task_group:
            host = Host(portal, task_group, threading.get_ident(), os.getpid(), own)
            with self.lock:
                self.host = host
                self.claimed = None
                self.hosted.notify_all()
            self.work.reopen()
            try:
                if warm:
                    await self.started_driver(self.default)
                yield host
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown(host)

    async def shutdown(self, host: Host) -> None:
        """Drain deferred work, then stop every driver; on the host loop."""
        if self.host is not host:
            return  # already shut down (an explicit aclose() before the lifespan ended)
        await self.work.drain(self.settings.drain_timeout)
        with self.lock:
            self.host = None
            if host.own:
                self.own = None
            drivers = list(self.drivers.values())
            self.drivers.clear()
            self.started.clear()
        self.work.reopen()  # not started again: the next defer() starts the facade lazily
        for driver in drivers:
            try:
                await driver.aclose()
            except Exception:
                logger.exception("driver %r failed to close", driver.name, extra={"driver": driver.name})

    def stop_own(self) -> None:
        """Stop the facade's own loop thread, if it runs (from any other thread)."""
        own = self.own
        if own is not None:
            own.stop()


def _stop_at_exit(ref: weakref.ref[Core]) -> None:
    # A server without lifespan (uvicorn --lifespan off, daphne, a WSGI server) exits through
    # here: drain what was deferred, log what cannot finish, stop the workers.
    core = ref()
    if core is not None:
        core.stop_own()


def _drain_on_sigterm(ref: weakref.ref[Core]) -> None:
    """Drain before a SIGTERM ends the process, for servers that exit by re-raising it (uvicorn).

    The drain blocks the server's loop for up to `drain_timeout`; the deferred work itself runs on
    the facade's own loop thread meanwhile, and later calls start the facade afresh.

    Only from the main thread (where handlers live), only over a handler that is a function or the
    default one, never over an ignored signal. The server's own handler still runs first.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            previous(signum, frame)
            if not _loop_running():
                # A WSGI server's main thread (gunicorn): it finishes its request and exits through
                # sys.exit, where atexit drains; draining here would pull the pool from under it.
                return
        core = ref()
        if core is not None:
            core.stop_own()  # drains (up to drain_timeout) while the own loop thread finishes the work
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


def _loop_running() -> bool:
    # In a signal handler no task is current, so anyio cannot tell; ask the loops themselves.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        trio = sys.modules.get("trio")
        return bool(trio is not None and trio.lowlevel.in_trio_run())
    return True
