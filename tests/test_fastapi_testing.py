"""The README's FastAPI testing advice: override the dependency with `concurrency.driver("sync")`."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, HTTPException
from starlette.testclient import TestClient

from starlette_concurrency import Concurrency, ConcurrencyMiddleware

concurrency = Concurrency(workers=1, env_file=None)
done: list[int] = []


def get_concurrency() -> Concurrency:
    return concurrency


app = FastAPI()
app.add_middleware(ConcurrencyMiddleware, concurrency=concurrency)


@app.get("/items/{n}")
async def item(n: int, c: Annotated[Concurrency, Depends(get_concurrency)]) -> dict[str, int]:
    c.defer(functools.partial(done.append, n))
    if n < 0:
        raise HTTPException(404)
    return {"n": n}


@pytest.fixture
def client() -> Iterator[TestClient]:
    done.clear()
    with TestClient(app) as client:
        yield client
    app.dependency_overrides.clear()


def test_a_sync_view_of_the_apps_facade_defers_as_in_production(client: TestClient) -> None:
    app.dependency_overrides[get_concurrency] = lambda: concurrency.driver("sync")
    assert client.get("/items/1").status_code == 200
    assert client.get("/items/-1").status_code == 404
    concurrency.wait_deferred_blocking(timeout=10)
    # The 404's deferred work is dropped, as in production; a facade of its own (`Concurrency("sync")`),
    # which the middleware does not manage, would have run it.
    assert done == [1]
