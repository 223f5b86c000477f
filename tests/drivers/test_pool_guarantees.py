"""The pool's guarantees on real workers: one test per defect of release 2's pool (issue 20), each failing there.

At most once, bounded, no head-of-line blocking, no silent hang, transient failures stay transient,
cheap cancellation, truthful stats.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from starlette_concurrency import Concurrency, ProcessOptions, SerializationError, WorkerCrashed, WorkerStartFailed
from starlette_concurrency._drivers.process import ProcessDriver

from .. import helpers

if TYPE_CHECKING:
    from starlette_concurrency._drivers.process._handle import Worker
from .test_pool import _result_pipe_in_worker, report_and_wait_for

pytestmark = pytest.mark.anyio


def append(path: Path, text: str) -> str:
    """Record that this task ran (one line per run), and return its text."""
    with open(path, "a") as file:
        file.write(text + "\n")
    return text


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def test_a_task_queued_behind_a_cancelled_one_never_runs_twice(tmp_path: Path) -> None:
    # Defect 1: [a1, x0, b0, c0] in one worker, call X cancelled while a1 runs, the loop busy when a1
    # ends: release 2 killed the worker at a1's answer and ran b0 and c0 (already run) again.
    runs = tmp_path / "runs"
    started_z, release_z = tmp_path / "started-z", tmp_path / "release-z"
    started_a, release_a = tmp_path / "started-a", tmp_path / "release-a"
    driver = ProcessDriver(1)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        for _ in range(4):  # `append` is known short: it may be chunked and pipelined
            await concurrency.run(functools.partial(append, tmp_path / "warm", "w"))
        results: dict[str, object] = {}
        x_scope = anyio.CancelScope()

        async def call(name: str, fn: object) -> None:
            results[name] = await concurrency.run(fn)  # type: ignore[call-overload]

        async def call_x() -> None:
            with x_scope:
                await concurrency.run(functools.partial(append, runs, "x"))

        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call, "z", functools.partial(report_and_wait_for, started_z, release_z))
                    await helpers.eventually(started_z.exists)
                    tg.start_soon(call, "a", functools.partial(report_and_wait_for, started_a, release_a))
                    await anyio.sleep(0.05)
                    tg.start_soon(call_x)
                    await anyio.sleep(0.05)
                    tg.start_soon(call, "b", functools.partial(append, runs, "b"))
                    await anyio.sleep(0.05)
                    tg.start_soon(call, "c", [functools.partial(append, runs, f"c{i}") for i in range(10)])
                    await anyio.sleep(0.05)
                    release_z.touch()
                    await helpers.eventually(started_a.exists)
                    x_scope.cancel()  # X is cancelled while a1 runs
                    await anyio.sleep(0.05)
                    release_a.touch()
                    time.sleep(0.5)  # noqa: ASYNC251 - the loop is busy: the worker answers a1 and runs what it holds
        finally:
            release_z.touch()
            release_a.touch()
    assert results["b"] == "b"
    assert results["c"] == [f"c{i}" for i in range(10)]
    ran = lines(runs)
    assert ran.count("b") == 1
    assert all(ran.count(f"c{i}") == 1 for i in range(10)), ran


async def test_the_pool_never_grows_past_its_size_when_calls_race_dead_workers(tmp_path: Path) -> None:
    # Defect 2: both idle workers SIGKILLed, then 8 calls at once: 16 workers for workers=2, forever.
    driver = ProcessDriver(2)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        seen: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                seen.append(len(helpers.worker_children()))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            for pid in driver.pids:
                os.kill(pid, signal.SIGKILL)
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for i in range(8):
                        tg.start_soon(concurrency.run, [functools.partial(helpers.identity, i)] * 2)
            await helpers.eventually(lambda: len(helpers.worker_children()) == 2)
        finally:
            stop.set()
            sampler.join()
        stats = driver.stats()
    assert max(seen) <= 2
    assert stats.workers == 2
    assert stats.worker_restarts == 2  # the two replacements, and nothing else


async def test_short_tasks_do_not_wait_behind_a_long_one_while_a_worker_is_free(tmp_path: Path) -> None:
    # Defect 3: 6 short tasks arriving while another call's long task runs: one was pipelined behind it.
    release, started = tmp_path / "release", tmp_path / "started"
    driver = ProcessDriver(2)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        short: list[object] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(concurrency.run, functools.partial(report_and_wait_for, started, release))
                await helpers.eventually(started.exists)
                with anyio.move_on_after(30):  # generous: the short call needs ~0.1 s, release 2 waited for release
                    short = await concurrency.run([functools.partial(time.sleep, 0.01)] * 6)
                assert not release.exists()
                release.touch()
        finally:
            release.touch()
    assert short == [None] * 6


async def test_queued_tasks_survive_a_replacement_that_fails_to_spawn_a_few_times(tmp_path: Path) -> None:
    # Defect 4: a transient spawn failure (out of fds) left 0 workers and the queued tasks waiting forever.
    driver = ProcessDriver(1)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        await concurrency.run(lambda: 0)
        pool = driver._pool
        spawn = pool._spawn_worker
        failures = [OSError(24, "Too many open files")] * 3

        async def flaky() -> Worker:
            if failures:
                raise failures.pop()
            return await spawn()

        pool._spawn_worker = flaky
        with anyio.fail_after(60):
            results = await concurrency.run(
                [functools.partial(helpers.crash, 3), functools.partial(helpers.identity, 1)], return_exceptions=True
            )
    assert isinstance(results[0], WorkerCrashed)
    assert results[1] == 1
    assert failures == []


def grow_memory_later(megabytes: int) -> int:
    """Return at once; a thread then takes `megabytes` of memory and holds it (a library's cache, say)."""

    def hold() -> None:
        time.sleep(0.5)  # after the answer was read (and the worker checked between tasks)
        block = bytearray(megabytes << 20)
        block[::4096] = b"x" * len(block[::4096])
        threading.Event().wait()

    threading.Thread(target=hold, daemon=True).start()
    return os.getpid()


async def test_a_worker_whose_memory_grows_after_its_task_is_recycled_before_the_next_one() -> None:
    # Defect 4: over max_worker_memory after its task returned: never used again nor recycled; a hang.
    driver = ProcessDriver(1, ProcessOptions(max_worker_memory=200 << 20))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        first = await concurrency.run(functools.partial(grow_memory_later, 300))
        await anyio.sleep(2)  # the thread has taken its memory
        with anyio.fail_after(60):
            second = await concurrency.run(helpers.pid)
    assert second != first


FLAKY = Path(__file__).parent.parent / "flaky_import_target.py"


async def test_a_function_whose_module_failed_to_import_once_in_a_worker_loads_on_the_next_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defect 5: a skeleton that failed to load stayed broken in that worker until it died.
    marker = tmp_path / "not-mounted"
    monkeypatch.setenv("SC_FLAKY_IMPORT_MARKER", str(marker))
    from tests import flaky_import_target

    driver = ProcessDriver(1)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        pid = await concurrency.run(helpers.pid)
        marker.touch()  # the worker cannot import the module now
        with pytest.raises(SerializationError, match="config not mounted"):
            await concurrency.run(flaky_import_target.answer)
        marker.unlink()
        assert await concurrency.run(flaky_import_target.answer) == 42
        assert await concurrency.run(helpers.pid) == pid  # the same worker


def fail_if_exists(path: str) -> None:
    if os.path.exists(path):
        raise RuntimeError("the database is not up yet")


def create_then_crash(path: str) -> None:
    Path(path).touch()
    os._exit(3)


async def test_return_exceptions_returns_per_task_outcomes_when_no_worker_can_start(tmp_path: Path) -> None:
    # Defect 5: a replacement that failed to start made run(return_exceptions=True) raise WorkerStartFailed.
    marker = str(tmp_path / "down")
    options = ProcessOptions(initializer=functools.partial(fail_if_exists, marker), start_timeout=1.0)
    driver = ProcessDriver(1, options)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        with anyio.fail_after(60):
            results = await concurrency.run(
                [functools.partial(create_then_crash, marker), functools.partial(helpers.identity, 1)],
                return_exceptions=True,
            )
        assert isinstance(results[0], WorkerCrashed)
        assert isinstance(results[1], WorkerStartFailed)
        os.unlink(marker)  # the database is up: the pool heals on the next call
        with anyio.fail_after(60):
            assert await concurrency.run(functools.partial(helpers.identity, 2)) == 2


def report_then_sleep(path: Path, seconds: float) -> int:
    path.write_text("started")
    time.sleep(seconds)
    return os.getpid()


def append_when_released(path: Path, text: str, started: Path | None, release: Path | None) -> str:
    """`append`, after reporting and waiting for `release` when given (one function: one run-time estimate)."""
    if started is not None and release is not None:
        report_and_wait_for(started, release)
    return append(path, text)


async def test_a_cancelled_task_waiting_in_a_worker_behind_another_call_s_is_skipped(tmp_path: Path) -> None:
    # Defect 6: a cancelled call's task pipelined behind another call's ran anyway (or, in release 2,
    # cost its worker a kill). Now the worker is told to skip it, and does: it never runs, nothing is killed.
    runs, started, release = tmp_path / "runs", tmp_path / "started", tmp_path / "release"
    driver = ProcessDriver(1, ProcessOptions(cancel_grace=0.5))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        for _ in range(12):  # known short (the first run's import halves away): x may be pipelined behind a
            await concurrency.run(functools.partial(append_when_released, tmp_path / "warm", "w", None, None))
        pid = driver.pids[0]
        results: dict[str, object] = {}
        x_scope = anyio.CancelScope()

        async def call(name: str, text: str, *wait: Path | None) -> None:
            fn = functools.partial(append_when_released, runs, text, *(wait or (None, None)))
            with x_scope if name == "x" else contextlib.nullcontext():
                results[name] = await concurrency.run(fn)

        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call, "a", "a", started, release)
                    await helpers.eventually(started.exists)
                    tg.start_soon(call, "x", "x")
                    held = driver._pool.machine.slots[0].inflight
                    await helpers.eventually(lambda: len(held) == 2)  # x waits in the worker, behind a
                    x_scope.cancel()
                    await anyio.sleep(0.05)
                    release.touch()
                    tg.start_soon(call, "b", "b")
        finally:
            release.touch()
        stats = driver.stats()
        assert driver.pids == [pid]
    assert results == {"a": "a", "b": "b"}
    assert lines(runs) == ["a", "b"]
    assert stats.worker_restarts == 0
    assert stats.tasks_timed_out == 1


