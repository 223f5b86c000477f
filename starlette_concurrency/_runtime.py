"""The facade's life: its states, its host loop and every transition, in one owner.

A `Concurrency` and the views `driver(name)` returns share one `Runtime`; nothing else writes
its state.

States::

    NOT_STARTED ──first use / enter──> STARTING ──host ready──> SERVING
         ^                                │ start failed            │ last user left, aclose(), the
         │                                v                         │ host's loop ending, idle, exit
         └──────────────────────── NOT_STARTED                      v
         └──drivers closed── STOPPING <──work done, or timeout── DRAINING
                                 └──drivers closed, after aclose() or the process's shutdown──> CLOSED

- NOT_STARTED: no host; the first call starts one (lazily usable).
- STARTING: a host is being set up; calls wait for it, deferred work queues for it.
- SERVING: the host serves `run()` and deferred work.
- DRAINING: the host finishes the deferred work it has. A request's batch joins the drain; other
  deferrals, and new calls, wait for the next host — or, while the process exits, `defer()` raises
  `ConcurrencyClosed` and `run()` is still served (the last requests need it). So the drain ends.
- STOPPING: the drain is over; the drivers close. Work waiting for the next host starts it after.
- CLOSED: after `aclose()` / `close()` (until entered again), or once the process's shutdown has
  begun (SIGTERM, interpreter exit): `run()` and `defer()` raise `ConcurrencyClosed`.

Which loop hosts (see `_host`): the lifespan that entered first (``async with``, the middleware);
else the loop of the first async caller on the main thread (adopted: no thread hop, and the host
ends with that loop); else a thread of the facade's own. A host nobody entered (adopted, own)
stops after `IDLE_TIMEOUT` unused.

With a journal (see `_journal`), a serving host renews the facade's lease on its entries and replays
what gone owners left, in the background, until its drain begins; after the drain it releases what
is left to the next start.

Lock order: `Runtime._lock`, then `DeferredWork`'s lock, never the other way round. Neither is
held across an ``await``, a wait for another thread or a call into a driver; nothing here ever
blocks a caller's event loop (async callers poll, sync callers block only threads without a loop).
"""

from __future__ import annotations

import enum
import importlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import sniffio
from anyio.from_thread import BlockingPortal

from ._config import Settings
from ._context import Carrier
from ._deferred import DeferredWork, HostStopping
from ._drivers.base import Driver
from ._exceptions import ConcurrencyClosed, ConfigurationError
from ._host import Host, HostKind, OwnLoop, adopt
from ._journal import Journal

__all__ = ["BUILTIN_DRIVERS", "IDLE_TIMEOUT", "DriverFactory", "Runtime", "State"]

logger = logging.getLogger("starlette_concurrency")

T = TypeVar("T")

DriverFactory = Callable[[Settings], Driver]

# Built-in drivers, imported only when chosen (the dask one needs an optional dependency).
BUILTIN_DRIVERS: dict[str, str] = {
    "process": "starlette_concurrency._drivers.process:create",
    "fork": "starlette_concurrency._drivers.fork:create",
    "sync": "starlette_concurrency._drivers.sync:create",
    "dask": "starlette_concurrency._drivers.dask:create",
}

#: Seconds a host nobody entered (an adopted loop, the facade's own thread) may sit unused before
#: it stops its drivers; the next call starts them again.
IDLE_TIMEOUT = 60.0

# How often a waiting async caller looks again at a host being started or stopped elsewhere.
_POLL = 0.001

# How many journal entries one claim takes at most (replay is bounded by `max_pending_deferred` too).
REPLAY_CHUNK = 1000

# How often a journal whose last write failed (a full disk) is tried again, in seconds.
PROBE_INTERVAL = 1.0

# How often finished entries are removed from the journal, in one transaction (group commit), in seconds.
FLUSH_INTERVAL = 0.1

Failed = Callable[[BaseException], None]
Submitted = Callable[[], Coroutine[Any, Any, None]]


class State(enum.Enum):
    """Where a facade is in its life (see the module docstring)."""

    NOT_STARTED = "not started"
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"
    CLOSED = "closed"


@dataclass(eq=False)
class _Attempt:
    """One start of a host: done once it serves or failed to."""

    kind: HostKind
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


