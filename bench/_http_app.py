"""The app `bench/http.py` serves with uvicorn: the same work done the ways a Starlette user could.

- ``/plain``: no work; the reference the other endpoints are compared with.
- ``/run/ours``, ``/run/ppe``, ``/run/anyio``: two trivial closures, awaited, through
  ``concurrency.run()``, ``loop.run_in_executor(ProcessPoolExecutor)`` and ``anyio.to_process``.
- ``/bare/...``: the same endpoints without `ConcurrencyMiddleware` in front of them (every other
  path goes through it), and ``/bare/run/reference``: the same work through `_reference_pool.py`, a
  minimal multiplexed pool that is the yardstick of our process driver's CPU cost.
- ``/defer``, ``/background``: the ``/plain`` response, plus two CPU-bound closures of
  ``BENCH_DEFER_MS`` each after it, through ``concurrency.defer()`` and Starlette ``BackgroundTasks``.
- ``/stats``: deferred work not yet done, so that the driver can wait for it between phases.

Every pool has 2 workers and is warmed up in the lifespan, before the first request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.to_process
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from starlette_concurrency import Concurrency, ConcurrencyMiddleware

from . import _work
from ._reference_pool import ReferencePool

WORKERS = 2
concurrency = Concurrency(workers=WORKERS, env_file=None)
limiter = anyio.CapacityLimiter(WORKERS)
state: dict[str, Any] = {"loops": 1, "background": 0}


def counted_burn(loops: int) -> int:
    try:
        return _work.burn(loops)
    finally:
        state["background"] -= 1


async def plain(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def run_ours(request: Request) -> JSONResponse:
    a, b = await concurrency.run([partial(_work.add, 1, 2), partial(_work.add, 3, 4)])
    return JSONResponse({"ok": a + b == 10})


async def run_ppe(request: Request) -> JSONResponse:
    loop = asyncio.get_running_loop()
    ppe: concurrent.futures.ProcessPoolExecutor = state["ppe"]
    a, b = await asyncio.gather(
        loop.run_in_executor(ppe, partial(_work.add, 1, 2)), loop.run_in_executor(ppe, partial(_work.add, 3, 4))
    )
    return JSONResponse({"ok": a + b == 10})


async def run_anyio(request: Request) -> JSONResponse:
    results = [0, 0]

    async def one(index: int, a: int, b: int) -> None:
        results[index] = await anyio.to_process.run_sync(_work.add, a, b, limiter=limiter)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, 0, 1, 2)
        tg.start_soon(one, 1, 3, 4)
    return JSONResponse({"ok": sum(results) == 10})


async def run_reference(request: Request) -> JSONResponse:
    reference: ReferencePool = state["reference"]
    a, b = await reference.run([partial(_work.add, 1, 2), partial(_work.add, 3, 4)])
    return JSONResponse({"ok": a + b == 10})


async def defer(request: Request) -> JSONResponse:
    loops = state["loops"]
    concurrency.defer([partial(_work.burn, loops), partial(_work.burn, loops)])
    return JSONResponse({"ok": True})


async def background(request: Request) -> JSONResponse:
    loops = state["loops"]
    tasks = BackgroundTasks()
    for _ in range(2):
        state["background"] += 1
        tasks.add_task(counted_burn, loops)
    return JSONResponse({"ok": True}, background=tasks)


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"deferred": concurrency._runtime.work.pending, "background": state["background"]})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    state["loops"] = _work.calibrate(float(os.environ.get("BENCH_DEFER_MS", "4")))
    state["reference"] = reference = ReferencePool(WORKERS)
    try:
        with concurrent.futures.ProcessPoolExecutor(WORKERS) as ppe:
            state["ppe"] = ppe
            # Warm every pool: all workers started and every import done before the first request.
            for _ in range(3):
                await run_ppe(Request({"type": "http"}))
                await run_anyio(Request({"type": "http"}))
                await run_reference(Request({"type": "http"}))
                await concurrency.run([partial(_work.add, 1, 2), partial(_work.add, 3, 4)])
            yield
    finally:
        reference.close()


class MiddlewareButBare:
    """`ConcurrencyMiddleware` in front of every path but ``/bare/...``, which go straight to the routes."""

    def __init__(self, app: ASGIApp, concurrency: Concurrency) -> None:
        self.app = app
        self.wrapped = ConcurrencyMiddleware(app, concurrency=concurrency)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/bare/"):
            await self.app(scope, receive, send)
        else:
            await self.wrapped(scope, receive, send)


app = Starlette(
    routes=[
        Route("/plain", plain),
        Route("/run/ours", run_ours),
        Route("/run/ppe", run_ppe),
        Route("/run/anyio", run_anyio),
        Route("/bare/plain", plain),
        Route("/bare/run/ours", run_ours),
        Route("/bare/run/reference", run_reference),
        Route("/defer", defer),
        Route("/background", background),
        Route("/stats", stats),
    ],
    middleware=[Middleware(MiddlewareButBare, concurrency=concurrency)],
    lifespan=lifespan,
)
