"""`ConcurrencyWSGIMiddleware`: the WSGI twin of `ConcurrencyMiddleware` (Flask, Django, any PEP 3333 app)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from . import _exit
from ._api import Concurrency
from ._deferred import RequestBatch

__all__ = ["ConcurrencyWSGIMiddleware"]

StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class ConcurrencyWSGIMiddleware:
    """Run each request's deferred work once its response has been sent.

    `defer()` inside a request joins that request's batch. The batch starts when the server calls
    ``close()`` on the response iterable (PEP 3333: after the last byte was sent), all of it if the
    status is below 400, only the ``always=True`` tasks otherwise; an exception counts as a 500.
    With a journal, what will run is written to it before the server gets the response's last
    bytes (the chunk that completes its ``Content-Length``, or the end of the iterable), so that a
    crash once the client has its response loses none of it.
    The work runs on the facade's own loop thread, so the server's thread is free at once. The
    pool starts on first use in each server process (after any pre-fork). On SIGTERM deferred work
    is drained first (new requests are answered 503 meanwhile), then the server's own handler runs
    — or, for a server without one (waitress), the process exits through interpreter exit, which
    stops the workers; a facade made with the app registers that SIGTERM handler here.

    Args:
        app: the WSGI app to wrap.
        concurrency: the facade to wire in; a new ``Concurrency()`` if omitted.
    """

    def __init__(self, app: WSGIApp, concurrency: Concurrency | None = None) -> None:
        self.app = app
        self.concurrency = concurrency if concurrency is not None else Concurrency()
        _exit.watch(self.concurrency._runtime)  # made in the server process's main thread, usually

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if self.concurrency.shutting_down:
            start_response(
                "503 Service Unavailable",
                # No Connection header: hop-by-hop headers are the server's (PEP 3333).
                [("Content-Type", "text/plain; charset=utf-8"), ("Retry-After", "1")],
            )
            return [b"Service Unavailable: shutting down"]
        batch = self.concurrency.request_batch(method=environ.get("REQUEST_METHOD"), path=environ.get("PATH_INFO"))
        response = _Response(batch) if self.concurrency._runtime.journal is None else _JournaledResponse(batch)

        def start(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            try:
                response.status = int(status.split(" ", 1)[0])
            except ValueError:
                response.status = 500
            response.headers = headers
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        token = batch.activate()
        try:
            response.body = self.app(environ, start)
        except BaseException:
            batch.finish(succeeded=False)
            raise
        finally:
            batch.deactivate(token)
        return response


class _Response:
    """The app's response iterable, with `close()` starting the request's deferred batch."""

    def __init__(self, batch: RequestBatch) -> None:
        self.batch = batch
        self.status = 500
        self.headers: list[tuple[str, str]] = []
        self.body: Iterable[bytes] = ()
        self._complete = False

    def __iter__(self) -> Iterator[bytes]:
        # A generator body runs the app's code: let its defer() calls join the batch too.
        token = self.batch.activate()
        try:
            yield from self.body
            self._complete = True
        finally:
            self.batch.deactivate(token)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        except BaseException:
            self.batch.finish(succeeded=False)
            raise
        self.batch.finish(succeeded=self._complete and self.status < 400)


class _JournaledResponse(_Response):
    """With a journal: the request's batch is written to it before the server can send the response's last byte.

    That last byte is in the chunk that completes the ``Content-Length`` the app declared; without
    one (chunked, or ended by closing the connection) the server marks the end once the iterable
    is exhausted. The batch still starts at `close()`, after the response.
    """

    def __iter__(self) -> Iterator[bytes]:
        token = self.batch.activate()
        try:
            length: int | None = None
            sent = 0
            for chunk in self.body:
                if not sent:  # the app has called start_response by its first chunk (a generator, lazily)
                    length = _content_length(self.headers)
                sent += len(chunk)
                if length is not None and sent >= length:
                    self._commit()
                yield chunk
            self._commit()  # a no-op once committed
            self._complete = True
        finally:
            self.batch.deactivate(token)

    def _commit(self) -> None:
        gate = self.batch.commit(succeeded=self.status < 400)
        if gate is not None:
            gate.wait()


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
