"""The `dask` driver on real clusters: the session's `dask scheduler` + two `dask worker`s, and an embedded one."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import anyio
import dask
import distributed
import httpx
import psutil
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from starlette_concurrency import (
    Concurrency,
    ConcurrencyError,
    ConcurrencyMiddleware,
    ConfigurationError,
    DaskOptions,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
)
from starlette_concurrency._drivers.dask import DaskDriver
from starlette_concurrency._stats import Stats

from .. import helpers
from ..conftest import DaskCluster

pytestmark = pytest.mark.anyio


def _on(address: str) -> Concurrency:
    """A facade on the dask driver, connected to the cluster at `address`."""
    return Concurrency(driver="dask", options=DaskOptions(address=address), env_file=None)


@pytest.fixture
def anyio_backend() -> str:
    # Dask distributed runs on asyncio only; the one trio test below asks for trio itself.
    return "asyncio"


# Tasks: module-level, so that the workers import them by name from this module.


def whereabouts(seconds: float) -> tuple[int, int, str, str]:
    """Say which process, nanny and Dask worker ran the task; linger so that both workers get some."""
    import time

    time.sleep(seconds)
    worker = distributed.get_worker()
    return os.getpid(), os.getppid(), worker.address, str(worker.name)


def fresh_token() -> str:
    return uuid.uuid4().hex


class LockedError(Exception):
    """An exception that cannot be pickled at all: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_locked_error() -> None:
    raise LockedError("cannot travel")


# On the session's cluster (the scheduler and two workers are real `dask` CLI processes).


async def test_tasks_run_in_the_workers_of_the_cluster(dask_cluster: DaskCluster) -> None:
    async with _on(dask_cluster.address) as concurrency:
        results = await concurrency.run([functools.partial(whereabouts, 0.3) for _ in range(6)])
    pids = {pid for pid, _, _, _ in results}
    nannies = {nanny for _, nanny, _, _ in results}
    names = {name for _, _, _, name in results}
    assert nannies == set(dask_cluster.nanny_pids), "the tasks did not run under the two `dask worker` processes"
    assert len(pids) == 2
    assert os.getpid() not in pids
    assert names == {"worker-0", "worker-1"}
    for pid, nanny, address, _ in results:
        assert address.startswith("tcp://127.0.0.1:")
        assert psutil.Process(pid).ppid() == nanny


async def test_identical_closures_are_not_merged(dask_cluster: DaskCluster) -> None:
    async with _on(dask_cluster.address) as concurrency:
        same = functools.partial(fresh_token)
        tokens = await concurrency.run([same] * 5)
        again = await concurrency.run(same)
    assert len(set(tokens)) == 5, "Dask merged identical tasks into one"
    assert again not in tokens


