"""The `Concurrency` facade: `run` / `run_blocking` / `defer`, `driver` / `extend`, and the lifecycle."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, Unpack, overload

import anyio

from . import _tracing as tracing
from ._as_completed import AsCompleted
from ._checks import MAX_SECONDS, positive, quote
from ._config import Settings, options_list
from ._context import Carrier
from ._deferred import Deferred, RequestBatch, Terms
from ._disconnect import watched
from ._drivers.base import Driver
from ._exceptions import ConfigurationError, DeferralRejected, DriverError, TaskTimeout
from ._host import refuse_in_event_loop
from ._options import DeprecatedKeywords, DriverOptions, with_deprecated_keywords
from ._runtime import DriverFactory, Runtime
from ._stats import Stats
from ._tasks import Batch, Outcome, Tasks

__all__ = ["Concurrency", "DriverFactory"]

logger = logging.getLogger("starlette_concurrency")

T = TypeVar("T")
K = TypeVar("K")


class Concurrency:
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
        journal: an SQLite file to make deferred work durable: each batch is written there before it
            starts and removed as it finishes, and what a crash left is replayed (at least once) when a
            facade next starts on the file. Needs a driver that pickles tasks (``process``, ``dask``).
            Default: ``CONCURRENCY_JOURNAL``, else none (a crash loses deferred work not yet run).
        options: a driver's options object, or a list of them (one per driver): `ProcessOptions`
            (worker recycling, idle timeout, memory ceiling, initializer, preload), `DaskOptions` (the
            scheduler address and TLS), or a custom driver's `DriverOptions`. Each is checked when it
            is made; the facade hands them to the drivers' factories in `Settings.options`.
            (The deprecated keywords, ``max_tasks_per_worker=`` ... ``dask_address=``, still work, with
            a `DeprecationWarning`.)
        env_file: a `.env` file to read ``CONCURRENCY_*`` settings from (real environment variables
            take precedence). A missing default ``.env`` is ignored; a missing file given explicitly
            warns.
        context: context variables (`contextvars.ContextVar`) whose values travel with the tasks: each
            `run()` and `defer()` takes the values they have in its caller, and the task runs with them
            set, on every driver (a request id, a tenant). For the `process` and `dask` drivers each must
            be a global of an importable module (workers import it to find it) and its value must pickle.

    Raises:
        ConfigurationError: an unknown driver, an invalid option or ``CONCURRENCY_*`` variable, or a
            journal that cannot be used (the message names the file and the remedy).
        TypeError: an entry of `context` is not a `ContextVar`.

    Use it as an async context manager (or ``with`` from sync code), or register
    `ConcurrencyMiddleware`, which does that in the app's lifespan. Without either, the pool starts
    on first use: on the loop of the first async caller on the main thread (a script's
    ``asyncio.run``, a server run without lifespan), for as long as that loop runs; else in a loop
    thread the facade owns. Such a host stops after a minute unused, and at interpreter exit.
    Lifespans are counted: when the last one ends the facade drains, stops its workers and goes
    back to its not-started state. One facade serves any number of threads and event loops.
    """

    _runtime: Runtime
    _name: str

    def __init__(
        self,
        driver: str | Driver | None = None,
        *,
        workers: int | None = None,
        timeout: float | None = None,
        drain_timeout: float | None = None,
        max_pending_deferred: int | None = None,
        journal: str | os.PathLike[str] | None = None,
        options: DriverOptions | Iterable[DriverOptions] | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
        context: Iterable[ContextVar[Any]] = (),
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
            journal=journal,
        )
        self._runtime = Runtime(settings, driver if isinstance(driver, Driver) else settings.driver)
        self._runtime.context = Carrier(context)
        self._name = self._runtime.default
        self._runtime.facades[self._name] = self

    @property
    def settings(self) -> Settings:
        """The resolved configuration."""
        return self._runtime.settings

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
        runtime = self._runtime
        if name not in runtime.facades:
            runtime.driver(name)
            fresh = object.__new__(Concurrency)
            fresh._runtime, fresh._name = runtime, name
            runtime.facades.setdefault(name, fresh)
        view = runtime.facades[name]
        assert isinstance(view, Concurrency)
        return view

    def driver_names(self) -> list[str]:
        """List the drivers this facade has handed out: its default first, then the others by name.

        Returns:
            The names `driver(name)` was called with (and the default), for metrics and health checks.
        """
        default = self._runtime.default
        return [default, *sorted(name for name in list(self._runtime.facades) if name != default)]

    def extend(self, name: str, factory: DriverFactory) -> None:
        """Register a custom driver: `factory` receives the `Settings` and returns a `Driver`.

        Raises:
            ConfigurationError: a driver of that name is already in use.
        """
        self._runtime.register(name, factory)

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
    async def run(  # type: ignore[overload-overlap]
        self, tasks: Iterable[Callable[[], Awaitable[T]]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> list[T | BaseException]: ...
    @overload
    async def run(  # type: ignore[overload-overlap]
        self, tasks: Iterable[Callable[[], T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> list[T | BaseException]: ...
    # Callables of different types (a partial beside a lambda) that mypy cannot unify into one `T`: the
    # results are `object`, so that a wrong annotation is still an error; a non-callable matches nothing.
    @overload
    async def run(  # type: ignore[overload-overlap]
        self, tasks: Mapping[K, Callable[[], object]], *, timeout: float | None = ..., return_exceptions: bool = ...
    ) -> dict[K, object]: ...
    @overload
    async def run(
        self, tasks: Iterable[Callable[[], object]], *, timeout: float | None = ..., return_exceptions: bool = ...
    ) -> list[object]: ...

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
        batch = self._accept(tasks)
        timeout = self._timeout(timeout)
        if not batch.tasks:
            return batch.results([], return_exceptions=return_exceptions)
        call = functools.partial(self._execute, batch, timeout)
        request = self._runtime.work.current.get()
        watch = request.disconnect if request is not None else None
        if watch is not None and watch.applies():
            outcomes = await watched(functools.partial(self._dispatch, call), watch)
        else:
            outcomes = await self._dispatch(call)
        return batch.results(outcomes, return_exceptions=return_exceptions)

    async def _dispatch(self, call: Callable[[], Awaitable[list[Outcome]]]) -> list[Outcome]:
        return await self._runtime.call(call, "run()")

    async def _execute(self, batch: Batch, timeout: float | None) -> list[Outcome]:
        """Run a batch on the host loop: start the driver, apply the timeout, check every outcome."""
        driver = await self._runtime.started_driver(self._name)
        outcomes: list[Outcome | None] = [None] * len(batch.tasks)
        timed_out = False
        try:
            if timeout is None:  # no cancel scope to enter and leave: a few microseconds of every call
                await driver.execute(batch.tasks, outcomes)
            else:
                with anyio.move_on_after(timeout) as scope:
                    await driver.execute(batch.tasks, outcomes)
                timed_out = scope.cancelled_caught
        finally:
            if batch.tasks and batch.tasks[0].trace is not None:
                tracing.end(batch.tasks, outcomes, "timed out" if timed_out else "cancelled")
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

    def _accept(self, tasks: object, kind: str = "run") -> Batch:
        """Check what a call was given; take along the context variables' values of its caller, its
        request's method and path (for the tasks' log records), and a span per task if one is active
        (`kind`: ``run`` or ``defer``, for the spans' names)."""
        batch = Batch.of(tasks)
        if not batch.tasks:
            return batch
        runtime = self._runtime
        carrier = runtime.context
        context = carrier.capture(pickles=runtime.driver(self._name).pickles) if carrier else ()
        request = runtime.work.current.get()
        origin = (request.method, request.path) if request is not None else None
        if context or origin is not None:
            batch = batch.carrying(context, origin)
        traced = tracing.start(batch.tasks, kind, self._name)
        return batch if traced is None else Batch(traced, batch.shape)

    def _timeout(self, timeout: float | None) -> float | None:
        if timeout is not None:
            try:
                timeout = positive("timeout", timeout, float)
            except ConfigurationError as exc:
                raise ValueError(str(exc)) from None
        return timeout or self._runtime.settings.timeout

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
    def run_blocking(  # type: ignore[overload-overlap]
        self, tasks: Iterable[Callable[[], Awaitable[T]]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> list[T | BaseException]: ...
    @overload
    def run_blocking(  # type: ignore[overload-overlap]
        self, tasks: Iterable[Callable[[], T]], *, timeout: float | None = ..., return_exceptions: bool
    ) -> list[T | BaseException]: ...
    # Callables of different types (a partial beside a lambda) that mypy cannot unify into one `T`: the
    # results are `object`, so that a wrong annotation is still an error; a non-callable matches nothing.
    @overload
    def run_blocking(  # type: ignore[overload-overlap]
        self, tasks: Mapping[K, Callable[[], object]], *, timeout: float | None = ..., return_exceptions: bool = ...
    ) -> dict[K, object]: ...
    @overload
    def run_blocking(
        self, tasks: Iterable[Callable[[], object]], *, timeout: float | None = ..., return_exceptions: bool = ...
    ) -> list[object]: ...

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
        batch = self._accept(tasks)
        timeout = self._timeout(timeout)
        refuse_in_event_loop("run_blocking()", "await concurrency.run(...)")
        if not batch.tasks:
            return batch.results([], return_exceptions=return_exceptions)
        outcomes = self._runtime.call_blocking(functools.partial(self._execute, batch, timeout), "run_blocking()")
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
        Callable from any event loop or thread, like `run()` (known gap: from a loop in another thread
        while a trio loop hosts the pool, the iteration hung in tests).

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
        batch = self._accept(tasks)
        return AsCompleted(self._runtime, self._name, batch, self._timeout(timeout), return_exceptions)

    def defer(
        self, tasks: Tasks, *, always: bool = False, key: str | None = None, retries: int = 0, backoff: float = 1.0
    ) -> None:
        """Run the tasks after the response has been sent; return at once. Callable from any thread.

        Inside a request handled by `ConcurrencyMiddleware` or `ConcurrencyWSGIMiddleware` the tasks
        join that request's batch, which starts (all its tasks at the same time) once the response
        has been sent, and only if the status is below 400 unless `always` is true. Outside a
        request the tasks start right away in the background. Failures are logged on the
        ``starlette_concurrency`` logger with the task's key and traceback; they never reach the
        client, and one failing task does not stop the others. Deferred work is durable only with a
        journal (``Concurrency(journal=...)``): otherwise it is lost if the server crashes. At shutdown
        it is drained (see `drain_timeout`).

        Args:
            tasks: a zero-argument callable, a sequence of them or a mapping of key → callable.
            always: run them even if the request fails (status 400 or above, or an exception).
            key: names the work of a single callable (``key=f"order-{order.id}"``): while a task of that
                key is pending (accepted and not finished, in this process, or in the journal of any
                process sharing it), `defer()` with the same key is a no-op. The journal shows it. The task
                reads it with `current_deferral()`.
            retries: how many times a task that raises runs again (each failure but the last is logged
                as a warning, the last as an error). A task must then be idempotent: see
                `current_deferral()` for its attempt. With a journal a retry waiting at a crash runs at
                the next start; without one it lives in memory, like the rest of deferred work.
            backoff: seconds before the first retry; each following one waits twice as long as the one
                before (1, 2, 4... by default).

        Raises:
            TypeError: `tasks` is not a callable, a sequence or a mapping of callables; `key` is not a
                string, or is given with more than one callable; `retries` is not an int or `backoff`
                not a number.
            ValueError: `retries` is negative, or `backoff` is negative, not finite or above a day.
            SerializationError: a task cannot be pickled for this driver; nothing of this call was
                accepted (the request's other deferrals are kept).
            DeferralRejected: more than `max_pending_deferred` deferred tasks would be pending, or the
                journal's last write failed (a full disk) and no write has succeeded since.
            ConcurrencyClosed: the facade was closed, or is shutting down.
        """
        batch = self._accept(tasks, "defer")
        runtime = self._runtime
        request = runtime.work.current.get()
        if request is None and not runtime.warned_unwrapped:
            self._warn_if_serving_a_request()
        unfinished = "refused"  # what the tasks' spans say if they end here
        try:
            if key is not None and (not isinstance(key, str) or batch.shape is not object):
                raise TypeError(
                    f"key must be a str naming one callable's work, got {type(key).__name__} with "
                    f"{len(batch.tasks)} task(s); defer each keyed task on its own"
                )
            terms = Terms(key, *_retry_terms(retries, backoff))
            with runtime.lock():
                runtime.accepting("defer()", in_request=request is not None)
            driver = runtime.driver(self._name)
            if not batch.tasks:
                return
            journal = runtime.journal
            if journal is not None and journal.failure is not None:
                raise DeferralRejected(
                    f"defer() of {len(batch.tasks)} task(s) refused: the journal {journal.path!r} could not be "
                    f"written ({journal.failure}); free disk space or fix the file (it is tried again every "
                    "second), and answer 503 or run the work inline meanwhile"
                )
            # Pickled (or checked) once, here: a closure that cannot travel fails where the handler can
            # react, not after the response (where it would be logged, and the client told all went well).
            prepared = driver.prepare(batch.tasks)
            # Checked and counted in one step with the state: a drain that has stopped accepting is not fed.
            with runtime.lock():
                runtime.accepting("defer()", in_request=request is not None)
                if key is not None and not runtime.work.hold_key(key):
                    unfinished = f"not run: a task of key {key!r} is pending"
                    tracing.end(batch.tasks, [None] * len(batch.tasks), unfinished)
                    return  # a task of this key is pending: this one would do the same work
                try:
                    runtime.work.reserve(len(prepared))
                except BaseException:
                    runtime.work.release_keys([key])
                    raise
                if request is None:  # never waits: hands over, or logs
                    runtime.work.launch(self._name, prepared, None, join=False, terms=[terms] * len(prepared))
        except BaseException:
            tracing.end(batch.tasks, [None] * len(batch.tasks), unfinished)
            raise
        if request is not None:
            request.add(Deferred(self._name, prepared, always, terms))

    def _warn_if_serving_a_request(self) -> None:
        """Warn once if `defer()` was called while an app serves a request without the middleware."""
        from ._middleware import request_being_served  # it imports this module

        served = request_being_served()
        if served is None:
            return
        self._runtime.warned_unwrapped = True
        logger.warning(
            "defer() was called while serving %s, but no ConcurrencyMiddleware (nor ConcurrencyWSGIMiddleware) "
            "with this facade wraps that request: its tasks start now, before the response is sent and even if "
            "the request fails. Wrap the app: app.add_middleware(ConcurrencyMiddleware, concurrency=concurrency). "
            "(Said once per facade.)",
            served,
            extra={"driver": self._name},
        )

    def request_batch(self, *, method: str | None = None, path: str | None = None) -> RequestBatch:
        """Open a batch that collects what `defer()` is given while it is active — for integrations.

        Both middlewares use it; so can any other framework: ``token = batch.activate()`` around
        the request's code, ``batch.deactivate(token)``, then ``batch.finish(succeeded)`` once the
        response has been sent. With a journal, call ``batch.commit(succeeded)`` just before the
        response's last part goes out, and wait for the event it returns (if any) first: a crash after
        the client has its response then loses none of the batch.

        Args:
            method: the request's method, for the logs of its deferred tasks.
            path: the request's path, for the logs of its deferred tasks.

        Returns:
            The open batch.
        """
        return RequestBatch(self._runtime.work, method, path)

    def __repr__(self) -> str:
        return f"<Concurrency driver={self._name!r} workers={self._runtime.settings.workers}>"

    def stats(self) -> Stats:
        """Return a snapshot of this facade's driver: workers, queue, deferred work and task counters.

        Cheap (no I/O, no await), safe from any thread and at any time, also before start and
        after close (then the driver's figures are zero). ``deferred_pending`` is the facade's count
        of deferred tasks accepted and not finished, on all of its drivers. For another driver:
        ``concurrency.driver("fork").stats()``.

        Returns:
            A frozen `Stats`.
        """
        driver = self._runtime.drivers.get(self._name)
        stats = driver.stats() if driver is not None else Stats(driver=self._name)
        work, journal = self._runtime.work, self._runtime.journal
        if journal is None:
            return dataclasses.replace(stats, deferred_pending=work.pending)
        return dataclasses.replace(
            stats,
            deferred_pending=work.pending,
            journal_pending=journal.pending,
            journal_dead=journal.dead_count,
            replayed=work.replayed,
        )

    # Lifecycle: each method says what it means; `Runtime` does it. ----------------------------------

    @property
    def shutting_down(self) -> bool:
        """Whether the process's shutdown has begun (a SIGTERM): middlewares answer new requests 503."""
        return self._runtime.exiting

    async def __aenter__(self) -> Self:
        """Host the facade on this loop (or join the lifespan that already does) and start its default driver.

        Raises:
            Exception: the driver failed to start (a worker initializer that raises...).
        """
        await self._runtime.enter(warm=True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Leave: the last one out drains deferred work and stops the workers (not started again)."""
        await self._runtime.leave()

    def __enter__(self) -> Self:
        """Start the facade from sync code: its own loop thread and the default driver's workers.

        Raises:
            WrongContext: called on a thread that runs an event loop; use ``async with``.
            Exception: the driver failed to start.
        """
        refuse_in_event_loop("`with concurrency:`", "async with concurrency:")
        self._runtime.enter_blocking()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Leave: the last one out drains deferred work and stops the workers (not started again)."""
        self._runtime.leave_blocking()

    async def aclose(self) -> None:
        """Drain deferred work (up to `drain_timeout`), then stop every driver's workers.

        Idempotent. Afterwards `run()` and `defer()` raise `ConcurrencyClosed`, until the facade is
        entered again.
        """
        await self._runtime.close()

    def close(self) -> None:
        """Drain deferred work (up to `drain_timeout`), then stop every driver's workers; from sync code.

        Idempotent. Afterwards `run()` and `defer()` raise `ConcurrencyClosed`, until the facade is
        entered again.

        Raises:
            WrongContext: called on a thread that runs an event loop; use ``await aclose()``.
        """
        refuse_in_event_loop("close()", "await concurrency.aclose()")
        self._runtime.close_blocking()

    async def wait_deferred(self, timeout: float | None = None) -> None:
        """Wait until every deferred batch handed over so far has finished (for tests).

        Args:
            timeout: seconds to wait at most; default: no limit.

        Raises:
            TimeoutError: work was still running after `timeout` seconds.
        """
        await self._runtime.work.wait(timeout)

    def wait_deferred_blocking(self, timeout: float | None = None) -> None:
        """Wait, from sync code, until every deferred batch handed over so far has finished.

        Raises:
            TimeoutError: work was still running after `timeout` seconds.
            WrongContext: called on a thread that runs an event loop; use `wait_deferred()`.
        """
        refuse_in_event_loop("wait_deferred_blocking()", "await concurrency.wait_deferred()")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._runtime.work.launched:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"deferred work was still running after {timeout} s")
            time.sleep(0.01)


def _retry_terms(retries: object, backoff: object) -> tuple[int, float]:
    """Check `defer()`'s `retries` and `backoff`.

    Raises:
        TypeError: `retries` is not an int, or `backoff` not a number.
        ValueError: `retries` is negative, or `backoff` is negative, not finite or above `MAX_SECONDS`.
    """
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(
            f"retries must be an int (how many times a failed task runs again), "
            f"not {type(retries).__name__} {quote(retries)}"
        )
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    if isinstance(backoff, bool) or not isinstance(backoff, int | float):
        raise TypeError(f"backoff must be a number of seconds, not {type(backoff).__name__} {quote(backoff)}")
    if not (0 <= backoff <= MAX_SECONDS):  # also refuses nan and inf
        raise ValueError(f"backoff must be from 0 to {MAX_SECONDS:.0f} seconds (one day), got {quote(backoff)}")
    return retries, float(backoff)
