"""An app exercising the middleware, served by uvicorn in a subprocess or driven in-process.

Deferred tasks write a JSON marker file (pid, start, end) into the directory named by
`TEST_MARKERS` (workers inherit the environment), so tests can see what ran, where and when.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from starlette_concurrency import Concurrency, ConcurrencyClosed, ConcurrencyMiddleware


def markers() -> Path:
    return Path(os.environ["TEST_MARKERS"])


def _write_marker(name: str, value: object) -> None:
    # Whole or not at all: a test polls for the file and reads it as soon as it exists.
    partial = markers() / f"{name}.json.tmp"
    partial.write_text(json.dumps(value))
    partial.rename(markers() / f"{name}.json")


def mark(name: str, seconds: float = 0.0) -> str:
    """A deferred task: sleep, then record that it ran."""
    start = time.time()
    time.sleep(seconds)
    _write_marker(name, {"pid": os.getpid(), "start": start, "end": time.time()})
    return name


def mark_state(name: str, state: dict[str, object]) -> None:
    """A deferred task: record ``state["value"]`` as the worker got it."""
    _write_marker(name, state["value"])


def report_and_mark(name: str, seconds: float) -> str:
    """A `run()` task: say which worker took it, sleep (uncooperatively), then record that it finished."""
    (markers() / f"{name}.pid.tmp").write_text(str(os.getpid()))
    (markers() / f"{name}.pid.tmp").rename(markers() / f"{name}.pid")
    time.sleep(seconds)
    return mark(name)


def explode(message: str) -> None:
    raise RuntimeError(message)


def make_app(concurrency: Concurrency, *, cancel_on_disconnect: bool = True) -> Starlette:
    async def defer_slow(request: Request) -> Response:
        seconds = float(request.query_params.get("seconds", "1.0"))
        concurrency.defer([functools.partial(mark, "slow-a", seconds), functools.partial(mark, "slow-b", seconds)])
        return PlainTextResponse("deferred")

    async def status(request: Request) -> Response:
        code = int(request.path_params["code"])
        concurrency.defer(functools.partial(mark, f"normal-{code}"))
        concurrency.defer(functools.partial(mark, f"always-{code}"), always=True)
        return PlainTextResponse("status", status_code=code)

    async def error(request: Request) -> Response:
        concurrency.defer(functools.partial(mark, "normal-error"))
        concurrency.defer(functools.partial(mark, "always-error"), always=True)
        raise RuntimeError("the handler failed")

    async def stream(request: Request) -> Response:
        concurrency.defer(functools.partial(mark, "stream"))

        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk {i}\n".encode()
                await anyio.sleep(0.3)

        return StreamingResponse(body())

    async def file(request: Request) -> Response:
        concurrency.defer(functools.partial(mark, "file"))
        return FileResponse(__file__)

    async def failing(request: Request) -> Response:
        tasks: dict[str, Callable[[], object]] = {
            "doomed": functools.partial(explode, "deferred failure"),
            "sibling": functools.partial(mark, "sibling"),
        }
        concurrency.defer(tasks)
        return PlainTextResponse("ok")

    async def run(request: Request) -> Response:
        results = await concurrency.run({"a": functools.partial(os.getpid), "b": lambda: 2 + 2})
        return JSONResponse({"results": results, "server": os.getpid()})

    async def slow_run(request: Request) -> Response:
        name, seconds = request.query_params["name"], float(request.query_params.get("seconds", "5"))
        return PlainTextResponse(await concurrency.run(functools.partial(report_and_mark, name, seconds)))

    async def run_then_echo(request: Request) -> Response:
        # Reads its body only after run(): the disconnect watch must not have eaten it.
        value = await concurrency.run(lambda: 2 + 2)
        return PlainTextResponse(f"{value}:{(await request.body()).decode()}")

    async def defer_long(request: Request) -> Response:
        concurrency.defer(functools.partial(mark, "quick", 0.2))
        concurrency.defer(functools.partial(mark, "long", 600))
        return PlainTextResponse("deferred")

    def sync_endpoint(request: Request) -> Response:
        # Sync endpoints run in the threadpool: the deferral scope must follow them there.
        concurrency.defer(functools.partial(mark, "from-thread"))
        return PlainTextResponse("sync")

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    class Header(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            response = await call_next(request)
            response.headers["x-wrapped"] = "yes"
            return response

    return Starlette(
        routes=[
            Route("/defer", defer_slow),
            Route("/status/{code:int}", status),
            Route("/error", error),
            Route("/stream", stream),
            Route("/file", file),
            Route("/failing", failing),
            Route("/run", run),
            Route("/sync", sync_endpoint),
            Route("/slow-run", slow_run),
            Route("/run-then-echo", run_then_echo, methods=["POST"]),
            Route("/defer-long", defer_long),
            WebSocketRoute("/ws", echo),
        ],
        middleware=[
            Middleware(ConcurrencyMiddleware, concurrency=concurrency, cancel_on_disconnect=cancel_on_disconnect),
            Middleware(Header),
        ],
    )


# What `uvicorn tests.apps:app` serves.
# Three workers: deferred work may hold all but one of them (run() keeps one), and the tests check that
# a deferred batch of two runs at the same time.
app = make_app(Concurrency(workers=3, drain_timeout=20))
# The same with calls that outlive their client, and with a short drain (for servers without lifespan).
app_keep_on_disconnect = make_app(Concurrency(workers=2, drain_timeout=20), cancel_on_disconnect=False)
app_short_drain = make_app(Concurrency(workers=2, drain_timeout=3))


def scheduler_app() -> Starlette:
    """Threads that defer outside any request (a scheduler, a metrics loop), from startup until refused.

    Each thread appends the key of every deferral accepted to ``accepted-<n>.txt`` in the markers
    directory; the tasks mark ``<key>.json`` when they run.
    """
    concurrency = Concurrency(workers=2, drain_timeout=5)

    def defer_until_refused(n: int) -> None:
        with (markers() / f"accepted-{n}.txt").open("a") as accepted:
            for i in range(100_000):
                key = f"bg-{n}-{i}"
                try:
                    concurrency.defer({key: functools.partial(mark, key, 0.01)})
                except ConcurrencyClosed:
                    return
                accepted.write(key + "\n")
                accepted.flush()
                time.sleep(0.005)

    @contextlib.asynccontextmanager
    async def start_threads(app: Starlette) -> AsyncIterator[None]:
        for n in range(4):
            threading.Thread(target=defer_until_refused, args=(n,), daemon=True).start()
        yield

    async def home(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/", home)],
        lifespan=start_threads,
        middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)],
    )


app_scheduler = scheduler_app()
