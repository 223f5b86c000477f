"""Driver-level `stats()` of the process and fork drivers: workers, busy, queued, and what their tasks did.

MERGE NOTE: these tests need the pool branch, where the process and fork drivers fill in their own
`stats()` with a `TaskCounters`. On the obs branch alone those drivers return the default
`Stats(driver=name)` and these tests fail; run them after the merge. (The facade-level fields and the
counters' logic are tested in tests/test_stats.py; the sync driver's and the dask driver's stats are
tested on their own branches.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from starlette_concurrency import Concurrency, ProcessOptions, TaskTimeout, WorkerCrashed

from . import helpers
from .asgi import example_server

pytestmark = pytest.mark.anyio


async def wait_for(gate: Path) -> str:
    """A task that runs until the test opens its gate."""
    while not gate.exists():  # noqa: ASYNC110 - a file has no event to wait on
        await anyio.sleep(0.01)
    return "done"


@pytest.fixture(params=["process", "fork"])
async def facade(request: pytest.FixtureRequest) -> AsyncIterator[Concurrency]:
    async with Concurrency(driver=request.param, workers=2, env_file=None) as concurrency:
        yield concurrency


async def test_tasks_running_and_queued_then_completed(facade: Concurrency, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with anyio.create_task_group() as tg:
        # Two calls of six tasks on two workers. (Two calls, because the fork driver counts as queued
        # the calls' lanes waiting for a slot, not each task not yet started.)
        for _ in range(2):
            tg.start_soon(facade.run, [functools.partial(wait_for, gate) for _ in range(6)])
        await helpers.eventually(lambda: facade.stats().busy == 2 and facade.stats().queued > 0, timeout=60)
        running = facade.stats()
        assert running.workers == 2
        # Two run, the rest wait (some may sit in a worker's window of frames in flight).
        assert 1 <= running.queued <= 10
        assert running.tasks_completed == 0
        gate.touch()
    done = facade.stats()
    assert (done.busy, done.queued, done.tasks_completed, done.tasks_failed) == (0, 0, 12, 0)
    assert done.task_time_p50 is not None
    assert done.task_time_p99 is not None
    assert done.task_time_p99 >= done.task_time_p50 > 0
    assert dict(done.task_time_buckets)[math.inf] == 12
    assert done.task_time_sum > 0


async def test_failures_and_crashes_are_counted_apart(facade: Concurrency) -> None:
    tasks: list[Callable[[], object]] = [
        functools.partial(helpers.fail, "boom"),
        functools.partial(helpers.identity, 1),
        functools.partial(helpers.crash, 3),
    ]
    results = await facade.run(tasks, return_exceptions=True)
    assert isinstance(results[0], ValueError)
    assert isinstance(results[2], WorkerCrashed)
    stats = facade.stats()
    assert (stats.tasks_completed, stats.tasks_failed, stats.tasks_crashed) == (1, 1, 1)


async def test_timeouts_and_cancellations_are_counted(facade: Concurrency) -> None:
    with pytest.raises(TaskTimeout):
        await facade.run([functools.partial(helpers.sleep_then, n, 30.0) for n in range(2)], timeout=0.5)
    assert facade.stats().tasks_timed_out == 2
    with anyio.move_on_after(0.5):
        await facade.run(functools.partial(helpers.sleep_then, 0, 30.0))
    stats = facade.stats()
    assert stats.tasks_timed_out == 3
    assert stats.tasks_completed == stats.tasks_failed == stats.tasks_crashed == 0


async def test_deferred_tasks_are_counted_by_the_driver_too(facade: Concurrency) -> None:
    facade.defer([functools.partial(helpers.identity, n) for n in range(3)])
    await helpers.eventually(lambda: facade.stats().deferred_pending == 0, timeout=60)
    assert facade.stats().tasks_completed == 3


async def test_the_process_pool_counts_its_restarts(tmp_path: Path) -> None:
    async with Concurrency(
        driver="process", workers=2, options=ProcessOptions(max_tasks_per_worker=2), env_file=None
    ) as concurrency:
        await helpers.eventually(lambda: concurrency.stats().workers == 2, timeout=60)
        assert concurrency.stats().worker_restarts == 0
        await concurrency.run(functools.partial(helpers.crash, 3), return_exceptions=True)
        await helpers.eventually(lambda: concurrency.stats().worker_restarts == 1, timeout=60)
        with pytest.raises(TaskTimeout):
            await concurrency.run(functools.partial(helpers.sleep_then, 0, 30.0), timeout=0.5)
        await helpers.eventually(lambda: concurrency.stats().worker_restarts == 2, timeout=60)
        for _ in range(4):  # recycled after two tasks each
            await concurrency.run(functools.partial(helpers.identity, 1))
        await helpers.eventually(lambda: concurrency.stats().worker_restarts >= 3, timeout=60)
        await helpers.eventually(lambda: concurrency.stats().workers == 2, timeout=60)
        stats = concurrency.stats()
        assert (stats.tasks_crashed, stats.tasks_timed_out, stats.tasks_completed) == (1, 1, 4)


def test_the_example_reports_the_pools_counters(tmp_path: Path) -> None:
    with example_server(tmp_path) as example:
        assert httpx.post(f"{example.url}/api/work/run", timeout=60).status_code == 200
        assert httpx.post(f"{example.url}/api/work/crash", timeout=60).status_code == 200
        stats = httpx.get(f"{example.url}/api/stats", timeout=30).json()["stats"]
        assert stats["tasks_completed"] == 8
        assert stats["tasks_crashed"] == 1
        assert stats["task_time_p50"] is not None
        scrape = httpx.get(f"{example.url}/prometheus/", timeout=30).text
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(scrape)
            for sample in family.samples
        }
        assert samples[("starlette_concurrency_task_duration_seconds_count", (("driver", "process"),))] >= 8
        assert samples[("starlette_concurrency_tasks_total", (("driver", "process"), ("outcome", "crashed")))] == 1
