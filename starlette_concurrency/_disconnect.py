"""Stop a request's `run()` when its client goes away (servers do not cancel a plain endpoint then).

The ASGI middleware gives each request a `DisconnectWatch` (see `_middleware.py`) that can wait for
``http.disconnect`` without taking the app's messages. Watching costs a task that waits on the
server's ``receive()``; most calls end within a few milliseconds, sooner than that task would cost
to start and stop (a third of a busy server's throughput when every call had one). So on asyncio the
watch starts only when the call is still running after `WATCH_AFTER`, from a timer, which costs next
to nothing; elsewhere (trio, where tasks are cheap) it starts with the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio
import sniffio

from ._deferred import DisconnectWatch
from ._exceptions import ClientDisconnected
from ._tasks import Outcome

__all__ = ["WATCH_AFTER", "watched"]

WATCH_AFTER = 0.02  # seconds a run() goes unwatched: a client that leaves sooner stops it this much later


async def watched(call: Callable[[], Awaitable[list[Outcome]]], watch: DisconnectWatch) -> list[Outcome]:
    """Await `call`, cancelling it if the request's client disconnects meanwhile.

    Raises:
        ClientDisconnected: the client went away; the call was cancelled (its tasks stopped).
    """
    if sniffio.current_async_library() == "asyncio":
        return await _watched_on_asyncio(call, watch)
    outcomes: list[Outcome] | None = None
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(watch.watch, task_group.cancel_scope)
        outcomes = await call()
        task_group.cancel_scope.cancel()
    return _not_disconnected(outcomes)


async def _watched_on_asyncio(call: Callable[[], Awaitable[list[Outcome]]], watch: DisconnectWatch) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    watcher: asyncio.Task[None] | None = None
    outcomes: list[Outcome] | None = None
    with anyio.CancelScope() as scope:

        def start_watching() -> None:
            nonlocal watcher
            watcher = loop.create_task(watch.watch(scope))

        timer = loop.call_later(WATCH_AFTER, start_watching)
        try:
            outcomes = await call()
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()
                await asyncio.wait([watcher])  # it releases the request's receive() before the app reads on
    return _not_disconnected(outcomes)


def _not_disconnected(outcomes: list[Outcome] | None) -> list[Outcome]:
    if outcomes is None:
        raise ClientDisconnected(
            "the client went away while run() was running: its tasks were stopped. Nothing needs doing; "
            "pass cancel_on_disconnect=False to ConcurrencyMiddleware to let such calls finish"
        )
    return outcomes
