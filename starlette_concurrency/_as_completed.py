"""`Concurrency.as_completed`: a call's results in the order they finish, on every driver.

```
   caller (any loop or thread)               host loop (owns the drivers)
   ───────────────────────────               ────────────────────────────
   async for key, result in it:
     first __anext__ ──── dispatch ───────▶  start: spawn the producer ─▶ driver.execute(tasks, Reporting)
     __anext__ ────────── dispatch ───────▶  receive() ◀── memory stream ◀── outcomes[i] = outcome
     ◀── (index, outcome) / End ─────────                                      (each task, as it ends)
   break / aclose() / cancelled ─ dispatch ▶ cancel the producer's scope: the driver stops the rest
```

One `execute()` call runs all the tasks, exactly as `run()` does: the same pickling before anything
starts, the same batching and the same timeout and cancellation. What differs is the outcomes list:
a `_Reporting` list sends each outcome on a memory object stream the moment the driver stores it
(the driver contract: "storing how each ended in ``outcomes[i]`` as soon as it has"). Everything on
the stream is touched on the host loop only; a caller on another loop or thread reaches it through
the host's portal, as `run()` does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _tracing as tracing
from ._exceptions import ConcurrencyClosed, DriverError, TaskTimeout
from ._tasks import Batch, Outcome

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["AsCompleted"]

K = TypeVar("K")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _End:
    """The producer's last word: the call ended, with this error for the caller (or none)."""

    error: BaseException | None = None


class _Reporting(list[Outcome | None]):
    """The outcomes list handed to the driver: each outcome stored is also sent to the caller."""

    def __init__(self, size: int, send: Callable[[tuple[int, Outcome] | _End], None]) -> None:
        super().__init__([None] * size)
        self._send = send

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, int) and value is not None and self[index] is None:
            self._send((index, value))
        super().__setitem__(index, value)


class AsCompleted(Generic[K, T]):
    """The results of a call as its tasks finish: ``async for key, result in concurrency.as_completed(tasks)``.

    Made by `Concurrency.as_completed`; nothing starts until the first iteration. Leaving the loop
    early (``break``, an exception, a cancellation) stops the call's remaining tasks; use it as
    ``async with`` (or call `aclose()`) to wait until they have stopped.
    """

    def __init__(
        self, runtime: Runtime, driver: str, batch: Batch, timeout: float | None, return_exceptions: bool
    ) -> None:
        # The call lives on the host loop and never refers back here, so that `break` (which drops this
        # object without closing it) reaches __del__, which stops the call.
        self._call = _Call(runtime, driver, batch, timeout)
        self._return_exceptions = return_exceptions
        self._finished = not batch.tasks  # nothing to run: nothing to stop either

    def __aiter__(self) -> AsCompleted[K, T]:
        return self

    async def __anext__(self) -> tuple[K, T]:
        if self._finished:
            raise StopAsyncIteration
        call = self._call
        try:
            item = await call.on_host(call.next)
        except BaseException:
            await self._stop()  # cancelled, or the facade refused: stop the call's remaining tasks
            raise
        if isinstance(item, _End):
            self._finished = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        index, outcome = item
        task = call.batch.tasks[index]
        if outcome.error is None:
            return task.key, outcome.value
        outcome.error.add_note(f"(raised by {task.label})")
        if self._return_exceptions:
            return task.key, outcome.error
        await self._stop()  # as run(): a failure ends the call (here: the first to finish)
        raise outcome.error

    async def aclose(self) -> None:
        """Stop the call's tasks that have not finished, and wait until they have stopped."""
        await self._stop()

    async def __aenter__(self) -> AsCompleted[K, T]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stop()

    def __del__(self) -> None:
        # `break` out of `async for` does not close the iterator: its last reference going does.
        if not self._finished:
            self._finished = True
            self._call.cancel_soon()

    async def _stop(self) -> None:
        if self._finished:
            return
        self._finished = True
        call = self._call
        if call.started:
            with anyio.CancelScope(shield=True):
                await call.on_host(call.cancel_and_wait)


