"""The shutdown matrix's ASGI app: Starlette with `ConcurrencyMiddleware` (see deployment_apps.py)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from starlette_concurrency import ConcurrencyMiddleware

from .deployment_apps import Deferrer, defer_one, facade

concurrency = facade()
deferrer = Deferrer(concurrency)


async def defer(request: Request) -> Response:
    task_id, seconds = int(request.query_params["id"]), float(request.query_params.get("seconds", "0.02"))
    defer_one(concurrency, task_id, seconds)
    return PlainTextResponse("deferred")


async def thread(request: Request) -> Response:
    deferrer.start()
    return PlainTextResponse("started")


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[Route("/defer", defer), Route("/thread", thread), Route("/health", health)],
    middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)],
)
