"""The contract every driver honours (DESIGN §2), run against each built-in driver on asyncio and trio.

The tests themselves are the public kit, `starlette_concurrency.testing.DriverContract`; here each
built-in driver is bound to it by name, as `Concurrency(driver="process")` would choose it.
"""

from __future__ import annotations

import sys

import pytest

from starlette_concurrency.testing import DriverContract

from .conftest import DaskCluster


def _under_coverage() -> bool:
    coverage = sys.modules.get("coverage")
    return coverage is not None and coverage.Coverage.current() is not None


class TestProcess(DriverContract):
    @pytest.fixture
    def driver(self) -> str:
        return "process"


class TestFork(DriverContract):
    # Under coverage every forked child starts a Coverage of its own and writes a data file as it
    # exits (patch = ["fork", "_exit"]): a thousand children took past the 120 s timeout on a loaded
    # 2-core machine. A hundred go through the same rolling cap, many times over, and still measure
    # the child's side; without coverage the test sends the kit's full thousand.
    many_tasks = 100 if _under_coverage() else DriverContract.many_tasks

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
