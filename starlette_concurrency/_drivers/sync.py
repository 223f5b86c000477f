"""The `sync` driver: every task in the calling process, one after the other."""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Sequence

import anyio.lowlevel

from .._config import Settings
from .._exceptions import RemoteError
from .._tasks import Outcome, Task
from .base import Driver

__all__ = ["SyncDriver"]


class SyncDriver(Driver):
    """Run the tasks in-process, in input order, on the event loop — for tests and debugging.

    Keys, ordering, `return_exceptions` and error raising behave exactly as with the other drivers,
    and coroutine functions are awaited. What it cannot do: run tasks in parallel, or stop a task
    that is running. A timeout or a cancellation takes effect between tasks (and at the `await`s of
    a coroutine task); a plain function runs to its end and blocks the event loop meanwhile.
    A task's `SystemExit` comes back as a `RemoteError`, as with the other drivers, rather than
    stopping the server; `KeyboardInterrupt` is left alone (here it is the server's own Ctrl-C).
    """

    name = "sync"

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None], *, background: bool = False) -> None:
        """Run the tasks one after the other; see `Driver.execute`."""
        for index, task in enumerate(tasks):
            await anyio.lowlevel.checkpoint()
            try:
                value = task.fn()
                if inspect.isawaitable(value):
                    value = await value
            except Exception as exc:
                outcomes[index] = Outcome(error=exc)
            except SystemExit as exc:  # as itself it would stop the server; the other drivers agree
                text = "".join(traceback.format_exception(exc))
                outcomes[index] = Outcome(error=RemoteError("SystemExit", str(exc), text))
            else:
                outcomes[index] = Outcome(value=value)


def create(settings: Settings) -> SyncDriver:
    """Build the driver from a facade's settings (it has none to take)."""
    return SyncDriver()