class _Call:
    """One `as_completed()` call on the host loop: the producer, its stream, and how to stop it."""

    def __init__(self, runtime: Runtime, driver: str, batch: Batch, timeout: float | None) -> None:
        self.runtime = runtime
        self.driver = driver
        self.batch = batch
        self.timeout = timeout
        self.started = False
        # The producer's, cancelled on the host loop only; made there, in next(): a cancel scope belongs
        # to the async library it is made under, and the caller may run another one in another thread.
        self.scope: anyio.CancelScope | None = None
        self.stopped: anyio.Event | None = None  # set by the producer when it returns (host loop)
        self.receive: MemoryObjectReceiveStream[tuple[int, Outcome] | _End] | None = None

    async def on_host(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run `fn` on the host loop, from the caller's loop or thread (as `run()` reaches its driver)."""
        return await self.runtime.call(fn, "as_completed()")

    async def next(self) -> tuple[int, Outcome] | _End:
        """On the host loop: the next outcome, starting the call on the first."""
        if not self.started:
            host = self.runtime.host
            assert host is not None  # on_host runs this on it
            send, self.receive = anyio.create_memory_object_stream[tuple[int, Outcome] | _End](math.inf)
            self.stopped = anyio.Event()
            self.scope = anyio.CancelScope()
            self.started = True
            host.task_group.start_soon(self.produce, send)
        assert self.receive is not None
        try:
            item = await self.receive.receive()
        except anyio.EndOfStream:  # the producer was stopped from outside (the host shutting down)
            item = _End(ConcurrencyClosed("as_completed(): the facade stopped before the call's tasks finished"))
        if isinstance(item, _End):
            self.receive.close()
        return item

    def cancel_soon(self) -> None:
        """Stop the producer, from any thread, without waiting."""
        if not self.started:
            return
        with contextlib.suppress(Exception):  # the host loop stopped meanwhile: nothing runs any more
            host = self.runtime.host
            if host is not None:
                if host.here():
                    self.close()
                else:
                    host.portal.start_task_soon(self.close_async)

    async def close_async(self) -> None:
        self.close()

    def close(self) -> None:
        """On the host loop: stop the producer, and close the stream."""
        if self.scope is not None:
            self.scope.cancel()
        if self.receive is not None:
            self.receive.close()

    async def cancel_and_wait(self) -> None:
        """On the host loop: stop the producer and wait until the driver has stopped the tasks."""
        self.close()
        if self.stopped is not None:
            await self.stopped.wait()

    async def produce(self, send: MemoryObjectSendStream[tuple[int, Outcome] | _End]) -> None:
        """On the host loop: run every task in one driver call; report each outcome, then the end."""
        assert self.scope is not None  # made with the producer, in next()
        tasks = self.batch.tasks
        outcomes = _Reporting(len(tasks), send.send_nowait)
        timed_out = False
        try:
            with send, self.scope:
                try:
                    driver = await self.runtime.started_driver(self.driver)
                    if self.timeout is None:
                        await driver.execute(tasks, outcomes)
                    else:
                        with anyio.move_on_after(self.timeout) as deadline:
                            await driver.execute(tasks, outcomes)
                        timed_out = deadline.cancelled_caught
                except Exception as exc:  # SerializationError before anything ran, a driver's failure
                    send.send_nowait(_End(exc))
                    return
                send.send_nowait(_End(self.missing(outcomes, timed_out)))
        finally:
            tracing.end(tasks, outcomes, "timed out" if timed_out else "cancelled")
            assert self.stopped is not None
            self.stopped.set()

    def missing(self, outcomes: list[Outcome | None], timed_out: bool) -> BaseException | None:
        missing = [task.label for task, outcome in zip(self.batch.tasks, outcomes, strict=True) if outcome is None]
        if not missing:
            return None
        listed = f"{', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}"
        if timed_out:
            return TaskTimeout(
                f"as_completed() did not finish within {self.timeout} s; stopped {len(missing)} unfinished "
                f"task(s): {listed}. Raise the timeout, or split the work"
            )
        return DriverError(
            f"driver {self.driver!r} returned from execute() without an outcome for {listed}: a driver must "
            "store an Outcome for every task (see Driver.execute); fix the driver"
        )
