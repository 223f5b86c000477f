"""`ConcurrencyMiddleware`: wires a `Concurrency` into the app's lifespan and each request."""

from __future__ import annotations

import logging
import math
import sys
import threading
import types
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import _exit
from ._api import Concurrency
from ._exceptions import ClientDisconnected

__all__ = ["ConcurrencyMiddleware"]

logger = logging.getLogger("starlette_concurrency")

# Body bytes the disconnect watch may hold for the app before it stops watching: it never reads
# an upload into memory on the app's behalf.
_MAX_BUFFERED = 64 * 1024

_FINAL_LIFESPAN = {"lifespan.shutdown.complete", "lifespan.shutdown.failed", "lifespan.startup.failed"}

# Any ASGI app. Litestar's and Quart's type their scopes and messages more narrowly than Starlette's `ASGIApp`
# does (typed dicts): they are not `ASGIApp`s to a type checker, and the middleware only passes them on.
AnyASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class ConcurrencyMiddleware:
    """Start the worker pool with the app, and run each request's deferred work after its response.

    - ``lifespan``: hosts the facade on the lifespan's loop and, once the app's own startup has
      completed (so that every worker sees what it put in the environment), starts the default
      driver's workers — a failure fails the startup, as Starlette does; drains deferred work and
      stops the workers at shutdown, before the server is told that shutdown is complete. The app's
      own lifespan keeps working; two lifespans at once are counted. An app that does not support
      the lifespan protocol keeps a usable facade (started on first use) and a warning says why;
      so does a middleware that serves requests without ever seeing a lifespan (Litestar's
      ``middleware=``, a mounted sub-app): once per facade, and not if a lifespan entered the
      facade all the same (the app's own, ``async with concurrency``).
    - ``http``: collects what the request `defer()`s and, as soon as the final response body has
      been sent (before the response's BackgroundTasks run), starts it: all of it if the status is
      below 400, only the ``always=True`` tasks otherwise (an unhandled exception counts as a 500).
      With a journal, what will run is written to it before the final body goes out (the response
      waits for the write, off the loop: group commit), so that a crash once the client has its
      response loses none of it; it still starts only after the body has been sent. While the
      request awaits `run()`, a disconnect of its client stops that call, which raises
      `ClientDisconnected` (swallowed here, logged at INFO: nobody is left to answer). Once the
      process's shutdown has begun without a lifespan to drain it (see `Concurrency.shutting_down`),
      new requests are answered 503 with ``Connection: close`` so that a load balancer retries
      elsewhere while deferred work drains.
    - anything else (``websocket``) passes through untouched.

    Args:
        app: the ASGI app to wrap.
        concurrency: the facade to wire in; a new ``Concurrency()`` (configured from the
            environment) if omitted.
        cancel_on_disconnect: stop a request's `run()` calls when its client goes away.
    """

    def __init__(
        self, app: AnyASGIApp, concurrency: Concurrency | None = None, *, cancel_on_disconnect: bool = True
    ) -> None:
        self.app: ASGIApp = app
        self.concurrency = concurrency if concurrency is not None else Concurrency()
        self.cancel_on_disconnect = cancel_on_disconnect
        self._lifespan_seen = False
        self._warned = False
        _exit.watch(self.concurrency._runtime)  # the server process's SIGTERM: drain or log, never lose

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if not self._lifespan_seen and not self._warned:
                self._warn_no_lifespan()
            if self.concurrency.shutting_down:
                await _unavailable(send)
                return
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
                return
            final = message["type"] == "http.response.pathsend" or (
                message["type"] == "http.response.body" and not message.get("more_body", False)
            )
            if final:
                # With a journal, what will run is in it before the client can have the whole response:
                # a crash the moment after loses none of it.
                gate = batch.commit(succeeded=status < 400)
                if gate is not None:
                    await gate.wait_async()
            await send(message)
            if final:
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

    def _warn_no_lifespan(self) -> None:
        runtime = self.concurrency._runtime
        if runtime.users:  # a lifespan or `with` hosts the facade all the same (the app's own lifespan entered it)
            return
        self._warned = True
        if runtime.warned_no_lifespan:  # Litestar makes a middleware of its `middleware=[...]` per route
            return
        runtime.warned_no_lifespan = True
        logger.warning(
            "ConcurrencyMiddleware serves requests but never received the ASGI lifespan: its workers start on "
            "first use and deferred work is drained at SIGTERM or interpreter exit, not at the app's shutdown. "
            "Wrap the whole ASGI app instead (Litestar: `app = ConcurrencyMiddleware(Litestar(...), concurrency=c)`, "
            "not `middleware=[...]`; a mounted sub-app: wrap the outer app), or enter the facade in the app's own "
            "lifespan (`async with concurrency:`)"
        )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._lifespan_seen = True
        startup = await receive()
        concurrency = self.concurrency
        runtime = concurrency._runtime
        try:
            await runtime.enter(warm=False)
        except Exception as exc:
            await send({"type": "lifespan.startup.failed", "message": _cannot_start(concurrency, exc)})
            exc.add_note(f"(starlette-concurrency could not start its {concurrency.driver_name!r} driver)")
            raise  # as Starlette's router does: a server (or TestClient) reports it and stops
        _exit.watch(runtime)  # over the server's own SIGTERM handler, which is in place by now
        replayed = False
        exited = False
        reported = False

        async def replay_startup() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return startup
            return await receive()

        async def exit_before_reporting(message: Message) -> None:
            nonlocal exited, reported
            if message["type"] == "lifespan.startup.complete":
                # The app's own startup is done: the workers start now, and see its environment.
                try:
                    await runtime.call(runtime.warm, "startup")
                except Exception as exc:
                    exc.add_note(f"(starlette-concurrency could not start its {concurrency.driver_name!r} driver)")
                    raise  # into the app's lifespan, which reports the failed startup (or we do, below)
            # The server exits as soon as it hears shutdown is complete (or startup failed):
            # deferred work must be drained and the workers stopped before that.
            if message["type"] in _FINAL_LIFESPAN and not exited:
                exited = True
                await runtime.leave()
            if message["type"] in _FINAL_LIFESPAN:
                reported = True
            await send(message)

        try:
            await self.app(scope, replay_startup, exit_before_reporting)
        except BaseException as exc:
            if replayed and not reported and isinstance(exc, Exception):
                # The app let our start-up failure through without reporting it: report it.
                if not exited:
                    exited = True
                    await runtime.leave()
                reported = True
                await send({"type": "lifespan.startup.failed", "message": _cannot_start(concurrency, exc)})
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
                await runtime.leave()


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
            # Cancelled as soon as the call ends: a server's receive() gives up a message it has not
            # returned, so nothing is lost, and the answer never waits for the rest of an upload.
            while not self._disconnected and self._buffered <= _MAX_BUFFERED:
                async with self._reader():
                    if self._disconnected:
                        break
                    message = await self._pull()
                mid_body = message["type"] == "http.request" and bool(message.get("more_body", False))
        finally:
            self._watchers.discard(scope)
            if mid_body:
                await self._pull_ready_parts()

    async def _pull(self) -> Message:
        message = await self._receive()
        if message["type"] != "http.disconnect":
            self._buffer.append(message)
            self._buffered += len(message.get("body", b""))
        self._observe(message)
        return message

    async def _pull_ready_parts(self) -> None:
        """Take the parts of a half-read body that are ready now, without ever waiting for one.

        A body iterator the watch began is then left as the app would leave it (an in-process transport's
        generator runs to its end), and the answer still never waits for the network.
        """
        reader = self._reader()
        if reader.locked():
            return
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = -math.inf  # cancelled at the first wait: only what is ready is taken
            reader.acquire_nowait()
            try:
                more = True
                while more and not self._disconnected and self._buffered <= _MAX_BUFFERED:
                    message = await self._pull()
                    more = message["type"] == "http.request" and bool(message.get("more_body", False))
            finally:
                reader.release()


