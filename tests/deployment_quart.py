"""The shutdown matrix's Quart app (see deployment_apps.py): the README's wiring, `ConcurrencyMiddleware` around
``app.asgi_app``. A ``before_serving`` function puts a variable in the environment: the workers of a pool that
starts after Quart's startup see it (``/startup``, asked by tests/test_frameworks.py).
"""

from __future__ import annotations

import os
from typing import Any

from quart import Quart, request

from starlette_concurrency import ConcurrencyMiddleware

from .deployment_apps import Deferrer, ask_workers, defer_one, facade, held_run, timed_deferral

concurrency = facade()
deferrer = Deferrer(concurrency)
app = Quart(__name__)
app.asgi_app = ConcurrencyMiddleware(app.asgi_app, concurrency=concurrency)  # type: ignore[method-assign, assignment]


@app.before_serving
async def started() -> None:
    os.environ["APP_STARTED"] = "quart"


@app.get("/defer")
async def defer() -> str:
    defer_one(concurrency, int(request.args["id"]), float(request.args.get("seconds", "0.02")))
    return "deferred"


@app.get("/thread")
async def thread() -> str:
    deferrer.start()
    return "started"


@app.get("/health")
async def health() -> str:
    return "ok"


@app.get("/startup")
async def startup() -> dict[str, Any]:
    return await ask_workers(concurrency)


@app.get("/after")
async def after() -> dict[str, float]:
    return await timed_deferral(concurrency, request.args["marker"])


@app.get("/hold")
async def hold() -> str:
    return await held_run(concurrency, request.args["marker"])
