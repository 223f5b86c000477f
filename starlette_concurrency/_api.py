"""The `Concurrency` facade: `run()`, `defer()`, `driver()`, `extend()` and the lifecycle."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, overload

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.lowlevel import EventLoopToken

from ._config import Settings, positive
from ._context import Deferred, RequestDeferrals, new_deferrals_var
from ._drivers.base import Driver
from ._exceptions import ConcurrencyClosed, ConcurrencyError, ConfigurationError, DeferralRejected, TaskTimeout
from ._stats import Stats
from ._tasks import Batch, Outcome, Task, Tasks

__all__ = ["Concurrency", "DriverFactory"]

logger = logging.getLogger("starlette_concurrency")

DriverFactory = Callable[[Settings], Driver]

# Built-in drivers, imported only when chosen (the dask one needs an optional dependency).
_BUILTIN_DRIVERS: dict[str, str] = {
    "process": "starlette_concurrency._drivers.process:create",
    "fork": "starlette_concurrency._drivers.fork:create",
    "sync": "starlette_concurrency._drivers.sync:create",
    "dask": "starlette_concurrency._drivers.dask:create",
}


@dataclass(eq=False)
class _Running:
    """A deferred batch under way: what shutdown cancels and reports when the drain time runs out."""

    tasks: Sequence[Task]
    outcomes: list[Outcome | None]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class _Core:
    """State shared by a facade and the views `driver(name)` returns."""

    def __init__(self, settings: Settings, default: str | Driver) -> None:
        self.settings = settings
        self.factories: dict[str, DriverFactory | str] = dict(_BUILTIN_DRIVERS)
        self.drivers: dict[str, Driver] = {}
        self.views: dict[str, Concurrency] = {}
        self.started: set[str] = set()
        # Drivers being started, and the event their other callers wait on. Nothing outlives a start:
        # an anyio primitive belongs to the event loop that made it, and the facade may serve one
        # loop after another (each test, each TestClient without a lifespan).
        self.starting: dict[str, anyio.Event] = {}
        self.deferrals = new_deferrals_var()
        self.open_requests: set[RequestDeferrals] = set()
        self.running: set[_Running] = set()
        self.pending = 0  # deferred tasks accepted and not yet finished (or skipped)
        self.pending_lock = threading.Lock()  # defer() may be called from the threadpool
        self.drained: anyio.Event | None = None
        self.task_group: TaskGroup | None = None
        self.loop: tuple[EventLoopToken, int] | None = None  # the hosting event loop and its thread
        self.exit_stack: AsyncExitStack | None = None
        self.closed = False
        if isinstance(default, Driver):
            self.default = default.name
            self.factories[default.name] = lambda settings: default
            self.drivers[default.name] = default
        else:
            self.default = default
            self.driver(default)  # fail at construction on an unknown name or a missing dependency

    def driver(self, name: str) -> Driver:
        if self.closed:
            raise ConcurrencyClosed("this Concurrency has been closed")
        if name not in self.drivers:
            factory = self.factories.get(name)
            if factory is None:
                known = ", ".join(repr(known) for known in sorted(self.factories))
                raise ConfigurationError(f"unknown concurrency driver {name!r}; known drivers: {known}")
            if isinstance(factory, str):
                module, _, attribute = factory.partition(":")
                factory = getattr(importlib.import_module(module), attribute)
            self.drivers[name] = factory(self.settings)
        return self.drivers[name]

    async def started_driver(self, name: str) -> Driver:
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

    # Deferred work -------------------------------------------------------------------------------

    def reserve(self, count: int) -> None:
        limit = self.settings.max_pending_deferred
        with self.pending_lock:
            if limit is not None and self.pending + count > limit:
                raise DeferralRejected(
                    f"defer() of {count} task(s) refused: {self.pending} deferred task(s) are already pending "
                    f"and max_pending_deferred is {limit}"
                )
            self.pending += count

    def settle(self, count: int) -> None:
        with self.pending_lock:
            self.pending -= count
            drained = self.pending == 0
        if drained and self.drained is not None:
            self.drained.set()

    def launch(self, driver: str, tasks: list[Task]) -> None:
        assert self.task_group is not None
        assert self.loop is not None
        token, thread = self.loop
        if threading.get_ident() != thread:  # defer() from a worker thread (a sync function in the threadpool)
            anyio.from_thread.run_sync(self.launch, driver, tasks, token=token)
            return
        self.task_group.start_soon(self.run_deferred, driver, tasks, name=f"deferred batch of {len(tasks)}")

    async def run_deferred(self, driver_name: str, tasks: list[Task]) -> None:
        """Run one deferred batch, log how it went, and never raise."""
        running = _Running(tasks, [None] * len(tasks))
        self.running.add(running)
        try:
            with running.scope:
                driver = await self.started_driver(driver_name)
                with anyio.move_on_after(self.settings.timeout or math.inf) as timeout:
                    await driver.execute(tasks, running.outcomes)
                if timeout.cancelled_caught:
                    for task, outcome in zip(tasks, running.outcomes, strict=True):
                        if outcome is None:
                            logger.error(
                                "deferred %s timed out after %s s and was stopped", task.label, self.settings.timeout
                            )
        except Exception as exc:  # the batch could not run at all: pickling, a closed pool...
            for task, outcome in zip(tasks, running.outcomes, strict=True):
                if outcome is None:
                    logger.error("deferred %s could not run", task.label, exc_info=exc)
        finally:
            self.running.discard(running)
            for task, outcome in zip(tasks, running.outcomes, strict=True):
                if outcome is not None and outcome.error is not None:
                    logger.error("deferred %s failed", task.label, exc_info=outcome.error)
            self.settle(len(tasks))

    async def flush(self, deferrals: RequestDeferrals, succeeded: bool) -> None:
        """Start what a finished request deferred: everything if it succeeded, `always` ones otherwise."""
        self.open_requests.discard(deferrals)
        chosen: dict[str, list[Task]] = {}
        skipped = 0
        for entry in deferrals.entries:
            if succeeded or entry.always:
                chosen.setdefault(entry.driver, []).extend(entry.tasks)
            else:
                skipped += len(entry.tasks)
        if skipped:
            self.settle(skipped)
        if self.task_group is not None:
            for driver, tasks in chosen.items():
                self.launch(driver, tasks)
            return
        # No lifespan is hosting the facade (an app served without one, a TestClient outside
        # `with`): run the batch here, after the response was sent, as Starlette's BackgroundTasks do.
        async with anyio.create_task_group() as tg:
            for driver, tasks in chosen.items():
                tg.start_soon(self.run_deferred, driver, tasks)

    async def drain(self) -> None:
        """Wait for deferred work up to the drain timeout; then stop it and log what was abandoned."""
        if self.pending:
            self.drained = anyio.Event()
            with anyio.move_on_after(self.settings.drain_timeout):
                await self.drained.wait()
            self.drained = None
        for running in list(self.running):
            for task, outcome in zip(running.tasks, running.outcomes, strict=True):
                if outcome is None:
                    logger.error(
                        "deferred %s abandoned: still running after the %s s drain timeout",
                        task.label,
                        self.settings.drain_timeout,
                    )
            running.scope.cancel()
        for deferrals in self.open_requests:
            for entry in deferrals.entries:
                for task in entry.tasks:
                    logger.error("deferred %s abandoned: its request had not finished at shutdown", task.label)

    async def aclose(self) -> None:
        if self.closed:
            return
        with anyio.CancelScope(shield=True):
            await self.drain()
            self.closed = True
            drivers = list(self.drivers.values())
            self.drivers.clear()
            self.started.clear()
            for driver in drivers:
                await driver.aclose()


class Concurrency:
    """Run closures at the same time in worker processes, now (`run`) or after the response (`defer`).

    Args:
        driver: a driver name (``"process"``, ``"fork"``, ``"sync"``, ``"dask"``, or one registered
            with `extend`) or a `Driver` instance. Default: ``CONCURRENCY_DRIVER``, else ``"process"``.
        workers: how many tasks run at once (worker processes, fork children, or the size of the
            dask driver's embedded cluster). Default: ``CONCURRENCY_WORKERS``, else the CPU count.
        timeout: default timeout of a `run()` call and of a deferred batch, in seconds. Default:
            ``CONCURRENCY_TIMEOUT``, else none.
        drain_timeout: how long shutdown waits for deferred work, in seconds (then it is stopped and
            logged as abandoned). Default: ``CONCURRENCY_DRAIN_TIMEOUT``, else 30.
        max_pending_deferred: how many deferred tasks may be pending at once; past it `defer()`
            raises `DeferralRejected`. Default: no bound.
        max_tasks_per_worker: `process`: replace a worker after it ran this many tasks.
        idle_timeout: `process`: seconds after which an idle worker exits (restarted on demand).
        max_worker_memory: `process`: bytes of resident memory past which a worker is replaced.
        initializer: `process`: a zero-argument callable each worker runs once at start-up.
        preload: `process`: modules each worker imports at start-up.
        dask_address: `dask`: the scheduler address. Default: ``CONCURRENCY_DASK_ADDRESS``, else an
            embedded LocalCluster.
        env_file: a `.env` file to read ``CONCURRENCY_*`` settings from (real environment variables
            take precedence). Ignored when missing.

    Raises:
        ConfigurationError: an unknown driver, an invalid option or ``CONCURRENCY_*`` variable.

    Use it as an async context manager, or register `ConcurrencyMiddleware`, which does that in the
    app's lifespan. Without either, the pool starts on first use. A closed `Concurrency` starts
    again when entered again (each app lifespan, each `TestClient` block).
    """

    _core: _Core
    _name: str

    def __init__(
        self,
        driver: str | Driver | None = None,
        *,
        workers: int | None = None,
        timeout: float | None = None,
        drain_timeout: float | None = None,
        max_pending_deferred: int | None = None,
        max_tasks_per_worker: int | None = None,
        idle_timeout: float | None = None,
        max_worker_memory: int | None = None,
        initializer: Callable[[], object] | None = None,
        preload: Sequence[str] = (),
        dask_address: str | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
    ) -> None:
        if driver is not None and not isinstance(driver, str | Driver):
            raise ConfigurationError(f"driver must be a driver name or a Driver instance, not {type(driver).__name__}")
        settings = Settings.resolve(
            env_file,
            driver=driver if isinstance(driver, str) else None,
            workers=workers,
            timeout=timeout,
            drain_timeout=drain_timeout,
            max_pending_deferred=max_pending_deferred,
            max_tasks_per_worker=max_tasks_per_worker,
            idle_timeout=idle_timeout,
            max_worker_memory=max_worker_memory,
            initializer=initializer,
            preload=preload,
            dask_address=dask_address,
        )
        self._core = _Core(settings, driver if isinstance(driver, Driver) else settings.driver)
        self._name = self._core.default
        self._core.views[self._name] = self

    @property
    def settings(self) -> Settings:
        """The resolved configuration."""
        return self._core.settings

    @property
    def driver_name(self) -> str:
        """The name of the driver this facade runs tasks on."""
        return self._name

    def driver(self, name: str) -> Concurrency:
        """Return the same facade bound to another driver: ``concurrency.driver("fork").run(...)``.

        The view shares configuration, lifecycle and deferred work with this facade; drivers are
        created once and cached.

        Raises:
            ConfigurationError: `name` is not a known driver.
        """
        core = self._core
        if name not in core.views:
            core.driver(name)
            view = object.__new__(Concurrency)
            view._core, view._name = core, name
            core.views[name] = view
        return core.views[name]

    def extend(self, name: str, factory: DriverFactory) -> None:
        """Register a custom driver: `factory` receives the `Settings` and returns a `Driver`.

        Raises:
            ConfigurationError: a driver of that name is already in use.
        """
        if name in self._core.drivers:
            raise ConfigurationError(f"driver {name!r} is already in use and cannot be replaced")
        if not callable(factory):
            raise ConfigurationError(f"the factory of driver {name!r} must be callable")
        self._core.factories[name] = factory

    @overload
    async def run(
        self,
        tasks: Mapping[Any, Callable[[], Any]],
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> dict[Any, Any]: ...

    @overload
    async def run(
        self, tasks: Callable[[], Any], *, timeout: float | None = None, return_exceptions: bool = False
    ) -> Any: ...

    @overload
    async def run(
        self,
        tasks: Iterable[Callable[[], Any]],
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]: ...

    async def run(self, tasks: Tasks, *, timeout: float | None = None, return_exceptions: bool = False) -> Any:
        """Run the tasks at the same time and return their results.

        Args:
            tasks: a zero-argument callable (returns its result), a sequence of them (returns a
                list, in input order) or a mapping of key → callable (returns a dict, same keys and
                order). Coroutine functions are awaited where the task runs.
            timeout: seconds for the whole call; default: the facade's timeout.
            return_exceptions: put each failed task's exception in the results instead of raising.

        Raises:
            TypeError: `tasks` is not a callable, a sequence or a mapping of callables.
            ValueError: `timeout` is not a positive number.
            TaskTimeout: the call did not finish in time; its unfinished tasks were stopped.
            SerializationError: a task cannot be sent to a worker; nothing ran.
            ConcurrencyClosed: the facade was closed.
            Exception: the exception of the first failed task (by input position), as its own
                type, with the worker's traceback as ``__cause__``, a note naming the task, and
                notes summarising the other failures.
        """
        batch = Batch.of(tasks)
        if timeout is not None:
            try:
                timeout = positive("timeout", timeout, float)
            except ConfigurationError as exc:
                raise ValueError(str(exc)) from None
        timeout = timeout or self._core.settings.timeout
        outcomes: list[Outcome | None] = [None] * len(batch.tasks)
        if batch.tasks:
            driver = await self._core.started_driver(self._name)
            with anyio.move_on_after(timeout or math.inf):
                await driver.execute(batch.tasks, outcomes)
        unfinished = [task.label for task, outcome in zip(batch.tasks, outcomes, strict=True) if outcome is None]
        if unfinished:
            raise TaskTimeout(
                f"run() did not finish within {timeout} s; stopped {len(unfinished)} unfinished "
                f"task(s): {', '.join(unfinished[:10])}{', ...' if len(unfinished) > 10 else ''}"
            )
        return batch.results(
            [outcome for outcome in outcomes if outcome is not None], return_exceptions=return_exceptions
        )

    def defer(self, tasks: Tasks, *, always: bool = False) -> None:
        """Run the tasks after the response has been sent; return at once.

        Inside a request handled by `ConcurrencyMiddleware` the tasks join that request's batch,
        which starts (all its tasks at the same time) once the final response body has been sent,
        and only if the status is below 400 unless `always` is true. Outside a request the tasks
        start right away in the background. Failures are logged on the ``starlette_concurrency``
        logger with the task's key and traceback; they never reach the client, and one failing
        task does not stop the others. Deferred work is not durable: it is lost if the server
        crashes. At shutdown it is drained (see `drain_timeout`).

        Raises:
            TypeError: `tasks` is not a callable, a sequence or a mapping of callables.
            DeferralRejected: more than `max_pending_deferred` deferred tasks would be pending.
            ConcurrencyClosed: the facade was closed.
            ConcurrencyError: called outside a request while the facade is not started.
        """
        batch = Batch.of(tasks)
        core = self._core
        if core.closed:
            raise ConcurrencyClosed("defer() on a closed Concurrency")
        core.driver(self._name)
        if not batch.tasks:
            return
        deferrals = core.deferrals.get()
        if deferrals is None and core.task_group is None:
            raise ConcurrencyError(
                "defer() outside a request needs a started Concurrency: use `async with concurrency:` "
                "or register ConcurrencyMiddleware, whose lifespan starts it"
            )
        core.reserve(len(batch.tasks))
        if deferrals is not None:
            deferrals.entries.append(Deferred(self._name, batch.tasks, always))
        else:
            core.launch(self._name, batch.tasks)

    async def __aenter__(self) -> Concurrency:
        """Start the default driver (its worker pool) and open the task group that runs deferred work."""
        core = self._core
        if core.exit_stack is not None:
            raise ConcurrencyError("this Concurrency is already started")
        core.closed = False
        stack = AsyncExitStack()
        core.task_group = await stack.enter_async_context(anyio.create_task_group())
        core.loop = (anyio.lowlevel.current_token(), threading.get_ident())
        core.exit_stack = stack
        try:
            await core.started_driver(core.default)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Drain deferred work and close the drivers (see `aclose`)."""
        core = self._core
        await core.aclose()
        stack, core.exit_stack = core.exit_stack, None
        core.task_group = core.loop = None
        if stack is not None:
            await stack.aclose()

    async def aclose(self) -> None:
        """Drain deferred work (up to `drain_timeout`), then stop every driver's workers.

        Idempotent. Afterwards `run()` and `defer()` raise `ConcurrencyClosed`, until the facade is
        entered again.
        """
        await self._core.aclose()

    def __repr__(self) -> str:
        return f"<Concurrency driver={self._name!r} workers={self._core.settings.workers}>"

    def stats(self) -> Stats:
        """Return a snapshot of this facade's driver: workers, queue, deferred work and task counters.

        Cheap (no I/O, no await), safe from any thread and at any time, also before start and
        after close (then the driver's figures are zero). ``deferred_pending`` is the facade's count
        of deferred tasks accepted and not finished, on all of its drivers. For another driver:
        ``concurrency.driver("fork").stats()``.

        Returns:
            A frozen `Stats`.
        """
        driver = self._core.drivers.get(self._name)
        stats = driver.stats() if driver is not None else Stats(driver=self._name)
        return dataclasses.replace(stats, deferred_pending=self._core.pending)