_STACK_DEPTH = 60  # frames looked through for a request being served: a framework's stack is shallower


def request_being_served() -> str | None:
    """The request (``GET /path``) an ASGI or WSGI app on the call stack is serving, if any.

    For `defer()` called outside any request batch: if a request is being served all the same, the
    app is not wrapped by `ConcurrencyMiddleware` (or `ConcurrencyWSGIMiddleware`) with that facade,
    and the tasks will start at once instead of after the response. Looks for an ASGI ``scope`` or a
    WSGI ``environ`` among the callers' arguments (their names are the specifications').
    """
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(_STACK_DEPTH):
        if frame is None:
            return None
        names = frame.f_code.co_varnames
        if "scope" in names:
            scope = frame.f_locals.get("scope")
            if isinstance(scope, dict) and scope.get("type") in ("http", "websocket"):
                return f"{scope.get('method', 'WEBSOCKET')} {scope.get('path', '?')}"
        if "environ" in names:
            environ = frame.f_locals.get("environ")
            if isinstance(environ, dict) and "wsgi.version" in environ:
                return f"{environ.get('REQUEST_METHOD', '?')} {environ.get('PATH_INFO', '?')}"
        frame = frame.f_back
    return None


def _cannot_start(concurrency: Concurrency, exc: BaseException) -> str:
    return f"starlette-concurrency could not start its {concurrency.driver_name!r} driver: {type(exc).__name__}: {exc}"


async def _unavailable(send: Send) -> None:
    """Answer 503: the process is shutting down and draining deferred work."""
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"connection", b"close"),
                (b"retry-after", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"Service Unavailable: shutting down"})
