"""The contract every driver honours (DESIGN §2), run against each built-in driver on asyncio and trio.

The tests themselves are the public kit, `starlette_concurrency.testing.DriverContract`; here each
built-in driver is bound to it by name, as `Concurrency(driver="process")` would choose it.
"""

from __future__ import annotations

import pytest

from starlette_concurrency.testing import DriverContract

from .conftest import DaskCluster


class TestProcess(DriverContract):
    @pytest.fixture
    def driver(self) -> str:
        return "process"


class TestFork(DriverContract):
    @pytest.fixture
    def driver(self) -> str:
        return "fork"


class TestSync(DriverContract):
    @pytest.fixture
    def driver(self) -> str:
        return "sync"


class TestDask(DriverContract):
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"  # Dask distributed is built on asyncio: trio is not a combination to test

    @pytest.fixture
    def driver(self, dask_cluster: DaskCluster, monkeypatch: pytest.MonkeyPatch) -> str:
        # Every facade a test builds connects to the session's cluster instead of starting its own.
        monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", dask_cluster.address)
        return "dask"
