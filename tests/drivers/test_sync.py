"""The `sync` driver beyond the shared contract: its stats, and which exceptions it leaves alone."""

from __future__ import annotations

import functools

import anyio
import pytest

from starlette_concurrency import Concurrency, RemoteError, TaskTimeout
from starlette_concurrency._drivers.sync import SyncDriver

from .. import helpers

pytestmark = pytest.mark.anyio


async def test_stats_count_what_the_tasks_did() -> None:
    driver = SyncDriver()
    assert driver.stats().tasks_completed == 0
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        await concurrency.run([lambda: 1, functools.partial(helpers.fail, "no"), lambda: 3], return_exceptions=True)
        with pytest.raises(TaskTimeout):
            await concurrency.run([functools.partial(helpers.async_sleep_then, 1, 5), lambda: 2], timeout=0.2)
    stats = driver.stats()
    assert (stats.driver, stats.workers, stats.busy, stats.queued) == ("sync", 1, 0, 0)
    assert (stats.tasks_completed, stats.tasks_failed, stats.tasks_crashed, stats.tasks_timed_out) == (2, 1, 0, 2)
    assert stats.task_time_p50 is not None
    assert stats.task_time_p99 is not None


async def test_stats_show_the_task_running_and_those_waiting() -> None:
    driver = SyncDriver()
    release = anyio.Event()

    async def hold() -> str:
        await release.wait()
        return "held"

    async with Concurrency(driver=driver, env_file=None) as concurrency, anyio.create_task_group() as tg:
        tg.start_soon(concurrency.run, [hold, lambda: 1, lambda: 2])
        await helpers.eventually(lambda: driver.stats().busy == 1)
        assert driver.stats().queued == 2
        release.set()
    assert (driver.stats().busy, driver.stats().queued, driver.stats().tasks_completed) == (0, 0, 3)


async def test_a_base_exception_of_a_coroutine_task_is_an_outcome() -> None:
    class Abort(BaseException):
        pass

    async def abort() -> None:
        raise Abort("stop")

    async with Concurrency(driver="sync", env_file=None) as concurrency:
        with pytest.raises(RemoteError) as info:
            await concurrency.run(abort)
    assert info.value.type_name.endswith("Abort")
    assert "raise Abort" in info.value.traceback


async def test_keyboard_interrupt_stays_the_servers() -> None:
    async with Concurrency(driver="sync", env_file=None) as concurrency:
        with pytest.raises(KeyboardInterrupt):
            await concurrency.run(helpers.interrupt)
