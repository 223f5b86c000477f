"""The multiplexed pool of the `process` driver: shared workers, priorities, frames that name their tasks."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import pickle
import time
from pathlib import Path

import anyio
import anyio.from_thread
import pytest

from starlette_concurrency import Concurrency, ProcessOptions, TaskTimeout, WorkerCrashed
from starlette_concurrency._drivers.process import ProcessDriver
from starlette_concurrency._tasks import Outcome, Task
from starlette_concurrency._wire.protocol import (
    HEADER,
    ID_SIZE,
    OK,
    RESEND,
    ProtocolError,
    answer,
    answer_id,
    frame,
    resend_body,
)

from .. import helpers

pytestmark = pytest.mark.anyio


def wait_for(path: Path) -> int:
    """Block until `path` exists (at most a minute); return this worker's pid."""
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def report_and_wait_for(started: Path, path: Path) -> int:
    partial = started.with_suffix(".partial")
    partial.write_text(str(os.getpid()))
    partial.rename(started)  # whole, or not there at all
    return wait_for(path)


async def test_a_finished_worker_serves_the_next_call_while_its_call_mate_still_runs(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path
) -> None:
    concurrency, driver = pool
    release = tmp_path / "release"
    first: list[int] = []

    async def slow_and_fast() -> None:
        first.extend(await concurrency.run([functools.partial(wait_for, release), helpers.pid]))

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_and_fast)
                await helpers.eventually(lambda: driver.stats().tasks_completed >= 1)  # `fast` answered
                second = await concurrency.run(helpers.pid)
                assert not release.exists()  # the slow task is still blocked: the call did not wait for it
                release.touch()
    finally:
        release.touch()
    slow_pid, fast_pid = first
    assert second == fast_pid != slow_pid


async def test_run_beside_deferred_work_that_fills_every_worker_returns_before_it_ends(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path
) -> None:
    concurrency, driver = pool
    release = tmp_path / "release"
    tasks = [Task(i, functools.partial(wait_for, release)) for i in range(2)]
    outcomes: list[Outcome | None] = [None, None]
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(driver.execute_deferred, tasks, outcomes)
                await helpers.eventually(lambda: driver.stats().busy >= 1)
                assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]
                assert outcomes == [None, None]  # the deferred work is still running (or queued)
                release.touch()
    finally:
        release.touch()
    assert all(outcome is not None and outcome.error is None for outcome in outcomes)


def _result_pipe_in_worker(driver: ProcessDriver, pid: int) -> str:
    """The path, under /proc, of the worker's write end of its result pipe."""
    worker = next(worker for worker in driver._pool.workers if worker.pid == pid)
    inode = os.fstat(worker.from_child).st_ino
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        if os.stat(path).st_ino == inode:
            return path
    raise AssertionError("the worker does not hold its result pipe")


@pytest.mark.parametrize(
    "stray",
    [
        answer(OK, 12345, pickle.dumps("a wrong answer")),
        b"\x00\x00\x00\x10garbage bytes!!!",
        frame(RESEND, resend_body(12345, 1)),
    ],
    ids=["frame-naming-another-task", "garbage", "resend-naming-another-task"],
)
async def test_a_stray_frame_in_a_workers_pipe_never_produces_a_wrong_answer(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path, stray: bytes
) -> None:
    concurrency, driver = pool
    started, release = tmp_path / "started", tmp_path / "release"
    results: list[object] = []

    async def call() -> None:
        results.extend(
            await concurrency.run(
                [functools.partial(report_and_wait_for, started, release), lambda: "right"], return_exceptions=True
            )
        )

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await helpers.eventually(started.exists)
                pid = int(started.read_text())
                # Any process of the same user can do this; here, the test process.
                Path(_result_pipe_in_worker(driver, pid)).write_bytes(stray)
                await helpers.eventually(lambda: helpers.gone(pid))
                release.touch()
    finally:
        release.touch()
    crashed, right = results
    assert isinstance(crashed, WorkerCrashed)
    assert "protocol" in str(crashed)
    assert right == "right"
    assert "a wrong answer" not in repr(results)
    assert pid not in driver.pids
    assert len(driver.pids) == 2
    assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]


async def test_a_timeout_stops_only_the_abandoned_task_and_gives_the_others_back(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path
) -> None:
    concurrency, driver = pool
    release = tmp_path / "release"
    started = tmp_path / "started"
    with pytest.raises(TaskTimeout):
        await concurrency.run(functools.partial(report_and_wait_for, started, release), timeout=1)
    killed = int(started.read_text())
    assert helpers.gone(killed)
    assert killed not in driver.pids
    assert driver.stats().tasks_timed_out == 1
    assert await concurrency.run([functools.partial(helpers.identity, i) for i in range(50)]) == list(range(50))


