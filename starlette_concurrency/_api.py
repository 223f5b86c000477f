"""The `Concurrency` facade: `run` / `run_blocking` / `defer`, `driver` / `extend`, and the lifecycle."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, Unpack, overload

import anyio
import anyio.to_thread

from ._as_completed import AsCompleted
from ._checks import positive
from ._config import Settings, options_list
from ._core import Core, DriverFactory
from ._deferred import Deferred, RequestBatch
from ._disconnect import watched
from ._drivers.base import Driver
from ._exceptions import ConfigurationError, DriverError, TaskTimeout
from ._host import refuse_in_event_loop
from ._lifecycle import Lifecycle
from ._options import DeprecatedKeywords, DriverOptions, with_deprecated_keywords
from ._pickling import dumps_task
from ._stats import Stats
from ._tasks import Batch, Outcome, Tasks

__all__ = ["Concurrency", "DriverFactory"]

T = TypeVar("T")
K = TypeVar("K")


class Concurrency(Lifecycle):
    """Run closures at the same time in worker processes, now (`run`) or after the response (`defer`).

    Args:
        driver: a driver name (``"process"``, ``"fork"``, ``"sync"``, ``"dask"``, or one registered
            with `extend`) or a `Driver` instance. Default: ``CONCURRENCY_DRIVER``, else ``"process"``.
        workers: how many tasks run at once (worker processes, fork children, or the size of the
            dask driver's embedded cluster). Default: ``CONCURRENCY_WORKERS``, else the CPUs this process
            may use (affinity mask and cgroup quota).
        timeout: default timeout of a `run()` call and of a deferred batch, in seconds. Default:
            ``CONCURRENCY_TIMEOUT``, else none.
        drain_timeout: how long shutdown waits for deferred work, in seconds (then it is stopped and
            logged as abandoned by name). Keep it below the server's graceful timeout (gunicorn's
            ``--graceful-timeout``, Kubernetes' ``terminationGracePeriodSeconds``). Default:
            ``CONCURRENCY_DRAIN_TIMEOUT``, else the default of `Settings.drain_timeout`.
        max_pending_deferred: how many deferred tasks may be pending at once; past it `defer()`
            raises `DeferralRejected`. Default: no bound.
        options: a driver's options object, or a list of them (one per driver): `ProcessOptions`
            (worker recycling, idle timeout, memory ceiling, initializer, preload), `DaskOptions` (the
            scheduler address and TLS), or a custom driver's `DriverOptions`. Each is checked when it
            is made; the facade hands them to the drivers' factories in `Settings.options`.
            (Release 1's keywords, ``max_tasks_per_worker=`` ... ``dask_address=``, still work, with
            a `DeprecationWarning`.)
        env_file: a `.env` file to read ``CONCURRENCY_*`` settings from (real environment variables
            take precedence). A missing default ``.env`` is ignored; a missing file given explicitly
            warns.

    Raises:
        ConfigurationError: an unknown driver, an invalid option or ``CONCURRENCY_*`` variable.

    Use it as an async context manager (or ``with`` from sync code), or register
    `ConcurrencyMiddleware`, which does that in the app's lifespan. Without either, the pool starts
    on first use, in a loop thread the facade owns, and stops at interpreter exit. Lifespans are
    counted: when the last one ends the facade drains, stops its workers and goes back to its
    not-started state. One facade serves any number of threads and event loops.
    """

    _core: Core
    _name: str

    def __init__(
        self,
        driver: str | Driver | None = None,
        *,
        workers: int | None = None,
        timeout: float | None = None,
        drain_timeout: float | None = None,
        max_pending_deferred: int | None = None,
        options: DriverOptions | Iterable[DriverOptions] | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
        **deprecated: Unpack[DeprecatedKeywords],
    ) -> None:
        if driver is not None and not isinstance(driver, str | Driver):
            raise ConfigurationError(f"driver must be a driver name or a Driver instance, not {type(driver).__name__}")
        settings = Settings.resolve(
            env_file,
            with_deprecated_keywords(options_list(options), dict(deprecated)),
            driver=driver if isinstance(driver, str) else None,
            workers=workers,
            timeout=timeout,
            drain_timeout=drain_timeout,
            max_pending_deferred=max_pending_deferred,
        )
        self._core = Core(settings, driver if isinstance(driver, Driver) else settings.driver)
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
            fresh = object.__new__(Concurrency)
            fresh._core, fresh._name = core, name
            core.views[name] = fresh
        view = core.views[name]
        assert isinstance(view, Concurrency)
        return view

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

    # Typed by shape: a callable returning (or awaiting to) T gives T, a sequence of them list[T], a
    # mapping K -> them dict[K, T]. A Mapping is also an Iterable: the mapping overloads come first.
    @overload
    async def run(  # type: ignore[overload-overlap]
        self,
        tasks: Mapping[K, Callable[[], Awaitable[T]]],
        *,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> dict[K, T]: ...
    @overload
    async def run(  # type: ignore[overload-overlap]
        self,
        tasks: Mapping[K, Callable[[], T]],
        *,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> dict[K, T]: ...
    @overload
    async def run(
        self, tasks: Callable[[], Awaitable[T]], *, timeout: float | None = ..., return_exceptions: Literal[False] = ...
    ) -> T: ...
    @overload
    async def run(
        self, tasks: Callable[[], T], *, timeout: float | None = ..., return_exceptions: Literal[False] = ...
    ) -> T: ...
    @overload
    async def run(  # type: ignore[overload-overlap]
        self,
        tasks: Iterable[Callable[[], Awaitable[T]]],
        *,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> list[T]: ...
    @overload
    async def run(  # type: ignore[overload-overlap]
        self, tasks: Iterable[Callable[[], T]], *, timeout: float | None = ..., return_exceptions: Literal[False] = ...
    ) -> list[T]: ...
    @overload
    async def run(  # type: ignore[overload-overlap]
        self, tasks: Mapping[K, Callable[[], Awaitable[T]]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> dict[K, T | BaseException]: ...
    @overload
    async def run(  # type: ignore[overload-overlap]
        self, tasks: Mapping[K, Callable[[], T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> dict[K, T | BaseException]: ...
    @overload
    async def run(
        self, tasks: Callable[[], Awaitable[T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> T | BaseException: ...
    @overload
    async def run(
        self, tasks: Callable[[], T], *, timeout: float | None = ..., return_exceptions: bool
    ) -> T | BaseException: ...
    @overload
    async def run(
        self, tasks: Iterable[Callable[[], Awaitable[T]]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> list[T | BaseException]: ...
    @overload
    async def run(
        self, tasks: Iterable[Callable[[], T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> list[T | BaseException]: ...
    @overload
    async def run(  # type: ignore[overload-overlap]
        self, tasks: Mapping[Any, object], *, timeout: float | None = ..., return_exceptions: bool = ...
    ) -> dict[Any, Any]: ...
    @overload
    async def run(
        self, tasks: Iterable[object], *, timeout: float | None = ..., return_exceptions: bool = ...
    ) -> list[Any]: ...

    async def run(self, tasks: object, *, timeout: float | None = None, return_exceptions: bool = False) -> Any:
        """Run the tasks at the same time and return their results.

        Callable from any event loop or thread: the call is forwarded to the loop that owns the
        pool when it is not this one. Inside a request handled by `ConcurrencyMiddleware`, the
        client going away stops the call (see `ClientDisconnected`).

        Args:
            tasks: a zero-argument callable (returns its result), a sequence of them (returns a
                list, in input order) or a mapping of key → callable (returns a dict, same keys and
                order). Coroutine functions are awaited where the task runs.
            timeout: seconds for the whole call; default: the facade's timeout.
            return_exceptions: put each failed task's exception in the results instead of raising.

        Returns:
            The result, or a list or dict of results shaped like `tasks`.

        Raises:
            TypeError: `tasks` is not a callable, a sequence or a mapping of callables.
            ValueError: `timeout` is not a positive number.
            TaskTimeout: the call did not finish in time; its unfinished tasks were stopped.
            SerializationError: a task cannot be sent to a worker; nothing ran.
            ClientDisconnected: the request's client went away; the call's tasks were stopped.
            DriverError: the driver left a task without an outcome.
            ConcurrencyClosed: the facade was closed by `aclose()` / `close()`.
            Exception: the exception of the first failed task (by input position), as its own
                type, with the worker's traceback as ``__cause__``, a note naming the task, and
                notes summarising the other failures.
        """
        batch = Batch.of(tasks)
        timeout = self._timeout(timeout)
        if not batch.tasks:
            return batch.results([], return_exceptions=return_exceptions)
        call = functools.partial(self._execute, batch, timeout)
        request = self._core.work.current.get()
        watch = request.disconnect if request is not None else None
        if watch is not None and watch.applies():
            outcomes = await watched(functools.partial(self._dispatch, call), watch)
        else:
            outcomes = await self._dispatch(call)
        return batch.results(outcomes, return_exceptions=return_exceptions)

    async def _dispatch(self, call: Callable[[], Awaitable[list[Outcome]]]) -> list[Outcome]:
        core = self._core
        core.check_closed("run()")
        host = core.live_host()
        if host is None:
            # Starting the facade's own loop takes a thread start, not a pool start: done here, on
            # the caller's thread (the main thread under most servers, where signal handlers live).
            host = core.ensure_host()
        if host.here():
            return await call()
        return await host.portal.call_async(call)

    async def _execute(self, batch: Batch, timeout: float | None) -> list[Outcome]:
        """Run a batch on the host loop: start the driver, apply the timeout, check every outcome."""
        driver = await self._core.started_driver(self._name)
        outcomes: list[Outcome | None] = [None] * len(batch.tasks)
        timed_out = False
        if timeout is None:  # no cancel scope to enter and leave: a few microseconds of every call
            await driver.execute(batch.tasks, outcomes)
        else:
            with anyio.move_on_after(timeout) as scope:
                await driver.execute(batch.tasks, outcomes)
            timed_out = scope.cancelled_caught
        missing = [task.label for task, outcome in zip(batch.tasks, outcomes, strict=True) if outcome is None]
        if missing:
            listed = f"{', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}"
            if timed_out:
                raise TaskTimeout(
                    f"run() did not finish within {timeout} s; stopped {len(missing)} unfinished task(s): {listed}. "
                    "Raise the timeout, or split the work"
                )
            raise DriverError(
                f"driver {driver.name!r} returned from execute() without an outcome for {listed}: a driver must "
                "store an Outcome for every task (see Driver.execute); fix the driver"
            )
        return [outcome for outcome in outcomes if outcome is not None]

    def _timeout(self, timeout: float | None) -> float | None:
        if timeout is not None:
            try:
                timeout = positive("timeout", timeout, float)
            except ConfigurationError as exc:
                raise ValueError(str(exc)) from None
        return timeout or self._core.settings.timeout

    @overload
    def run_blocking(  # type: ignore[overload-overlap]
        self,
        tasks: Mapping[K, Callable[[], Awaitable[T]]],
        *,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> dict[K, T]: ...
    @overload
    def run_blocking(  # type: ignore[overload-overlap]
        self,
        tasks: Mapping[K, Callable[[], T]],
        *,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> dict[K, T]: ...
    @overload
    def run_blocking(
        self, tasks: Callable[[], Awaitable[T]], *, timeout: float | None = ..., return_exceptions: Literal[False] = ...
    ) -> T: ...
    @overload
    def run_blocking(
        self, tasks: Callable[[], T], *, timeout: float | None = ..., return_exceptions: Literal[False] = ...
    ) -> T: ...
    @overload
    def run_blocking(  # type: ignore[overload-overlap]
        self,
        tasks: Iterable[Callable[[], Awaitable[T]]],
        *,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> list[T]: ...
    @overload
    def run_blocking(  # type: ignore[overload-overlap]
        self, tasks: Iterable[Callable[[], T]], *, timeout: float | None = ..., return_exceptions: Literal[False] = ...
    ) -> list[T]: ...
    @overload
    def run_blocking(  # type: ignore[overload-overlap]
        self, tasks: Mapping[K, Callable[[], Awaitable[T]]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> dict[K, T | BaseException]: ...
    @overload
    def run_blocking(  # type: ignore[overload-overlap]
        self, tasks: Mapping[K, Callable[[], T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> dict[K, T | BaseException]: ...
    @overload
    def run_blocking(
        self, tasks: Callable[[], Awaitable[T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> T | BaseException: ...
    @overload
    def run_blocking(
        self, tasks: Callable[[], T], *, timeout: float | None = ..., return_exceptions: bool
    ) -> T | BaseException: ...
    @overload
    def run_blocking(
        self, tasks: Iterable[Callable[[], Awaitable[T]]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> list[T | BaseException]: ...
    @overload
    def run_blocking(
        self, tasks: Iterable[Callable[[], T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> list[T | BaseException]: ...
    @overload
    def run_blocking(  # type: ignore[overload-overlap]
        self, tasks: Mapping[Any, object], *, timeout: float | None = ..., return_exceptions: bool = ...
    ) -> dict[Any, Any]: ...
    @overload
    def run_blocking(
        self, tasks: Iterable[object], *, timeout: float | None = ..., return_exceptions: bool = ...
    ) -> list[Any]: ...

    def run_blocking(self, tasks: object, *, timeout: float | None = None, return_exceptions: bool = False) -> Any:
        """Run the tasks at the same time and return their results, from sync code (any thread).

        Exactly `run()`'s semantics; the call runs on the loop that owns the pool. A
        `KeyboardInterrupt` (or any exception) in the waiting thread stops the call's tasks.

        Returns:
            The result, or a list or dict of results shaped like `tasks`.

        Raises:
            WrongContext: called on a thread that runs an event loop; use ``await run()`` there.
            Exception: as `run()`.
        """
        batch = Batch.of(tasks)
        timeout = self._timeout(timeout)
        refuse_in_event_loop("run_blocking()", "await concurrency.run(...)")
        if not batch.tasks:
            return batch.results([], return_exceptions=return_exceptions)
        host = self._core.ensure_host()
        future = host.portal.start_task_soon(self._execute, batch, timeout)
        try:
            outcomes = future.result()
        except BaseException:
            future.cancel()  # stops the call's tasks on the host loop
            raise
        return batch.results(outcomes, return_exceptions=return_exceptions)

    # Typed as run(): by shape, with the key of a mapping, or int (an index) for a sequence or one callable.
    @overload
    def as_completed(  # type: ignore[overload-overlap]
        self,
        tasks: Mapping[K, Callable[[], Awaitable[T]]],
        *,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> AsCompleted[K, T]: ...
    @overload
    def as_completed(  # type: ignore[overload-overlap]
        self,
        tasks: Mapping[K, Callable[[], T]],
        *,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> AsCompleted[K, T]: ...
    @overload
    def as_completed(
        self, tasks: Callable[[], Awaitable[T]], *, timeout: float | None = ..., return_exceptions: Literal[False] = ...
    ) -> AsCompleted[int, T]: ...
    @overload
    def as_completed(
        self, tasks: Callable[[], T], *, timeout: float | None = ..., return_exceptions: Literal[False] = ...
    ) -> AsCompleted[int, T]: ...
    @overload
    def as_completed(
        self,
        tasks: Iterable[Callable[[], Awaitable[T]]],
        *,
        timeout: float | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> AsCompleted[int, T]: ...
    @overload
    def as_completed(
        self, tasks: Iterable[Callable[[], T]], *, timeout: float | None = ..., return_exceptions: Literal[False] = ...
    ) -> AsCompleted[int, T]: ...
    @overload
    def as_completed(  # type: ignore[overload-overlap]
        self, tasks: Mapping[K, Callable[[], Awaitable[T]]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> AsCompleted[K, T | BaseException]: ...
    @overload
    def as_completed(  # type: ignore[overload-overlap]
        self, tasks: Mapping[K, Callable[[], T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> AsCompleted[K, T | BaseException]: ...
    @overload
    def as_completed(
        self, tasks: Callable[[], Awaitable[T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> AsCompleted[int, T | BaseException]: ...
    @overload
    def as_completed(
        self, tasks: Callable[[], T], *, timeout: float | None = ..., return_exceptions: bool
    ) -> AsCompleted[int, T | BaseException]: ...
    @overload
    def as_completed(
        self, tasks: Iterable[Callable[[], Awaitable[T]]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> AsCompleted[int, T | BaseException]: ...
    @overload
    def as_completed(
        self, tasks: Iterable[Callable[[], T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> AsCompleted[int, T | BaseException]: ...

    def as_completed(
        self, tasks: object, *, timeout: float | None = None, return_exceptions: bool = False
    ) -> AsCompleted[Any, Any]:
        """Run the tasks at the same time and give each result as soon as its task finishes.

        ``async for key, result in concurrency.as_completed(tasks):`` — `key` is the task's index in a
        sequence (0 for a single callable) or its key in a mapping. The tasks run as in `run()`: the
        same drivers, pickling, timeout and cancellation; nothing starts until the first iteration.
        Callable from any event loop or thread, like `run()`.

        Leaving the loop early (``break``, an exception, a cancellation) stops the tasks that have not
        finished; ``async with concurrency.as_completed(tasks) as results:`` (or ``await
        results.aclose()``) also waits until they have stopped.

        Args:
            tasks: a zero-argument callable, a sequence of them or a mapping of key → callable.
            timeout: seconds for all the tasks, from the first iteration; default: the facade's timeout.
                Results that came in time are given first, then `TaskTimeout` is raised.
            return_exceptions: give a failed task's exception as its result instead of raising it.

        Returns:
            An async iterator of ``(key, result)`` pairs, in the order the tasks finish.

        Raises:
            TypeError: `tasks` is not a callable, a sequence or a mapping of callables (at the call).
            ValueError: `timeout` is not a positive number (at the call).
            TaskTimeout: the tasks did not all finish in time; the unfinished ones were stopped.
            SerializationError: a task cannot be sent to a worker; nothing ran (first iteration).
            ConcurrencyClosed: the facade was closed.
            Exception: a task's exception, when the loop reaches it (its own type, the worker's
                traceback as ``__cause__``, a note naming the task); the other tasks are stopped.
        """
        batch = Batch.of(tasks)
        return AsCompleted(self._core, self._name, batch, self._timeout(timeout), return_exceptions)

    def defer(self, tasks: Tasks, *, always: bool = False) -> None:
        """Run the tasks after the response has been sent; return at once. Callable from any thread.

        Inside a request handled by `ConcurrencyMiddleware` or `ConcurrencyWSGIMiddleware` the tasks
        join that request's batch, which starts (all its tasks at the same time) once the response
        has been sent, and only if the status is below 400 unless `always` is true. Outside a
        request the tasks start right away in the background. Failures are logged on the
        ``starlette_concurrency`` logger with the task's key and traceback; they never reach the
        client, and one failing task does not stop the others. Deferred work is not durable: it is
        lost if the server crashes. At shutdown it is drained (see `drain_timeout`).

        Raises:
            TypeError: `tasks` is not a callable, a sequence or a mapping of callables.
            SerializationError: a task cannot be pickled for this driver; nothing of this call was
                accepted (the request's other deferrals are kept).
            DeferralRejected: more than `max_pending_deferred` deferred tasks would be pending.
            ConcurrencyClosed: the facade was closed, or is shutting down.
        """
        batch = Batch.of(tasks)
        core = self._core
        core.check_closed("defer()")
        driver = core.driver(self._name)
        if not batch.tasks:
            return
        if driver.pickles:
            # A closure that cannot travel fails here, where the handler can react, not after the response
            # (where it would be logged, and the client told all went well).
            for task in batch.tasks:
                dumps_task(task)
        request = core.work.current.get()
        core.work.reserve(len(batch.tasks))
        if request is not None:
            request.add(Deferred(self._name, batch.tasks, always))
        else:
            core.work.launch(self._name, batch.tasks, None)

    def request_batch(self, *, method: str | None = None, path: str | None = None) -> RequestBatch:
        """Open a batch that collects what `defer()` is given while it is active — for integrations.

        Both middlewares use it; so can any other framework: ``token = batch.activate()`` around
        the request's code, ``batch.deactivate(token)``, then ``batch.finish(succeeded)`` once the
        response has been sent.

        Args:
            method: the request's method, for the logs of its deferred tasks.
            path: the request's path, for the logs of its deferred tasks.

        Returns:
            The open batch.
        """
        return RequestBatch(self._core.work, method, path)

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
