"""`ConcurrencyMiddleware`: wires a `Concurrency` into the app's lifespan and each request."""

from __future__ import annotations

import logging
import math
import threading
from collections import deque

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._api import Concurrency
from ._exceptions import ClientDisconnected

__all__ = ["ConcurrencyMiddleware"]

logger = logging.getLogger("starlette_concurrency")

# Body bytes the disconnect watch may hold for the app before it stops watching: it never reads
# an upload into memory on the app's behalf.
_MAX_BUFFERED = 64 * 1024

# How long the watch holds a finished call back to read the rest of a body it began reading.
_BODY_PART_WAIT = 1.0

_FINAL_LIFESPAN = {"lifespan.shutdown.complete", "lifespan.shutdown.failed", "lifespan.startup.failed"}


class ConcurrencyMiddleware:
    """Start the worker pool with the app, and run each request's deferred work after its response.

    - ``lifespan``: starts the facade (its default driver's workers) at startup — a failure fails
      the startup, as Starlette does; drains deferred work and stops the workers at shutdown,
      before the server is told that shutdown is complete. The app's own lifespan keeps working;
      two lifespans at once are counted. An app that does not support the lifespan protocol keeps
      a usable facade (started on first use) and a warning says why.
    - ``http``: collects what the request `defer()`s and, as soon as the final response body has
      been sent (before the response's BackgroundTasks run), starts it: all of it if the status is
      below 400, only the ``always=True`` tasks otherwise (an unhandled exception counts as a 500).
      While the request awaits `run()`, a disconnect of its client stops that call, which raises
      `ClientDisconnected` (swallowed here: nobody is left to answer).
    - anything else (``websocket``) passes through untouched.

    Args:
        app: the ASGI app to wrap.
        concurrency: the facade to wire in; a new ``Concurrency()`` (configured from the
            environment) if omitted.
        cancel_on_disconnect: stop a request's `run()` calls when its client goes away.
    """

    def __init__(
        self, app: ASGIApp, concurrency: Concurrency | None = None, *, cancel_on_disconnect: bool = True
    ) -> None:
        self.app = app
        self.concurrency = concurrency if concurrency is not None else Concurrency()
        self.cancel_on_disconnect = cancel_on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        batch = self.concurrency.request_batch(method=scope.get("method"), path=scope.get("path"))
        status = 500
        if self.cancel_on_disconnect:
            watch = _DisconnectWatch(receive)
            batch.disconnect = watch
            receive = watch.receive

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.pathsend" or (
                message["type"] == "http.response.body" and not message.get("more_body", False)
            ):
                # The response is out: start the batch now, not after the response's BackgroundTasks.
                batch.finish(succeeded=status < 400)

        token = batch.activate()
        try:
            await self.app(scope, receive, send_and_watch)
        except ClientDisconnected:
            logger.info(
                "client went away: stopped the run() call of %s %s",
                scope.get("method"),
                scope.get("path"),
                extra={"method": scope.get("method"), "path": scope.get("path")},
            )
        finally:
            batch.deactivate(token)
            # A response that never completed (an exception, a client gone mid-stream) is a failure.
            batch.finish(succeeded=False)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        startup = await receive()
        try:
            await self.concurrency.__aenter__()
        except Exception as exc:
            await send(
                {
                    "type": "lifespan.startup.failed",
                    "message": f"starlette-concurrency could not start its {self.concurrency.driver_name!r} "
                    f"driver: {type(exc).__name__}: {exc}",
                }
            )
            exc.add_note(f"(starlette-concurrency could not start its {self.concurrency.driver_name!r} driver)")
            raise  # as Starlette's router does: a server (or TestClient) reports it and stops
        replayed = False
        exited = False

        async def replay_startup() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return startup
            return await receive()

        async def exit_before_reporting(message: Message) -> None:
            nonlocal exited
            # The server exits as soon as it hears shutdown is complete (or startup failed):
            # deferred work must be drained and the workers stopped before that.
            if message["type"] in _FINAL_LIFESPAN and not exited:
                exited = True
                await self.concurrency.__aexit__(None, None, None)
            await send(message)

        try:
            await self.app(scope, replay_startup, exit_before_reporting)
        except BaseException as exc:
            if not replayed and isinstance(exc, Exception):
                logger.warning(
                    "the app does not support the ASGI lifespan protocol (%s: %s): starlette-concurrency "
                    "will start its workers on first use and drain deferred work at interpreter exit",
                    type(exc).__name__,
                    exc,
                )
            raise
        finally:
            if not exited:
                exited = True
                # Not under a shield of our own: the host's task group must close in the scope it opened in.
                await self.concurrency.__aexit__(None, None, None)


class _DisconnectWatch:
    """Observe the messages the app pulls, and pull them itself only while a `run()` awaits.

    Messages the watch pulls on the app's behalf (request body parts) are kept and handed to the
    app's next `receive()`, in order; nothing is stolen. One reader at a time: the app and the
    watch never wait on the server's `receive()` together.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._buffer: deque[Message] = deque()
        self._buffered = 0
        self._lock: anyio.Lock | None = None
        self._disconnected = False
        self._thread = threading.get_ident()
        self._watchers: set[anyio.CancelScope] = set()

    def _reader(self) -> anyio.Lock:
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    def _observe(self, message: Message) -> None:
        if message["type"] == "http.disconnect":
            self._disconnected = True
            for scope in self._watchers:
                scope.cancel()

    async def receive(self) -> Message:
        if self._buffer:
            message = self._buffer.popleft()
            self._buffered -= len(message.get("body", b""))
            return message
        reader = self._reader()
        if reader.locked():
            await reader.acquire()  # the watch is reading: wait for it (what it reads is kept for us)
        else:
            # No checkpoint: Request.is_disconnected() receives inside a cancelled scope and must get
            # a message that is ready, exactly as from the server's own receive().
            reader.acquire_nowait()
        try:
            if self._buffer:  # the watch pulled it while this call waited for the reader
                message = self._buffer.popleft()
                self._buffered -= len(message.get("body", b""))
                return message
            if self._disconnected:
                return {"type": "http.disconnect"}
            message = await self._receive()
        finally:
            reader.release()
        self._observe(message)
        return message

    def applies(self) -> bool:
        return threading.get_ident() == self._thread

    async def watch(self, scope: anyio.CancelScope) -> None:
        if self._disconnected:
            scope.cancel()
            return
        self._watchers.add(scope)
        mid_body = False
        try:
            while not self._disconnected and self._buffered <= _MAX_BUFFERED:
                # Once a body has begun, its next part is read even if the call ends meanwhile (for a
                # moment at most): a server's body iterator is never left half-consumed by the watch.
                deadline = anyio.current_time() + _BODY_PART_WAIT if mid_body else math.inf
                message: Message | None = None
                with anyio.CancelScope(shield=mid_body, deadline=deadline):
                    async with self._reader():
                        if self._disconnected:
                            break
                        message = await self._receive()
                        if message["type"] != "http.disconnect":
                            self._buffer.append(message)
                            self._buffered += len(message.get("body", b""))
                if message is None:  # the part did not come in time: wait unshielded from now on
                    mid_body = False
                    continue
                mid_body = message["type"] == "http.request" and bool(message.get("more_body", False))
                self._observe(message)
        finally:
            self._watchers.discard(scope)
