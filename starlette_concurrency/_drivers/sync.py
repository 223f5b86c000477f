"""The `sync` driver: every task in the calling process, one after the other."""

from __future__ import annotations

import contextvars
import inspect
import time
import traceback
from collections.abc import Awaitable, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from .._config import Settings
from .._exceptions import RemoteError
from .._stats import Stats, TaskCounters
from .._tasks import Outcome, Task
from .._wire.outcome import exception_str, exception_type_name
from .base import Driver

__all__ = ["SyncDriver"]


class SyncDriver(Driver):
    """Run the tasks in-process, in input order, on the event loop — for tests and debugging.

    Keys, ordering, `return_exceptions` and error raising behave exactly as with the other drivers,
    and coroutine functions are awaited. What it cannot do: run tasks in parallel, or stop a task
    that is running. A timeout or a cancellation takes effect between tasks (and at the `await`s of
    a coroutine task); a plain function runs to its end and blocks the event loop meanwhile.
    An exception that is not an `Exception` (`SystemExit`, `GeneratorExit`, a custom `BaseException`)
    comes back as a `RemoteError`, as with the other drivers, rather than unwinding the server;
    `KeyboardInterrupt` is left alone (here it is the server's own Ctrl-C), and so is the event
    loop's cancellation.
    """

    name = "sync"

    def __init__(self) -> None:
        self._counters = TaskCounters()
        self._running = 0
        self._queued = 0

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        """Run the tasks one after the other; see `Driver.execute`."""
        self._queued += len(tasks)
        started = 0
        try:
            for index, task in enumerate(tasks):
                await anyio.lowlevel.checkpoint()
                self._queued -= 1
                started += 1
                self._running += 1
                begin = time.perf_counter()
                try:
                    outcomes[index] = outcome = await _run(task)
                finally:
                    self._running -= 1
                self._counters.record(outcome, time.perf_counter() - begin)
        finally:
            self._queued -= len(tasks) - started
            self._counters.timed_out += sum(outcome is None for outcome in outcomes[: len(tasks)])

    def stats(self) -> Stats:
        """Return the counters of the tasks run so far; `workers` is 1 (the event loop's thread)."""
        return self._counters.snapshot(self.name, workers=1, busy=self._running, queued=self._queued)


async def _run(task: Task) -> Outcome:
    # In a copy of the caller's context, as asyncio.to_thread runs a function: the task sees the
    # caller's context variables, and what it sets stays its own (the caller's are not changed).
    try:
        value = contextvars.copy_context().run(task.target)
        if inspect.isawaitable(value):
            value = await _in_a_task_of_its_own(value)
    except Exception as exc:
        return Outcome(error=exc)
    except anyio.get_cancelled_exc_class():
        raise  # the call was cancelled (a timeout, or the caller went away): not the task's outcome
    except KeyboardInterrupt:
        raise  # the server's own Ctrl-C
    except BaseException as exc:  # SystemExit, GeneratorExit, ...: as themselves they would unwind the server
        text = "".join(traceback.format_exception(exc))
        return Outcome(error=RemoteError(exception_type_name(exc), exception_str(exc), text))
    return Outcome(value=value)


async def _in_a_task_of_its_own(awaitable: Awaitable[Any]) -> Any:
    """Await `awaitable` in a child task: a coroutine runs in the context of the task that awaits it,
    and a child task has a copy of the caller's."""
    result: list[Any] = []
    error: list[BaseException] = []

    async def child() -> None:
        try:
            result.append(await awaitable)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # raised below as itself, not inside the task group's ExceptionGroup
            error.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(child)
    if error:
        raise error[0]
    return result[0]


def create(settings: Settings) -> SyncDriver:
    """Build the driver from a facade's settings (it has none to take)."""
    return SyncDriver()