# The runtimes whose host this task entered (`async with` here), each with what closes it.
_hosting: ContextVar[dict[Runtime, AsyncExitStack] | None] = ContextVar("starlette_concurrency.hosting", default=None)


class Runtime:
    """The life of one facade: drivers, host, users, deferred work; the only writer of that state.

    Args:
        settings: the resolved configuration.
        default: the default driver's name, or a driver instance.

    Raises:
        ConfigurationError: the default driver is unknown or cannot be created.
    """

    def __init__(self, settings: Settings, default: str | Driver) -> None:
        self.settings = settings
        self.factories: dict[str, DriverFactory | str] = dict(BUILTIN_DRIVERS)
        self.drivers: dict[str, Driver] = {}
        self.facades: dict[str, object] = {}  # the facade of each driver name handed out, the default first
        self.context = Carrier(())  # the context variables its calls carry (set by the facade)
        self.warned_unwrapped = False  # defer() was seen serving a request no middleware wraps (said once)
        self.warned_no_lifespan = False  # a middleware served it without a lifespan (said once per facade)
        self.state = State.NOT_STARTED
        self.host: Host | None = None
        self.closed_by: str | None = None  # set by aclose()/close() or the process's shutdown: refuse work
        self.users = 0  # lifespans and `with` blocks entered
        self.exiting = False  # the process's termination has begun (a signal, interpreter exit)
        self.drain_deadline: float | None = None  # set by a termination signal: the whole drain's budget
        self._lock = threading.RLock()
        self._busy = 0  # calls holding the host
        self._last_used = time.monotonic()
        self._queue: list[tuple[Submitted, Failed]] = []  # deferred work waiting for a host being started
        self._for_next = 0  # tasks in the queue waiting for the host after the one that drains
        self._attempt: _Attempt | None = None
        self._started: set[str] = set()  # on the host loop only
        self._starting: dict[str, anyio.Event] = {}  # on the host loop only
        self._own: OwnLoop | None = None
        self.work = DeferredWork(
            settings.max_pending_deferred,
            settings.timeout,
            self.started_driver,
            lambda fn, failed, join, count: self.submit(fn, failed, join=join, count=count),
        )
        self.journal: Journal | None = None
        self._journal_scope: anyio.CancelScope | None = None  # the lease renewal and replay of the current host
        self._replaying = False  # whether the host may still claim journal entries (not once it drains)
        self._next_due: float | None = None  # when a retry a gone owner left is due (time.time()), if one waits
        if isinstance(default, Driver):
            self.default = default.name
            self.factories[default.name] = lambda settings: default
            self.drivers[default.name] = default
            self._check_journal(default)
        else:
            self.default = default
            self.driver(default)  # fail at construction on an unknown name or a missing dependency
        if settings.journal is not None:
            self.journal = Journal(settings.journal)  # fails the start-up on a bad file, with the path
            self.work.journal = self.journal
        _runtimes.add(self)

    def _check_journal(self, driver: Driver) -> None:
        if self.settings.journal is not None and not driver.pickles:
            raise ConfigurationError(
                f"the {driver.name!r} driver cannot use a journal ({self.settings.journal!r}): its tasks are not "
                "pickled, so nothing could be replayed after a crash; use the 'process' or 'dask' driver, or no journal"
            )

    # Drivers ---------------------------------------------------------------------------------------

    def driver(self, name: str) -> Driver:
        """Return the driver of `name`, created on first use (not started).

        Raises:
            ConfigurationError: no driver of that name is registered.
        """
        with self._lock:
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
                driver = factory(self.settings)
                self._check_journal(driver)
                self.drivers[name] = driver
            return self.drivers[name]

    def register(self, name: str, factory: DriverFactory) -> None:
        """Register a driver factory under `name`.

        Raises:
            ConfigurationError: a driver of that name is already in use, or `factory` is not callable.
        """
        with self._lock:
            if name in self.drivers:
                raise ConfigurationError(f"driver {name!r} is already in use and cannot be replaced")
            if not callable(factory):
                raise ConfigurationError(f"the factory of driver {name!r} must be callable")
            self.factories[name] = factory

    async def started_driver(self, name: str) -> Driver:
        """Return the driver of `name`, started; on the host loop only.

        Raises:
            HostStopping: this host's drain is over: its drivers are closing.
        """
        if self.state is State.STOPPING:
            raise HostStopping(self._closed_message("work"))
        driver = self.driver(name)
        while name not in self._started:
            if name in self._starting:
                await self._starting[name].wait()
                continue  # started now, or the starter failed: then this caller tries in its turn
            self._starting[name] = anyio.Event()
            try:
                await driver.start()
                self._started.add(name)
            finally:
                self._starting.pop(name).set()
        return driver

    async def warm(self) -> None:
        """Start the default driver (on the host loop)."""
        await self.started_driver(self.default)

    # Calls -----------------------------------------------------------------------------------------

    async def call(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        """Await `fn` on the host loop: here if this loop hosts, else forwarded; start a host if none.

        Raises:
            ConcurrencyClosed: the facade is closed.
        """
        with self._lock:
            self._refuse(what)
            host = self._take()
        if host is None:
            host = await self._host_for_async(what)
        try:
            if host.here():
                return await fn()
            return await host.portal.call_async(fn)
        finally:
            self._release()

    def call_blocking(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        """Run `fn` on the host loop and wait for it, from a thread without an event loop.

        Raises:
            ConcurrencyClosed: the facade is closed.
        """
        with self._lock:
            self._refuse(what)
            host = self._take()
        if host is None:
            host = self._host_for_blocking(what)
        try:
            future = host.portal.start_task_soon(fn)
            try:
                return future.result()
            except BaseException:
                future.cancel()  # stops the call's tasks on the host loop
                raise
        finally:
            self._release()

    def submit(self, fn: Submitted, failed: Failed, *, join: bool = True, later: bool = False, count: int = 0) -> None:
        """Start `fn` in the background on the host loop, from any thread, never waiting.

        Exactly one of two things happens: `fn` starts, or `failed` is called with the reason. A host
        is started if there is none; while it starts, `fn` waits in a queue. While a host drains, `fn`
        joins its drain if `join` (work accepted before: a request's batch); otherwise it waits for
        the next host, which starts once this one has stopped — unless the facade is closed or the
        process is exiting, where it fails. `later`: see `Host.submit`. `count`: the deferred tasks `fn`
        runs (the drain does not wait for those that wait for the next host).
        """
        launch: HostKind | None = None
        error: BaseException | None = None
        with self._lock:
            state = self.state
            host = self.host if state is State.SERVING or (state is State.DRAINING and join) else None
            if host is None:
                if (
                    state is State.CLOSED
                    or self.closed_by is not None
                    or (self.exiting and state in (State.DRAINING, State.STOPPING))
                ):
                    error = ConcurrencyClosed(self._closed_message("deferred work"))
                else:
                    self._queue.append((fn, failed))
                    if state in (State.DRAINING, State.STOPPING):
                        self._for_next += count
                    if state is State.NOT_STARTED:
                        launch = self._begin(_kind_for_caller())
        if host is not None:
            host.submit(fn, failed, later=later)
        elif launch is not None:
            self._launch(launch)
        elif error is not None:
            failed(error)

    def accepting(self, what: str, *, in_request: bool) -> None:
        """Check that deferred work may be accepted now (under the caller's `lock()`).

        A request's deferrals join its batch, whose fate the drain decides. Others are refused once the
        facade is closed, or once the process's drain has begun: a drain that any thread could feed
        would never end before its timeout.

        Raises:
            ConcurrencyClosed: the facade is closed, or the process is shutting down and draining.
        """
        self._refuse(what)
        if not in_request and self.exiting and self.state in (State.DRAINING, State.STOPPING, State.CLOSED):
            raise ConcurrencyClosed(self._closed_message(what))

    def lock(self) -> threading.RLock:
        """The runtime's lock, for a caller that must check and act in one step (`defer()`)."""
        return self._lock

    def _refuse(self, what: str) -> None:
        if self.closed_by is not None:
            raise ConcurrencyClosed(self._closed_message(what))

    def _closed_message(self, what: str) -> str:
        if self.closed_by is None or self.exiting:
            return (
                f"{what} while this Concurrency is shutting down ({self.closed_by or 'draining deferred work'}): "
                "nothing was accepted; run the work inline, or before shutdown begins"
            )
        return (
            f"{what} on a Concurrency closed by {self.closed_by}: enter it again "
            "(`async with concurrency:` / `with concurrency:`) or create a new one"
        )

    def _take(self) -> Host | None:
        # A draining host takes new calls only while the process exits (its in-flight requests need them);
        # otherwise they wait for it to stop and start the next one, so that the drain ends.
        host = self.host
        if host is not None and (self.state is State.SERVING or (self.state is State.DRAINING and self.exiting)):
            self._busy += 1
            return host
        return None

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1
            self._last_used = time.monotonic()

    async def _host_for_async(self, what: str) -> Host:
        attempt: _Attempt | None = None
        polls = 0
        while True:
            launch: HostKind | None = None
            with self._lock:
                self._refuse(what)
                host = self._take()
                if host is not None:
                    return host
                if attempt is not None and attempt.error is not None:
                    raise attempt.error
                if self.state is State.NOT_STARTED:
                    launch = self._begin(_kind_for_caller())
                    attempt = self._attempt
            if launch is not None:
                self._launch(launch)
            # The host starts on this loop (adopted), or on another thread: never block, look again.
            await anyio.sleep(0 if polls < 100 else _POLL)
            polls += 1

    def _host_for_blocking(self, what: str) -> Host:
        attempt: _Attempt | None = None
        while True:
            launch: HostKind | None = None
            with self._lock:
                self._refuse(what)
                host = self._take()
                if host is not None:
                    return host
                if attempt is not None and attempt.error is not None:
                    raise attempt.error
                if self.state is State.NOT_STARTED:
                    launch = self._begin(HostKind.OWN)
                attempt = self._attempt or attempt
            if launch is not None:
                self._launch(launch)
            if attempt is not None:
                attempt.done.wait(0.05)
            else:
                time.sleep(0.005)  # a host is stopping: wait for it to finish, then start afresh

    # Hosts -----------------------------------------------------------------------------------------

    def _begin(self, kind: HostKind) -> HostKind:
        """NOT_STARTED → STARTING (under the lock)."""
        self.state = State.STARTING
        self._attempt = _Attempt(kind)
        return kind

    def _launch(self, kind: HostKind) -> None:
        """Start the host of an attempt begun with `_begin` (outside the lock)."""
        from . import _exit

        _exit.watch(self)
        try:
            if kind is HostKind.ADOPTED:
                adopt(self._serve)
            elif kind is HostKind.OWN:
                own = OwnLoop(self._serve)
                self._own = own
                own.start()
        except BaseException as exc:  # reported to whoever waits for the host, and to queued work
            self._start_failed(exc)

    async def _serve(self, kind: HostKind) -> None:
        """Host the facade until asked to stop, idle, or until this loop ends; never raises."""
        try:
            async with self._hosting(kind) as host:
                while not host.stop.is_set():
                    with anyio.move_on_after(min(IDLE_TIMEOUT / 4, 5.0)):
                        await host.stop.wait()
                    if self._idle():
                        break
        except BaseException as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                logger.error("the starlette-concurrency host loop failed", exc_info=exc)

    def _idle(self) -> bool:
        with self._lock:
            return (
                self.users == 0
                and self._busy == 0
                and self.work.pending == 0
                and not self._queue
                and time.monotonic() - self._last_used >= IDLE_TIMEOUT
            )

    @asynccontextmanager
    async def _hosting(self, kind: HostKind) -> AsyncIterator[Host]:
        """Serve the drivers on the current loop for the duration of the block; drain and stop after."""
        try:
            async with BlockingPortal() as portal, anyio.create_task_group() as task_group:
                host = Host(
                    portal, task_group, anyio.lowlevel.current_token(), threading.get_ident(), os.getpid(), kind
                )
                self._serving(host)
                try:
                    yield host
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._shutdown(host)
        except BaseException as exc:
            self._start_failed(exc)  # nothing half-made: a start interrupted before serving goes back
            raise

    def _serving(self, host: Host) -> None:
        """STARTING → SERVING: the host is ready; hand it what waited for it."""
        with self._lock:
            self.host = host
            self.state = State.SERVING
            self._last_used = time.monotonic()
            queue, self._queue = self._queue, []
            self._for_next = 0
            attempt, self._attempt = self._attempt, None
        for fn, failed in queue:
            host.submit(fn, failed)
        if self.journal is not None:
            self.journal.hold()
            self._replaying = True
            self._journal_scope = anyio.CancelScope()
            host.submit(
                self._keep_journal,
                lambda exc: logger.error("the journal's replay and lease could not start: %s", exc),
            )
        if attempt is not None:
            attempt.done.set()

    async def _keep_journal(self) -> None:
        """Renew this facade's lease on its journal entries, and replay what gone owners left; until the drain ends."""
        journal, scope = self.journal, self._journal_scope
        assert journal is not None
        assert scope is not None
        renewed = probed = -math.inf
        more = False
        with scope:
            while True:
                try:
                    if journal.unflushed:  # what finished since the last tick
                        await anyio.to_thread.run_sync(journal.flush)
                    now = time.monotonic()
                    due = now - renewed >= journal.lease / 3
                    if due:
                        await anyio.to_thread.run_sync(journal.renew)
                        renewed = now
                    if journal.failure is not None and now - probed >= PROBE_INTERVAL:
                        probed = now  # defer() refuses work until a write succeeds again
                        await anyio.to_thread.run_sync(journal.probe)
                    # Look for what gone owners left at each renewal, and on while there is more.
                    if self._replaying and due and not more:
                        self._announce(await anyio.to_thread.run_sync(journal.claimable), journal)
                    retry_due = self._next_due is not None and time.time() >= self._next_due
                    more = self._replaying and (due or more or retry_due) and await self._replay_some(journal)
                except Exception as exc:  # a locked or vanished file: try again at the next renewal
                    logger.error("the journal %r could not be renewed or read: %s", journal.path, exc)
                    more = False
                    await anyio.sleep(PROBE_INTERVAL)
                if not more:
                    await anyio.sleep(FLUSH_INTERVAL)

    def _announce(self, count: int, journal: Journal) -> None:
        if count:
            logger.warning(
                "replaying %d deferred task(s) left by a previous run (journal %r)",
                count,
                journal.path,
                extra={"replayed": count},
            )

    async def _replay_some(self, journal: Journal) -> bool:
        """Claim and launch one chunk of entries whose owner is gone; tell whether there may be more."""
        limit = self.settings.max_pending_deferred
        room = REPLAY_CHUNK if limit is None else min(REPLAY_CHUNK, limit - self.work.pending)
        if room <= 0:
            await anyio.sleep(0.05)  # bounded by max_pending_deferred: wait until some work has finished
            return True
        claim = await anyio.to_thread.run_sync(journal.claim, room)
        self._next_due = claim.next_due
        if not self._replaying:  # the drain began meanwhile: the release hands these to the next start
            return False
        for entry, reason in claim.dead:
            logger.error(
                "deferred %s moved to the journal's dead entries (entry %d): %s",
                entry.label,
                entry.id,
                reason,
                extra={"task": entry.label, "method": entry.method, "path": entry.path},
            )
        if not claim.entries:
            return bool(claim.dead)
        by_driver: dict[str, list[Any]] = {}
        for entry in claim.entries:
            by_driver.setdefault(entry.driver, []).append(entry)
        for name, entries in by_driver.items():
            try:
                self.driver(name)
            except ConfigurationError as exc:
                for entry in entries:
                    journal.dead(entry.id, f"its driver {name!r} is not known here: {exc}")
                    logger.error("deferred %s moved to the journal's dead entries: %s", entry.label, exc)
                continue
            self.work.replay(name, entries)
        return len(claim.entries) >= room

    def _start_failed(self, exc: BaseException) -> None:
        """STARTING → NOT_STARTED (or CLOSED): report the failure to whoever waited."""
        with self._lock:
            if self.state is not State.STARTING:
                return
            self.state = State.CLOSED if self.closed_by is not None else State.NOT_STARTED
            queue, self._queue = self._queue, []
            self._for_next = 0
            attempt, self._attempt = self._attempt, None
            self._own = None
        if attempt is not None:
            attempt.error = exc
            attempt.done.set()
        for _, failed in queue:
            failed(exc)

    async def _shutdown(self, host: Host) -> None:
        """SERVING → DRAINING → STOPPING → NOT_STARTED or CLOSED; on the host loop."""
        with self._lock:
            if self.host is not host or self.state is not State.SERVING:
                return  # already shut down (an explicit aclose() before the lifespan ended)
            self.state = State.DRAINING
            deadline = self.drain_deadline  # a signal started the clock: what is left of it
            started = [self.drivers[name] for name in self._started if name in self.drivers]
            self._replaying = False  # what is not claimed yet waits for the next start
        _set_draining(started, True)  # no run() can come now: deferred work may use every worker
        await self.work.drain(self.settings.drain_timeout, self._stop_accepting, deadline)
        await self._release_journal()
        with self._lock:
            drivers = list(self.drivers.values())
            self.drivers.clear()
            self._started.clear()
        for driver in drivers:
            try:
                await driver.aclose()
            except Exception:
                logger.exception("driver %r failed to close", driver.name, extra={"driver": driver.name})
        _set_draining(drivers, False)  # an instance given to the facade is started again later
        launch: HostKind | None = None
        with self._lock:
            self.host = None
            if host.kind is HostKind.OWN:
                self._own = None
            if self.exiting and self.closed_by is None:
                self.closed_by = "the process's shutdown"
            self.state = State.CLOSED if self.closed_by is not None else State.NOT_STARTED
            # Deferred while this host drained, for the next one: start it now, or report them.
            queued: list[tuple[Submitted, Failed]] = []
            if self._queue and self.state is State.NOT_STARTED:
                launch = self._begin(HostKind.OWN)
            elif self._queue:
                queued, self._queue = self._queue, []
                self._for_next = 0
        host.stopped.set()
        for _, failed in queued:
            failed(ConcurrencyClosed(self._closed_message("deferred work")))
        if launch is not None:
            self._launch(launch)

    async def _release_journal(self) -> None:
        """Stop renewing the lease and give up this facade's entries: the next start replays them at once."""
        scope, self._journal_scope = self._journal_scope, None
        if scope is not None:
            scope.cancel()
        if self.journal is not None:
            try:
                await anyio.to_thread.run_sync(self.journal.flush)
                await anyio.to_thread.run_sync(self.journal.release)
            except Exception as exc:
                logger.error("the journal %r could not be released: %s", self.journal.path, exc)

    def _stop_accepting(self, force: bool) -> bool:
        """DRAINING → STOPPING once nothing is left (or `force`); the drain calls it until it agrees."""
        with self._lock:
            # Calls in flight may still defer work, so the drain waits for them; not after aclose()/close(),
            # which stop them (ConcurrencyClosed) rather than make the closer wait for the drain timeout.
            calls_done = self._busy == 0 or self.closed_by is not None
            if force or (self.work.launched == self._for_next and calls_done):
                self.state = State.STOPPING
                return True
            return False

    # Entering and leaving --------------------------------------------------------------------------

    async def enter(self, *, warm: bool) -> None:
        """Host the facade on this loop for this task (or join the host that serves); count a user.

        Raises:
            Exception: the default driver failed to start (when `warm`).
        """
        with self._lock:
            self._reopen()
            self.users += 1
            host_here = self.state is State.NOT_STARTED
            if host_here:
                self._begin(HostKind.LIFESPAN)
        stack: AsyncExitStack | None = None
        try:
            if host_here:
                from . import _exit

                _exit.watch(self)
                stack = AsyncExitStack()
                try:
                    await stack.enter_async_context(self._hosting(HostKind.LIFESPAN))
                except BaseException as exc:
                    raise _single(exc) from None
                _hosting.set({**(_hosting.get() or {}), self: stack})
            if warm:
                await self.call(self.warm, "async with")
        except BaseException:
            await self.leave()
            raise

    async def leave(self) -> None:
        """Leave: the host this task entered stops; the last user out stops any other host."""
        hosting = _hosting.get() or {}
        stack = hosting.get(self)
        if stack is not None:
            _hosting.set({other: stack for other, stack in hosting.items() if other is not self})
            await stack.aclose()
        with self._lock:
            self.users = max(0, self.users - 1)
            host = self.host if self.users == 0 else None
        if host is not None and host.kind is not HostKind.LIFESPAN:
            host.request_stop()
            await _wait_async(host.stopped)

    def enter_blocking(self) -> None:
        """Start the facade from a thread without a loop (its own loop thread), and its default driver.

        Raises:
            Exception: the default driver failed to start.
        """
        with self._lock:
            self._reopen()
            self.users += 1
        try:
            self.call_blocking(self.warm, "with")
        except BaseException:
            self.leave_blocking()
            raise

    def leave_blocking(self) -> None:
        """Leave from a thread without a loop: the last user out stops the host it did not enter."""
        with self._lock:
            self.users = max(0, self.users - 1)
            host = self.host if self.users == 0 else None
        if host is not None and host.kind is not HostKind.LIFESPAN:
            host.request_stop()
            if not host.here():
                host.stopped.wait()

    def _reopen(self) -> None:
        if self.closed_by is not None:
            self.closed_by = None
            self.exiting = False
            if self.state is State.CLOSED:
                self.state = State.NOT_STARTED

    # Closing ---------------------------------------------------------------------------------------

    def _mark_closed(self, by: str) -> Host | None:
        with self._lock:
            if self.closed_by is None:
                self.closed_by = by
            if self.state is State.NOT_STARTED:
                self.state = State.CLOSED
            host, waiting = self.host, self._take_waiting()
        self._join(host, waiting)
        return host

    def _take_waiting(self) -> list[tuple[Submitted, Failed]]:
        """Take the work waiting for the next host when there will be none (closed, exiting); under the lock."""
        if self.state is not State.DRAINING or not self._for_next:
            return []
        waiting, self._queue, self._for_next = self._queue, [], 0
        return waiting

    def _join(self, host: Host | None, waiting: list[tuple[Submitted, Failed]], *, later: bool = False) -> None:
        """Hand the draining host work that waited for the next one: it joins this drain instead."""
        for fn, failed in waiting:
            if host is None:  # pragma: no cover - a draining state always has its host
                failed(ConcurrencyClosed(self._closed_message("deferred work")))
            else:
                host.submit(fn, failed, later=later)

    async def close(self) -> None:
        """Refuse new work, drain deferred work, stop every driver (from an event loop)."""
        host = self._mark_closed("aclose()")
        if host is None:
            return
        if host.kind is HostKind.LIFESPAN:
            if host.here():
                await self._shutdown(host)
            else:
                await host.portal.call_async(self._shutdown, host)
        else:
            host.request_stop()
            await _wait_async(host.stopped)

    def close_blocking(self) -> None:
        """Refuse new work, drain deferred work, stop every driver (from a thread without a loop)."""
        host = self._mark_closed("close()")
        if host is None:
            return
        if host.kind is HostKind.LIFESPAN:
            host.portal.call(self._shutdown, host)
        else:
            host.request_stop()
            host.stopped.wait()

    # The process's end (see `_exit`) ---------------------------------------------------------------

    def begin_exit(self, then: Callable[[], None], *, server_stops_lifespan: bool = True) -> bool:
        """A termination signal arrived: shut down what no lifespan will, then call `then` (never blocks).

        A host nobody entered (adopted, own thread) drains (up to `drain_timeout`), logs what it had to
        stop and closes its drivers, on its own loop, while the server still runs; `then` hands the
        signal on to the server afterwards. A lifespan's host is left to the lifespan's shutdown, unless
        the server has no SIGTERM handler that would end the lifespan (`server_stops_lifespan` false:
        hypercorn's trio worker in one process, say): then it is shut down the same way first.

        Returns:
            Whether `then` will be called once the shutdown is over (``False``: nothing to do here,
            call it yourself).
        """
        with self._lock:
            self.exiting = True
            if self.drain_deadline is None:
                self.drain_deadline = time.monotonic() + self.settings.drain_timeout
            joining, waiting = self.host, self._take_waiting()
        self._join(joining, waiting, later=True)
        with self._lock:
            if self.state is State.STARTING:
                kind = self._attempt.kind if self._attempt is not None else None
            elif self.state in (State.SERVING, State.DRAINING) and self.host is not None:
                kind = self.host.kind
            else:
                return False
            if kind is HostKind.LIFESPAN and server_stops_lifespan:
                return False

        async def shut_down_then_hand_over() -> None:
            try:
                host = self.host
                if host is None:
                    return
                if host.kind is HostKind.LIFESPAN:
                    with anyio.CancelScope(shield=True):
                        await self._shutdown(host)
                else:
                    host.stop.set()
                    await _wait_async(host.stopped)
            finally:
                then()

        # Queued for a host still starting; handed over through the loop's queue, this being a signal handler.
        self.submit(shut_down_then_hand_over, lambda exc: then(), later=True)
        return True

    def has_work(self) -> bool:
        """Tell whether deferred work is pending or a host serves (the process should exit gracefully)."""
        with self._lock:
            return self.work.pending > 0 or self.host is not None

    def stop_at_exit(self) -> None:
        """The interpreter is exiting: drain and stop the host, or log what can no longer run."""
        with self._lock:
            self.exiting = True
            attempt = self._attempt if self.state is State.STARTING else None
        if attempt is not None and attempt.kind is HostKind.OWN:
            attempt.done.wait(10)  # a host starting on its own thread: let it come up, then stop it
        with self._lock:
            host = self.host
            queued, self._queue = (self._queue, []) if host is None else ([], self._queue)
            if host is None:
                self._for_next = 0
        for _, failed in queued:
            failed(ConcurrencyClosed("the interpreter exited before a host could start"))
        if host is None:
            self.work.report_lost("the interpreter exited before it could start")
            return
        if host.here() or host.kind is not HostKind.OWN:
            # That loop has ended (or is stuck under this thread): nothing can run there any more.
            self.work.report_lost("its event loop had ended when the interpreter exited")
            return
        host.request_stop()
        if not host.stopped.wait(self.settings.drain_timeout + 10):
            self.work.report_lost("the host loop did not stop in time at interpreter exit")

    def after_fork_in_child(self) -> None:
        """Forget a host copied from the parent process: this child starts afresh."""
        self._lock = threading.RLock()  # the parent's may have been held by another thread at fork
        self.host = None
        self._own = None
        self._attempt = None
        self._queue = []
        self._for_next = 0
        self._busy = 0
        self.users = 0
        self.drivers.clear()
        self._started.clear()
        self._starting.clear()
        self.state = State.CLOSED if self.closed_by is not None else State.NOT_STARTED
        self.work.forget()
        self._journal_scope = None
        if self.journal is not None:
            try:
                self.journal.reown()  # the parent's lease is the parent's
            except Exception:  # the file went away since: deferred work of this child is not durable
                logger.exception("the journal %r could not be reopened in a forked child", self.journal.path)
                self.journal = self.work.journal = None


def _kind_for_caller() -> HostKind:
    """Adopt the caller's loop if it runs on the main thread and ends by itself (it lives as long as the process).

    Elsewhere (a TestClient's portal, ``asyncio.run`` in a thread, a thread without a loop) the
    facade's own thread hosts: a loop that ends after each request would restart the pool each time.
    So it does for an asyncio loop run forever by someone else (twisted's, under daphne): it has no
    task whose end is the loop's end, which is when anyio stops the worker threads it started there,
    and the process would wait for them at exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return HostKind.OWN
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return HostKind.OWN
    if library == "trio":
        return HostKind.ADOPTED
    if library == "asyncio":
        return HostKind.ADOPTED if _loop_ends_with_a_task() else HostKind.OWN
    return HostKind.OWN


def _loop_ends_with_a_task() -> bool:
    """Tell whether the running asyncio loop runs until a task completes (``asyncio.run``, uvloop's run)."""
    import asyncio
    import asyncio.base_events

    if asyncio.current_task() is None:
        return False
    for task in asyncio.all_tasks():
        for callback, _ in getattr(task, "_callbacks", None) or ():
            if callback is asyncio.base_events._run_until_complete_cb or (  # type: ignore[attr-defined]
                getattr(callback, "__module__", None) == "uvloop.loop"
            ):
                return True
    return False


def _set_draining(drivers: list[Driver], draining: bool) -> None:
    """Tell drivers that the drain has begun (or is over): see `Driver.set_draining`."""
    for driver in drivers:
        try:
            driver.set_draining(draining)
        except Exception:  # an optimisation: never a reason for the drain to fail
            logger.exception("driver %r failed to switch its drain mode", driver.name, extra={"driver": driver.name})


async def _wait_async(event: threading.Event) -> None:
    polls = 0
    while not event.is_set():
        await anyio.sleep(0 if polls < 100 else 0.005)
        polls += 1


def _single(exc: BaseException) -> BaseException:
    """Unwrap the exception groups the host's task groups put around one start-up failure."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


_runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()


def runtimes() -> list[Runtime]:
    """Every runtime of this process still alive."""
    return list(_runtimes)


def _after_fork_in_child() -> None:
    for runtime in runtimes():
        runtime.after_fork_in_child()


# A pool used before a fork (gunicorn --preload's master) is not stopped by the fork: the parent may
# go on using it. Nobody uses it in a pre-fork master, so it stops after IDLE_TIMEOUT.
os.register_at_fork(after_in_child=_after_fork_in_child)
