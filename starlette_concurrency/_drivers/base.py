"""The interface every driver implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from .._pickling import dumps_task
from .._stats import Stats
from .._tasks import Outcome, Task

__all__ = ["Driver"]


class Driver(ABC):
    """Run the tasks of one call somewhere, concurrently where the driver can.

    A driver implements one method, `execute()`. `start()` and `aclose()` are optional hooks for
    drivers that hold resources (a pool, a cluster connection). The facade adds everything else:
    argument checking, timeouts (it cancels `execute()`), result shaping and error raising.

    Lifecycle: the facade calls `start()` before the first `execute()`, and `aclose()` when it is
    closed. A facade closed and entered again (each app lifespan, each `TestClient` block) starts
    the *same* driver instance again: `start()` and `aclose()` may each be called more than once,
    in that order (start, aclose, start, aclose...), and `execute()` only after a `start()`, by
    several callers at once. `aclose()` is also called on a driver that was never started (or whose
    `start()` failed) and must then release nothing. Check a driver with
    `starlette_concurrency.testing.DriverContract`.
    """

    name: str = "custom"
    #: Whether tasks must pickle to run here: `defer()` then checks them in the handler, before the response.
    pickles: bool = False

    async def start(self) -> None:
        """Acquire what the driver needs: called before the first `execute()`, and again after each `aclose()`."""

    def prepare(self, tasks: list[Task]) -> list[Task]:
        """Make deferred tasks ready to travel, once, when `defer()` accepts them (in its caller's thread).

        What it returns is what `execute_deferred()` gets later, after the response: a driver that keeps
        each task's pickled form in `Task.prepared` runs the state the task had at `defer()` time, which
        nothing done to its captured objects since can break. By default, a driver whose tasks must
        pickle (`pickles`) checks that each does and keeps the tasks as they are; others keep them.

        Raises:
            SerializationError: a task cannot be pickled for this driver; the handler can still react.
        """
        if self.pickles:
            for task in tasks:
                dumps_task(task)
        return tasks

    @abstractmethod
    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        """Run every task, storing how each ended in ``outcomes[i]`` as soon as it has.

        Must not raise for a task's failure: record it as ``Outcome(error=...)`` and go on with the
        other tasks. When cancelled (a timeout, or the caller went away), stop the tasks still
        running, drop the ones not started, and re-raise the cancellation.

        Raises:
            SerializationError: a task cannot be sent to where it would run; nothing was started.
        """

    async def execute_deferred(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        """Run deferred tasks, as `execute()` does; by default it *is* `execute()`.

        A driver with a shared pool overrides it to run deferred work after the tasks of `run()`
        calls, which someone is waiting for. When cancelled, it may store `NOT_STARTED` for each task
        it provably never began, so that the log tells them from tasks stopped while they ran.
        """
        await self.execute(tasks, outcomes)

    def set_draining(self, draining: bool) -> None:
        """Say that shutdown's drain has begun: deferred work may now use all of the driver's capacity.

        The facade calls it (on the loop that runs the driver) when its drain starts. A driver that keeps
        capacity back for `run()` calls (the process pool: deferred work on ``workers - 1`` workers) lifts
        that limit; by default it does nothing.
        """

    async def aclose(self) -> None:
        """Release what `start()` acquired; `start()` may be called again afterwards to use the driver again."""

    def stats(self) -> Stats:
        """Return a snapshot of the driver's workers, queue and counters; cheap, no I/O.

        Drivers fill in what they can; this default knows only the driver's name.
        """
        return Stats(driver=self.name)