async def test_the_address_comes_from_the_argument_then_the_environment(
    dask_cluster: DaskCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", dask_cluster.address)
    concurrency = Concurrency(driver="dask", env_file=None)
    assert concurrency.settings.options_for(DaskOptions).address == dask_cluster.address
    async with concurrency:
        assert await concurrency.run(lambda: "via the environment") == "via the environment"
    explicit = Concurrency(driver="dask", options=DaskOptions(address="tcp://10.1.2.3:8786"), env_file=None)
    assert explicit.settings.options_for(DaskOptions).address == "tcp://10.1.2.3:8786"


async def test_exceptions_keep_their_type_and_the_worker_traceback(dask_cluster: DaskCluster) -> None:
    async with _on(dask_cluster.address) as concurrency:
        results = await concurrency.run(
            {
                "plain": functools.partial(helpers.fail, "boom"),
                "two": helpers.raise_two_argument_error,
                "locked": raise_locked_error,
            },
            return_exceptions=True,
        )
    plain = results["plain"]
    assert type(plain) is ValueError
    assert str(plain) == "boom"
    assert isinstance(plain.__cause__, RemoteTraceback)
    assert 'helpers.py", line' in plain.__cause__.traceback
    assert "in fail" in plain.__cause__.traceback
    # distributed makes exceptions pickle by their attributes (tblib), so even this one travels as itself.
    two = results["two"]
    assert isinstance(two, helpers.TwoArgumentError)
    assert two.code == 418
    # ... but one that cannot be pickled at all comes back as a stand-in, as with the process driver.
    locked = results["locked"]
    assert isinstance(locked, RemoteError)
    assert locked.type_name == "tests.drivers.test_dask.LockedError"
    assert locked.message == "cannot travel"
    assert "in raise_locked_error" in locked.traceback


async def test_an_unpicklable_closure_runs_nothing(dask_cluster: DaskCluster, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    lock = threading.Lock()
    async with _on(dask_cluster.address) as concurrency:
        with pytest.raises(SerializationError, match=r"task 'locked' \(<lambda>\) cannot be pickled"):
            await concurrency.run(
                {"touch": functools.partial(helpers.sleep_then_touch, marker, 0), "locked": lambda: lock.locked()}
            )
        with pytest.raises(SerializationError, match=r"the result of task 0 \(\w+\) cannot be pickled"):
            await concurrency.run(threading.Lock)
        await anyio.sleep(0.5)
    assert not marker.exists()


async def test_a_timeout_cancels_running_and_queued_tasks(dask_cluster: DaskCluster, tmp_path: Path) -> None:
    markers = [tmp_path / f"marker-{n}" for n in range(6)]
    driver = DaskDriver(DaskOptions(address=dask_cluster.address))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        # Two run (one per worker thread), four wait in the queue.
        tasks = [functools.partial(helpers.sleep_then_touch, marker, 1.0) for marker in markers]
        with pytest.raises(TaskTimeout, match="stopped 6 unfinished task"):
            await concurrency.run(tasks, timeout=0.3)
        await anyio.sleep(1.5)
        assert not [marker.name for marker in markers if marker.exists()]

        def ours(dask_scheduler: Any) -> list[str]:
            return [key for key in dask_scheduler.tasks if str(key).startswith("concurrency-sleep_then_touch-")]

        assert await driver.client.run_on_scheduler(ours) == [], "the futures were not released"
        assert await concurrency.run(lambda: "still works") == "still works"


async def test_stats_count_the_tasks_and_see_the_cluster(dask_cluster: DaskCluster) -> None:
    driver = DaskDriver(DaskOptions(address=dask_cluster.address))
    assert driver.stats() == Stats(driver="dask")
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        assert driver.stats().workers == 2
        async with anyio.create_task_group() as group:
            # Four tasks on two single-threaded workers: two run, two wait.
            group.start_soon(concurrency.run, [functools.partial(helpers.async_sleep_then, n, 1.0) for n in range(4)])
            await helpers.eventually(lambda: driver.stats().queued > 0)
            assert (driver.stats().busy, driver.stats().queued) == (2, 2)
        done = driver.stats()
        assert (done.busy, done.queued, done.tasks_completed) == (0, 0, 4)
        assert done.task_time_p50 is not None
        assert done.task_time_p99 is not None
        assert done.task_time_p99 >= done.task_time_p50 >= 0.99, "the run time measured in the worker is too short"
        await concurrency.run([functools.partial(helpers.fail, "boom"), lambda: 1], return_exceptions=True)
        with pytest.raises(TaskTimeout):
            await concurrency.run([functools.partial(helpers.async_sleep_then, n, 30.0) for n in range(3)], timeout=0.5)
        final = driver.stats()
    assert (final.tasks_completed, final.tasks_failed, final.tasks_timed_out) == (5, 1, 3)
    assert (final.busy, final.queued, final.worker_restarts) == (0, 0, 0)


async def test_deferred_work_runs_on_the_cluster_after_the_response(dask_cluster: DaskCluster, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    concurrency = _on(dask_cluster.address)

    async def endpoint(request: Request) -> PlainTextResponse:
        concurrency.defer(functools.partial(helpers.sleep_then_touch, marker, 0.1))
        return PlainTextResponse("accepted")

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)]
    )
    async with concurrency:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.get("/")
        assert response.text == "accepted"
        await helpers.eventually(marker.exists)


# On a cluster of its own.


async def test_an_embedded_cluster_lives_with_the_facade() -> None:
    driver = DaskDriver(workers=2)
    # With no retries, a worker's death fails the task at once (the default retries it on 3 more workers).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        async with Concurrency(driver=driver, env_file=None) as concurrency:
            before = set((await driver.client.run(os.getpid)).values())
            children = {process.pid for process in psutil.Process().children(recursive=True)}
            assert len(before) == 2
            assert before <= children, "the embedded workers are not processes of this one"
            with pytest.raises(WorkerCrashed, match="task 'crash'"):
                await concurrency.run({"crash": functools.partial(helpers.crash, 3), "fine": lambda: 1})
            assert driver.stats().tasks_crashed == 1
            await driver.client.wait_for_workers(2, timeout=60)
            after = set((await driver.client.run(os.getpid)).values())
            assert len(after - before) == 1, "the crashed worker was not replaced"
            assert await concurrency.run(lambda: "after the crash") == "after the crash"
    assert driver.client is None
    assert not [pid for pid in before | after if _alive(pid)], "a worker outlived the facade"


def _alive(pid: int) -> bool:
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_an_unreachable_scheduler_is_reported() -> None:
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        concurrency = _on(f"tcp://127.0.0.1:{_unused_port()}")
        with pytest.raises(ConcurrencyError, match="cannot reach the dask scheduler"):
            await concurrency.run(lambda: 1)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_on_trio_the_driver_says_it_needs_asyncio() -> None:
    with pytest.raises(ConfigurationError, match="asyncio only"):
        async with _on("tcp://127.0.0.1:8786"):
            pass


def test_without_distributed_choosing_the_driver_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # what `import distributed` does when not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'starlette-concurrency\[dask\]'"):
        Concurrency(driver="dask", env_file=None)


def test_importing_the_package_does_not_import_dask() -> None:
    code = (
        "import sys, starlette_concurrency\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('dask', 'distributed')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