async def test_a_deferred_task_the_drain_skipped_is_logged_as_never_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # [a, x] in one chunk, a still running when the drain gives up: x is skipped, and the log says it
    # never started (not "stopped unfinished"), while a, which ended within its grace, counts as run.
    runs, started, release = tmp_path / "runs", tmp_path / "started", tmp_path / "release"
    driver = ProcessDriver(1, ProcessOptions(cancel_grace=30.0))
    concurrency = Concurrency(driver=driver, env_file=None, drain_timeout=0.5)
    timer = threading.Timer(2.0, release.touch)  # after the drain timed out, well within a's grace
    try:
        with caplog.at_level(logging.ERROR, logger="starlette_concurrency"), anyio.fail_after(60):
            async with concurrency:
                for _ in range(12):  # known short: the batch goes to the worker as one chunk
                    await concurrency.run(functools.partial(append_when_released, tmp_path / "warm", "w", None, None))
                concurrency.defer(
                    [
                        functools.partial(append_when_released, runs, "a", started, release),
                        functools.partial(append_when_released, runs, "x", None, None),
                    ]
                )
                await helpers.eventually(started.exists)
                assert len(driver._pool.machine.slots[0].inflight) == 2  # x waits in the worker, behind a
                timer.start()
    finally:
        release.touch()
        timer.cancel()
    assert lines(runs) == ["a"]
    fates = [record.getMessage() for record in caplog.records if "abandoned" in record.getMessage()]
    assert len(fates) == 1
    assert "deferred task 1 (partial(append_when_released)) abandoned, never started" in fates[0]


