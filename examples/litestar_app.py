"""The dashboard in Litestar, `ConcurrencyMiddleware` around the whole app (README: "Litestar and Quart").

    uvicorn examples.litestar_app:app

Litestar hands its own ``middleware=[...]`` only ``http`` and ``websocket`` scopes: wrapped that way,
the middleware would never see the lifespan. Wrapped around the app, it starts the workers once
Litestar's own startup has completed and drains deferred work at shutdown.
"""

from __future__ import annotations

import functools

from litestar import Litestar, get

from examples.work import count_rows, report
from starlette_concurrency import Concurrency, ConcurrencyMiddleware

concurrency = Concurrency()


@get("/")
async def dashboard() -> dict[str, dict[str, int]]:
    counts = await concurrency.run({"users": lambda: count_rows("users"), "orders": lambda: count_rows("orders")})
    concurrency.defer(functools.partial(report, "dashboard.users", counts["users"]["count"]))  # after the response
    return counts


litestar_app = Litestar(route_handlers=[dashboard])
app = ConcurrencyMiddleware(litestar_app, concurrency=concurrency)  # serve `app`: uvicorn examples.litestar_app:app