def test_one_pool_serves_one_event_loop_after_another_on_asyncio_and_trio() -> None:
    # Each loop ends before the next starts (each test, each script's asyncio.run): the facade adopts each
    # loop in turn, the pool starts in it, and its workers stop with it: nothing stays bound to an ended loop.
    driver = ProcessDriver(2)
    concurrency = Concurrency(driver=driver, env_file=None)

    async def use() -> tuple[list[int], int]:
        results = await concurrency.run([functools.partial(helpers.identity, i) for i in range(20)])
        return results, len(driver.pids)

    try:
        for backend in ["asyncio", "trio", "asyncio", "trio"]:
            assert anyio.run(use, backend=backend) == (list(range(20)), 2)
            assert driver.pids == []
            assert helpers.worker_children() == []
    finally:
        anyio.run(concurrency.aclose, backend="trio")
    assert helpers.worker_children() == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_starting_and_replacing_workers_never_blocks_the_event_loop(tmp_path: Path) -> None:
    from blockbuster import blockbuster_ctx

    with blockbuster_ctx():
        driver = ProcessDriver(2)
        async with Concurrency(driver=driver, env_file=None) as concurrency:  # started lazily below, not here
            assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]
            with pytest.raises(WorkerCrashed):
                await concurrency.run(functools.partial(helpers.crash, 3))
            with pytest.raises(TaskTimeout):
                await concurrency.run(functools.partial(wait_for, tmp_path / "never"), timeout=0.5)
            assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]
            assert len(driver.pids) == 2
        await asyncio.sleep(0)


async def test_stats_and_lifecycle_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="starlette_concurrency")
    driver = ProcessDriver(2, ProcessOptions(max_tasks_per_worker=3))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        await concurrency.run([functools.partial(helpers.identity, i) for i in range(7)])
        with pytest.raises(WorkerCrashed):
            await concurrency.run(functools.partial(helpers.crash, 3))
        with pytest.raises(ValueError, match="boom"):
            await concurrency.run(functools.partial(helpers.fail, "boom"))
        stats = driver.stats()
    assert stats.driver == "process"
    assert stats.workers == 2
    assert (stats.tasks_completed, stats.tasks_failed, stats.tasks_crashed) == (7, 1, 1)
    assert stats.worker_restarts >= 2  # the crash, and at least one recycle after three tasks
    assert stats.task_time_p50 is not None
    records = [record for record in caplog.records if record.name == "starlette_concurrency"]
    assert any("started with 2 workers" in record.getMessage() for record in records)
    crash = next(record for record in records if "crashed" in record.getMessage())
    assert crash.levelno == logging.WARNING
    assert (crash.driver, crash.task, crash.task_key) == ("process", "task 0 (partial(crash))", 0)  # type: ignore[attr-defined]
    assert isinstance(crash.worker_pid, int)  # type: ignore[attr-defined]
    assert any("recycle" in record.getMessage() for record in records)


def test_a_pool_in_use_by_a_running_loop_refuses_another_loop_clearly() -> None:
    driver = ProcessDriver(1)
    with anyio.from_thread.start_blocking_portal() as portal:  # a loop that keeps running in its thread
        portal.call(driver.start)
        outcomes: list[Outcome | None] = [None]
        portal.call(driver.execute, [Task(0, functools.partial(int, 1))], outcomes)
        assert outcomes == [Outcome(value=1)]

        async def elsewhere() -> None:
            with pytest.raises(RuntimeError, match="another event loop that is still running"):
                await driver.execute([Task(0, functools.partial(int, 2))], [None])

        anyio.run(elsewhere)
        portal.call(driver.aclose)
    assert helpers.worker_children() == []


def test_the_facade_forwards_a_call_from_another_loop_to_the_loop_hosting_its_pool() -> None:
    concurrency = Concurrency(driver=ProcessDriver(1), env_file=None)
    with anyio.from_thread.start_blocking_portal() as portal:  # a loop that keeps running in its thread
        assert portal.call(concurrency.run, lambda: 1) == 1
        assert anyio.run(concurrency.run, lambda: 2) == 2  # no RuntimeError: the facade hands it over
        portal.call(concurrency.aclose)
    assert helpers.worker_children() == []


def test_an_answer_names_its_task_or_is_a_protocol_error() -> None:
    body = answer(OK, 42, b"result")[HEADER.size + 1 :]
    assert answer_id(body) == 42
    assert body[ID_SIZE:] == b"result"
    with pytest.raises(ProtocolError, match="too short to name its task"):
        answer_id(body[: ID_SIZE - 1])


async def test_a_first_task_that_spends_long_importing_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    from .. import slow_import_target  # the parent imports it once (1.2 s); each fresh worker does too

    caplog.set_level(logging.WARNING, logger="starlette_concurrency")
    async with Concurrency(
        driver=ProcessDriver(1, ProcessOptions(max_tasks_per_worker=1)), env_file=None
    ) as concurrency:
        assert await concurrency.run(slow_import_target.answer) == 42
        assert await concurrency.run(slow_import_target.answer) == 42  # a fresh worker, which imports it again
    slow = [record for record in caplog.records if "importing before its first task" in record.getMessage()]
    assert len(slow) == 1, [record.getMessage() for record in caplog.records]
    assert "tests" in slow[0].getMessage()  # names what it imported
    assert "preload" in slow[0].getMessage()  # and says what to do
