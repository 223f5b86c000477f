"""The same idea with FastAPI: `uvicorn examples.fastapi_app:app`."""

from __future__ import annotations

import functools

from fastapi import FastAPI

from starlette_concurrency import Concurrency, ConcurrencyMiddleware

from .work import count_primes, count_rows, report

concurrency = Concurrency()

app = FastAPI()
app.add_middleware(ConcurrencyMiddleware, concurrency=concurrency)


@app.get("/")
async def dashboard() -> dict[str, object]:
    users, primes = await concurrency.run(
        [functools.partial(count_rows, "users"), functools.partial(count_primes, 100_000)]
    )
    concurrency.defer(functools.partial(report, "fastapi.dashboard", 1))
    return {"users": users, "primes": primes}
