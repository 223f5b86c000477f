from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from starlette_concurrency import Concurrency
from starlette_concurrency._drivers.process import ProcessDriver

from . import helpers

# Every driver that must honour the shared contract; the dask one only runs on asyncio.
CONTRACT_DRIVERS = ["process", "fork", "sync", "dask"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=CONTRACT_DRIVERS)
def driver_name(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "dask":
        # Every facade a dask test builds connects to the session's cluster instead of starting its own.
        cluster: DaskCluster = request.getfixturevalue("dask_cluster")
        monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", cluster.address)
    return str(request.param)


@pytest.fixture
async def concurrency(driver_name: str) -> AsyncIterator[Concurrency]:
    async with Concurrency(driver=driver_name, workers=2, env_file=None) as facade:
        yield facade


@pytest.fixture
async def pool() -> AsyncIterator[tuple[Concurrency, ProcessDriver]]:
    """A facade on a two-worker process pool, and the pool; no worker may outlive it."""
    driver = ProcessDriver(2)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        yield concurrency, driver
    assert helpers.worker_children() == []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Dask distributed is built on asyncio: (dask, trio) is not a combination to test, so drop it.
    dropped = []
    for item in items:
        params = item.callspec.params if isinstance(item, pytest.Function) and hasattr(item, "callspec") else {}
        if params.get("driver_name") == "dask" and params.get("anyio_backend") == "trio":
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]


@dataclass(frozen=True)
class DaskCluster:
    """A real `dask scheduler` and two `dask worker` processes (each a nanny and its worker) on 127.0.0.1."""

    address: str
    nanny_pids: tuple[int, ...]


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    """Start the cluster once for the session (it takes seconds) and stop every process of it at the end."""
    import distributed

    directory = tmp_path_factory.mktemp("dask")
    scheduler_file = directory / "scheduler.json"
    dask = str(Path(sys.executable).parent / "dask")
    # The workers import the tasks' modules (tests.helpers) by name, as an app's workers must.
    root = str(Path(__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with (directory / "cluster.log").open("wb") as log:

        def spawn(*args: str) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [dask, *args], env=env, cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

        # Port 0 everywhere: the scheduler writes the address it got to the scheduler file.
        scheduler = spawn("scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                          "--scheduler-file", str(scheduler_file))  # fmt: skip
        workers: list[subprocess.Popen[bytes]] = []
        try:
            address = helpers.scheduler_address(scheduler_file, scheduler)
            for n in range(2):
                workers.append(spawn("worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
                                     "--name", f"worker-{n}"))  # fmt: skip
            with distributed.Client(address, timeout=30) as client:  # type: ignore[no-untyped-call]
                client.wait_for_workers(2, timeout=60)
            yield DaskCluster(address, tuple(worker.pid for worker in workers))
        finally:
            # Workers first (each nanny stops its worker), then the scheduler they would otherwise wait for.
            for group in (workers, [scheduler]):
                for process in group:
                    process.send_signal(signal.SIGTERM)
                for process in group:
                    try:
                        process.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
