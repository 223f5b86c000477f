from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from starlette_concurrency import Concurrency

# Every driver that must honour the shared contract; the dask one only runs on asyncio.
CONTRACT_DRIVERS = ["process", "sync"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=CONTRACT_DRIVERS)
def driver_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def concurrency(driver_name: str) -> AsyncIterator[Concurrency]:
    async with Concurrency(driver=driver_name, workers=2, env_file=None) as facade:
        yield facade
