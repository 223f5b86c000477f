"""`Concurrency.stats()` at the facade level, and the `TaskCounters` / `Stats` logic drivers use to fill it.

The driver-level figures (workers, busy, queued, crashes, restarts) of the process driver are in
tests/test_driver_stats.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from starlette_concurrency import Concurrency, ConcurrencyMiddleware, Outcome, Stats, WorkerCrashed
from starlette_concurrency._stats import DURATION_BOUNDS, TaskCounters

from . import helpers
from .asgi import client, lifespan

pytestmark = pytest.mark.anyio


async def wait_for(gate: Path) -> str:
    """A deferred task that finishes when the test opens its gate (cooperative, for the sync driver too)."""
    while not gate.exists():  # noqa: ASYNC110 - a file has no event to wait on
        await anyio.sleep(0.01)
    return "done"


# TaskCounters and Stats --------------------------------------------------------------------------------


def test_counters_count_each_outcome() -> None:
    counters = TaskCounters()
    counters.record(Outcome(value=1), 0.5)
    counters.record(Outcome(value=None))  # a driver that cannot time its tasks
    counters.record(Outcome(error=ValueError("no")), 0.25)
    counters.record(Outcome(error=WorkerCrashed("gone", signal=9)), 1.0)
    counters.timed_out += 2
    counters.restarts += 3
    stats = counters.snapshot("process", workers=4, busy=1, queued=7)
    assert stats == Stats(
        driver="process",
        workers=4,
        busy=1,
        queued=7,
        tasks_completed=2,
        tasks_failed=1,
        tasks_crashed=1,
        tasks_timed_out=2,
        worker_restarts=3,
        task_time_p50=0.5,
        task_time_p99=1.0,
        task_time_buckets=stats.task_time_buckets,
        task_time_sum=1.75,
    )


def test_percentiles_cover_a_window_of_recent_tasks() -> None:
    counters = TaskCounters(window=100)
    assert counters.snapshot("sync").task_time_p50 is None
    assert counters.snapshot("sync").task_time_p99 is None
    for seconds in range(1000, 0, -1):  # the oldest ones are the slowest, and fall out of the window
        counters.record(Outcome(), seconds / 1000)
    stats = counters.snapshot("sync")
    assert stats.task_time_p50 == 0.051
    assert stats.task_time_p99 == 0.1
    assert len(counters.durations) == 100


def test_the_histogram_is_cumulative_and_counts_every_timed_task() -> None:
    counters = TaskCounters(window=2)
    assert counters.snapshot("sync") == Stats(driver="sync")  # no histogram before the first timed task
    counters.record(Outcome())  # nor for a task the driver did not time
    assert counters.snapshot("sync").task_time_buckets == ()
    for seconds in (0.001, 0.005, 0.0051, 0.3, 59.0, 3600.0):  # 0.005 is at most 0.005: in that bucket
        counters.record(Outcome(), seconds)
    buckets = dict(counters.snapshot("sync").task_time_buckets)
    assert buckets[0.005] == 2
    assert buckets[0.01] == 3
    assert buckets[0.25] == 3
    assert buckets[0.5] == 4
    assert buckets[60.0] == 5
    assert buckets[math.inf] == 6  # the whole history, not the window of two
    assert list(buckets) == [*DURATION_BOUNDS, math.inf]
    assert counters.snapshot("sync").task_time_sum == pytest.approx(3659.3111)


def test_a_snapshot_is_frozen() -> None:
    stats = TaskCounters().snapshot("sync")
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.busy = 3  # type: ignore[misc]


# The facade ------------------------------------------------------------------------------------------


@pytest.fixture(params=["sync", "process"])
def facade_driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def facade(facade_driver: str) -> AsyncIterator[Concurrency]:
    async with Concurrency(driver=facade_driver, workers=2, env_file=None) as concurrency:
        yield concurrency


def test_stats_before_start_and_after_close_are_zero_and_never_raise() -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    assert concurrency.stats().driver == "sync"
    assert concurrency.stats().deferred_pending == 0
    concurrency.driver("process")  # created, never started: still cheap to ask
    assert concurrency.driver("process").stats().driver == "process"


async def test_stats_after_close() -> None:
    async with Concurrency(driver="sync", env_file=None) as concurrency:
        await concurrency.run(lambda: 1)
    assert concurrency.stats() == Stats(driver="sync")


async def test_deferred_work_is_pending_until_it_finishes(facade: Concurrency, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    facade.defer([functools.partial(wait_for, gate) for _ in range(3)])
    assert facade.stats().deferred_pending == 3
    assert facade.stats().driver == facade.driver_name
    facade.defer(functools.partial(wait_for, gate))
    assert facade.stats().deferred_pending == 4
    # The count is the facade's, on all its drivers: another driver's view reports it too.
    assert facade.driver("sync" if facade.driver_name == "process" else "process").stats().deferred_pending == 4
    # From another thread too (a metrics exporter's, say): no event loop needed.
    assert (await anyio.to_thread.run_sync(facade.stats)).deferred_pending == 4
    gate.touch()
    await helpers.eventually(lambda: facade.stats().deferred_pending == 0, timeout=60)


async def test_failed_deferred_work_is_no_longer_pending(facade: Concurrency) -> None:
    facade.defer([functools.partial(helpers.fail, "deferred failure"), functools.partial(helpers.identity, 1)])
    await helpers.eventually(lambda: facade.stats().deferred_pending == 0, timeout=60)


async def test_a_requests_deferred_work_counts_from_defer_until_it_ran(facade_driver: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    facade = Concurrency(driver=facade_driver, workers=2, env_file=None)  # the app's lifespan starts it
    seen: list[int] = []

    async def deferring(request: Request) -> Response:
        facade.defer([functools.partial(wait_for, gate), functools.partial(wait_for, gate)])
        seen.append(facade.stats().deferred_pending)
        return PlainTextResponse("ok", status_code=int(request.query_params.get("status", "200")))

    app = Starlette(routes=[Route("/", deferring)], middleware=[Middleware(ConcurrencyMiddleware, concurrency=facade)])
    async with lifespan(app), client(app) as http:
        assert (await http.get("/")).status_code == 200
        assert seen == [2]  # accepted while the request ran, before its batch started
        assert facade.stats().deferred_pending == 2  # the response is out; the batch waits for the gate
        # A failed request's batch is skipped (no `always`): it is not pending after the response.
        assert (await http.get("/", params={"status": "500"})).status_code == 500
        assert seen == [2, 4]
        assert facade.stats().deferred_pending == 2
        gate.touch()
        await helpers.eventually(lambda: facade.stats().deferred_pending == 0, timeout=60)
