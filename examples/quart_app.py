"""The dashboard in Quart, `ConcurrencyMiddleware` around its ASGI app (README: "Litestar and Quart").

    uvicorn examples.quart_app:app      # or Quart's own server: hypercorn examples.quart_app:app

Quart speaks the lifespan protocol: the workers start once its ``before_serving`` functions have run,
and deferred work is drained at shutdown.
"""

from __future__ import annotations

import functools

from quart import Quart

from examples.work import count_rows, report
from starlette_concurrency import Concurrency, ConcurrencyMiddleware

concurrency = Concurrency()
app = Quart(__name__)
app.asgi_app = ConcurrencyMiddleware(app.asgi_app, concurrency=concurrency)  # type: ignore[method-assign, assignment]


@app.get("/")
async def dashboard() -> dict[str, dict[str, int]]:
    users, orders = await concurrency.run([lambda: count_rows("users"), lambda: count_rows("orders")])
    concurrency.defer(functools.partial(report, "dashboard.users", users["count"]))  # after the response, if below 400
    return {"users": users, "orders": orders}
