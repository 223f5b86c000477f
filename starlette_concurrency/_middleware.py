"""`ConcurrencyMiddleware`: wires a `Concurrency` into the app's lifespan and each request."""

from __future__ import annotations

import traceback
from contextlib import AsyncExitStack

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._api import Concurrency
from ._context import RequestDeferrals

__all__ = ["ConcurrencyMiddleware"]


class ConcurrencyMiddleware:
    """Start the worker pool with the app, and run each request's deferred work after its response.

    - ``lifespan``: starts the facade (its default driver's workers, and the task group deferred
      work runs in) at startup; drains deferred work and stops the workers at shutdown, before the
      server is told that shutdown is complete. The app's own lifespan keeps working.
    - ``http``: collects what the request `defer()`s, and once the final response body has been
      sent hands it to the facade: all of it if the status is below 400, only the ``always=True``
      tasks otherwise (an unhandled exception counts as a 500). The work runs in the facade's task
      group, so the connection is released at once and a client that goes away cancels nothing.
    - anything else (``websocket``) passes through untouched.

    Args:
        app: the ASGI app to wrap.
        concurrency: the facade to wire in; a new ``Concurrency()`` (configured from the
            environment) if omitted.
    """

    def __init__(self, app: ASGIApp, concurrency: Concurrency | None = None) -> None:
        self.app = app
        self.concurrency = concurrency if concurrency is not None else Concurrency()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        core = self.concurrency._core
        deferrals = RequestDeferrals()
        core.open_requests.add(deferrals)
        token = core.deferrals.set(deferrals)
        status = 500
        complete = False

        async def send_and_watch(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.pathsend" or (
                message["type"] == "http.response.body" and not message.get("more_body", False)
            ):
                complete = True

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            core.deferrals.reset(token)
            if deferrals.entries:
                # A response that never completed (an exception, a client gone mid-stream) is a failure.
                await core.flush(deferrals, succeeded=complete and status < 400)
            else:
                core.open_requests.discard(deferrals)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        startup = await receive()
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.concurrency)
            except Exception:
                await send({"type": "lifespan.startup.failed", "message": traceback.format_exc()})
                return
            replayed = False

            async def replay_startup() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return startup
                return await receive()

            async def close_before_reporting(message: Message) -> None:
                # The server exits as soon as it hears shutdown is complete (or startup failed):
                # deferred work must be drained and the workers stopped before that.
                if message["type"] in {
                    "lifespan.shutdown.complete",
                    "lifespan.shutdown.failed",
                    "lifespan.startup.failed",
                }:
                    await self.concurrency.aclose()
                await send(message)

            await self.app(scope, replay_startup, close_before_reporting)