async def test_cancelling_a_call_whose_task_ends_within_the_grace_keeps_its_worker(tmp_path: Path) -> None:
    # Defect 6: every cancelled call whose task was running killed its worker, even for a task of microseconds.
    started = tmp_path / "started"
    driver = ProcessDriver(1, ProcessOptions(cancel_grace=5.0))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        before = driver.pids
        async with anyio.create_task_group() as tg:
            tg.start_soon(concurrency.run, functools.partial(report_then_sleep, started, 0.05))
            await helpers.eventually(started.exists)
            tg.cancel_scope.cancel()
        assert driver.pids == before
        assert await concurrency.run(helpers.pid) == before[0]
        stats = driver.stats()
    assert stats.worker_restarts == 0
    assert stats.tasks_timed_out == 1


async def test_a_protocol_error_fails_only_the_task_that_was_running(tmp_path: Path) -> None:
    # Defect 6: one stray frame failed every task in flight on that worker.
    started, release = tmp_path / "started", tmp_path / "release"
    driver = ProcessDriver(1)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        results: list[object] = []

        async def call() -> None:
            tasks: list[Callable[[], object]] = [functools.partial(report_and_wait_for, started, release)]
            tasks += [functools.partial(helpers.identity, i) for i in range(1, 4)]
            results.extend(await concurrency.run(tasks, return_exceptions=True))

        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call)
                    await helpers.eventually(started.exists)
                    pid = int(started.read_text())
                    Path(_result_pipe_in_worker(driver, pid)).write_bytes(b"\x00garbage")
        finally:
            release.touch()
    assert isinstance(results[0], WorkerCrashed)
    assert results[1:] == [1, 2, 3]


async def test_stats_count_tasks_a_worker_holds_but_has_not_started(tmp_path: Path) -> None:
    # Defect 7: `queued` left out tasks written to a worker but not started.
    started, release = tmp_path / "started", tmp_path / "release"
    driver = ProcessDriver(1)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        for _ in range(4):
            await concurrency.run(functools.partial(helpers.identity, 0))  # known short
        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tasks: list[Callable[[], object]] = [functools.partial(report_and_wait_for, started, release)]
                    tasks += [functools.partial(helpers.identity, i) for i in range(40)]
                    tg.start_soon(concurrency.run, tasks)
                    await helpers.eventually(started.exists)
                    stats = driver.stats()
                    release.touch()
        finally:
            release.touch()
    assert (stats.workers, stats.busy, stats.queued) == (1, 1, 40)
