"""The shutdown matrix's Litestar apps (see deployment_apps.py), and what tests/test_frameworks.py asks them.

- ``app``: the README's wiring, `ConcurrencyMiddleware` around the whole Litestar app (it sees the lifespan);
- ``listed``: Litestar's own ``middleware=[DefineMiddleware(ConcurrencyMiddleware, ...)]``, which never sees
  it (the facade starts at the first request; a warning says how to wire it).

Both have an ``on_startup`` hook that puts a variable in the environment: the workers of a pool that starts
after Litestar's startup see it (``/startup``).
"""

from __future__ import annotations

import os
from typing import Any

from litestar import Litestar, MediaType, Request, get
from litestar.middleware import DefineMiddleware

from starlette_concurrency import ConcurrencyMiddleware

from .deployment_apps import Deferrer, ask_workers, defer_one, facade, held_run, timed_deferral

concurrency = facade()
deferrer = Deferrer(concurrency)


def _started() -> None:
    os.environ["APP_STARTED"] = "litestar"


def _litestar(**options: Any) -> Litestar:
    @get("/defer", media_type=MediaType.TEXT)
    async def defer(request: Request[Any, Any, Any]) -> str:
        defer_one(concurrency, int(request.query_params["id"]), float(request.query_params.get("seconds", "0.02")))
        return "deferred"

    @get("/thread", media_type=MediaType.TEXT)
    async def thread() -> str:
        deferrer.start()
        return "started"

    @get("/health", media_type=MediaType.TEXT)
    async def health() -> str:
        return "ok"

    @get("/startup")
    async def startup() -> dict[str, Any]:
        return await ask_workers(concurrency)

    @get("/after")
    async def after(request: Request[Any, Any, Any]) -> dict[str, float]:
        return await timed_deferral(concurrency, request.query_params["marker"])

    @get("/hold", media_type=MediaType.TEXT)
    async def hold(request: Request[Any, Any, Any]) -> str:
        return await held_run(concurrency, request.query_params["marker"])

    return Litestar(route_handlers=[defer, thread, health, startup, after, hold], on_startup=[_started], **options)


app = ConcurrencyMiddleware(_litestar(), concurrency=concurrency)
# Litestar types its middleware's scopes more narrowly than Starlette does: its checkers object to this wiring too.
listed = _litestar(middleware=[DefineMiddleware(ConcurrencyMiddleware, concurrency=concurrency)])  # type: ignore[arg-type]
