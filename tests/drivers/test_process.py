"""The `process` driver: real worker processes, their lifecycle, resource bounds and isolation."""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import psutil
import pytest

from starlette_concurrency import (
    Concurrency,
    ConcurrencyClosed,
    ProcessOptions,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    WorkerStartFailed,
)
from starlette_concurrency._drivers.process import ProcessDriver

from .. import helpers

pytestmark = pytest.mark.anyio


async def wait_for_pid(path: Path) -> int:
    await helpers.eventually(path.exists)
    return int(path.read_text())


# The figures of the issue ----------------------------------------------------------------------------------


async def test_tasks_run_in_worker_processes_not_in_the_caller(pool: tuple[Concurrency, ProcessDriver]) -> None:
    concurrency, driver = pool
    pids = await concurrency.run([lambda: os.getpid()] * 2)
    assert len(set(pids)) == 2
    assert os.getpid() not in pids
    assert set(pids) <= set(driver.pids)


async def test_two_cpu_bound_tasks_run_in_parallel(pool: tuple[Concurrency, ProcessDriver]) -> None:
    concurrency, _ = pool
    (pid_a, start_a, end_a), (pid_b, start_b, end_b) = await concurrency.run(
        [functools.partial(helpers.timed_burn, 3_000_000)] * 2
    )
    assert pid_a != pid_b
    assert max(start_a, start_b) < min(end_a, end_b), "the two intervals do not overlap"


async def test_a_crashing_task_raises_worker_crashed_and_the_pool_heals(
    pool: tuple[Concurrency, ProcessDriver],
) -> None:
    concurrency, driver = pool
    before = driver.pids
    with pytest.raises(WorkerCrashed, match=r"running task 0 \(partial\(crash\)\) exited with code 3") as info:
        await concurrency.run(functools.partial(helpers.crash, 3))
    assert info.value.exitcode == 3
    assert info.value.signal is None
    assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]
    assert len(driver.pids) == 2
    assert len(set(before) - set(driver.pids)) == 1


async def test_a_crash_in_a_short_call_fails_only_its_task(pool: tuple[Concurrency, ProcessDriver]) -> None:
    concurrency, driver = pool
    # One task per idle worker: the call takes the scatter path (no task group); the crash of the
    # second worker must not disturb the answer of the first, nor the call after it.
    for crashing in (0, 1):
        tasks: list[Callable[[], object]] = [functools.partial(helpers.identity, "fine")] * 2
        tasks[crashing] = functools.partial(helpers.crash, 5)
        results = await concurrency.run(tasks, return_exceptions=True)
        crashed = results[crashing]  # typed `object | BaseException` now: narrow a name, not an index
        assert isinstance(crashed, WorkerCrashed)
        assert crashed.exitcode == 5
        assert results[1 - crashing] == "fine"
        assert len(driver.pids) == 2


async def test_a_timeout_kills_the_task_and_the_worker_is_replaced(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path
) -> None:
    concurrency, driver = pool
    pid_file = tmp_path / "pid"
    with pytest.raises(TaskTimeout):
        await concurrency.run(functools.partial(helpers.report_then_sleep, pid_file, 30, None), timeout=0.3)
    pid = int(pid_file.read_text())
    await helpers.eventually(lambda: helpers.gone(pid), timeout=5)  # after its cancel_grace
    assert pid not in driver.pids
    await helpers.eventually(lambda: len(driver.pids) == 2)  # its replacement is being spawned
    assert await concurrency.run(lambda: "next") == "next"


async def test_cancelling_the_caller_stops_a_blocking_task(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path
) -> None:
    concurrency, _ = pool
    pid_file, marker = tmp_path / "pid", tmp_path / "marker"
    async with anyio.create_task_group() as tg:
        tg.start_soon(concurrency.run, functools.partial(helpers.report_sleep_touch, pid_file, marker, 1.0))
        pid = await wait_for_pid(pid_file)
        tg.cancel_scope.cancel()
    # The process that would have left the side effect is dead, so the side effect can never happen.
    await helpers.eventually(lambda: helpers.gone(pid), timeout=5)
    assert not marker.exists()


async def test_a_closure_that_cannot_be_pickled_runs_nothing(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path
) -> None:
    concurrency, _ = pool
    lock = threading.Lock()
    marker = tmp_path / "marker"
    with pytest.raises(SerializationError, match=r"task 'locked' \(<lambda>\) cannot be pickled.*lock"):
        await concurrency.run(
            {
                "fine": functools.partial(helpers.sleep_then_touch, marker, 0),
                "locked": lambda: lock.locked(),
            }
        )
    await anyio.sleep(0.2)
    assert not marker.exists()


async def test_no_worker_is_left_after_aclose(tmp_path: Path) -> None:
    driver = ProcessDriver(2)
    concurrency = Concurrency(driver=driver, env_file=None)
    assert len(await concurrency.run([helpers.pid] * 4)) == 4
    pids = driver.pids
    assert sorted(helpers.worker_children()) == pids
    await concurrency.aclose()
    assert helpers.worker_children() == []
    assert not any(psutil.pid_exists(pid) for pid in pids)


async def test_aclose_in_the_middle_of_a_call_stops_it_and_leaves_no_worker(tmp_path: Path) -> None:
    driver = ProcessDriver(2)
    concurrency = Concurrency(driver=driver, env_file=None)
    pid_file = tmp_path / "pid"
    failure: list[BaseException] = []

    async def call() -> None:
        try:
            await concurrency.run(functools.partial(helpers.report_then_sleep, pid_file, 30, None))
        except ConcurrencyClosed as exc:
            failure.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            pid = await wait_for_pid(pid_file)
            await concurrency.aclose()
    assert len(failure) == 1
    assert not psutil.pid_exists(pid)
    assert helpers.worker_children() == []


# Resource bounds -------------------------------------------------------------------------------------------


async def test_max_tasks_per_worker_recycles_workers() -> None:
    driver = ProcessDriver(1, ProcessOptions(max_tasks_per_worker=3))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        pids = await concurrency.run([helpers.pid] * 10)
        groups = [pids[i : i + 3] for i in range(0, 10, 3)]
        assert all(len(set(group)) == 1 for group in groups)
        assert len({group[0] for group in groups}) == 4
        # The count carries over between calls: two tasks left for the fourth worker, then a fifth.
        more = await concurrency.run([helpers.pid] * 3)
        assert more[:2] == [pids[-1]] * 2
        assert more[2] not in pids
        assert len(helpers.worker_children()) >= 1


async def test_max_tasks_per_worker_holds_with_several_workers_and_concurrent_calls() -> None:
    driver = ProcessDriver(2, ProcessOptions(max_tasks_per_worker=2))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        results: list[list[int]] = []

        async def call() -> None:
            results.append(await concurrency.run([helpers.pid] * 7))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(call)
        counts: dict[int, int] = {}
        for pid in (pid for result in results for pid in result):
            counts[pid] = counts.get(pid, 0) + 1
        assert sum(counts.values()) == 28
        assert max(counts.values()) <= 2


async def test_an_idle_worker_exits_and_a_fresh_one_starts_on_demand() -> None:
    driver = ProcessDriver(1, ProcessOptions(idle_timeout=0.3))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        first = await concurrency.run(helpers.pid)
        await helpers.eventually(lambda: helpers.gone(first), timeout=5)
        second = await concurrency.run(helpers.pid)
        assert second != first
        assert await concurrency.run(helpers.pid) == second  # busy again: it stays


async def test_calls_racing_the_idle_timeout_all_succeed() -> None:
    # Calls land just before, just after and right at the moment the worker leaves: a task sent to a
    # worker that is already saying goodbye must be run by the next one, once, never lost.
    rng = random.Random(5)
    driver = ProcessDriver(1, ProcessOptions(idle_timeout=0.05))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        for i in range(15):
            await anyio.sleep(rng.uniform(0.03, 0.08))
            assert await concurrency.run([functools.partial(helpers.identity, (i, j)) for j in range(3)]) == [
                (i, j) for j in range(3)
            ]


async def test_a_worker_past_the_memory_ceiling_is_recycled() -> None:
    ceiling = 64 << 20
    driver = ProcessDriver(1, ProcessOptions(max_worker_memory=ceiling))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        small = await concurrency.run([functools.partial(helpers.hoard, 0)] * 2)
        assert small[0] == small[1]  # under the ceiling: kept
        grown = await concurrency.run(functools.partial(helpers.hoard, 2 * ceiling))
        assert grown == small[0]
        await helpers.eventually(lambda: helpers.gone(grown), timeout=5)
        assert await concurrency.run(helpers.pid) != grown


async def test_the_memory_ceiling_applies_between_the_tasks_of_one_call() -> None:
    ceiling = 64 << 20
    driver = ProcessDriver(1, ProcessOptions(max_worker_memory=ceiling))
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        pids = await concurrency.run(
            [functools.partial(helpers.hoard, 2 * ceiling), *[functools.partial(helpers.hoard, 0)] * 5]
        )
        # At most the task already sent behind the one that grew runs on the bloated worker.
        assert pids[0] not in pids[2:]


# Isolation and what a worker inherits -----------------------------------------------------------------------


async def test_a_worker_holds_only_its_two_pipes_and_never_the_servers_socket() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.set_inheritable(True)  # even a socket marked inheritable (as pre-fork servers do) stays out
    try:
        driver = ProcessDriver(2)
        async with Concurrency(driver=driver, env_file=None) as concurrency:
            await concurrency.run([helpers.pid] * 2)
            workers = {worker.pid: worker for worker in driver._pool.workers}
            for pid, worker in workers.items():
                fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
                assert not [target for target in fds.values() if target.startswith("socket:")]
                assert fds[0] == "/dev/null"
                private = {fd: target for fd, target in fds.items() if fd > 2}
                assert all(target.startswith("pipe:") for target in private.values()), private
                inodes = {os.stat(f"/proc/{pid}/fd/{fd}").st_ino for fd in private}
                assert worker.to_child is not None
                assert inodes == {os.fstat(worker.to_child).st_ino, os.fstat(worker.from_child).st_ino}
                assert psutil.Process(pid).net_connections(kind="all") == []
    finally:
        listener.close()


async def test_a_worker_inherits_cwd_environment_and_sys_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SC_PROCESS_TEST", "inherited")
    monkeypatch.syspath_prepend(str(tmp_path / "added-before-start"))
    async with Concurrency(driver=ProcessDriver(1), env_file=None) as concurrency:
        cwd, path, variable, parent = await concurrency.run(functools.partial(helpers.surroundings, "SC_PROCESS_TEST"))
    assert cwd == str(tmp_path)
    assert path == sys.path
    assert variable == "inherited"
    assert parent == os.getpid()


async def test_a_worker_runs_without_importing_the_package_root(pool: tuple[Concurrency, ProcessDriver]) -> None:
    # Starlette and anyio would cost every worker tens of ms and MiB: it loads _wire/ alone.
    concurrency, _ = pool
    loaded = functools.partial(eval, "sorted(m for m in __import__('sys').modules if m.startswith('starlette'))")
    assert await concurrency.run(loaded) == [
        "starlette_concurrency._wire",
        "starlette_concurrency._wire.closure_store",
        "starlette_concurrency._wire.outcome",
        "starlette_concurrency._wire.protocol",
        "starlette_concurrency._wire.worker",
    ]


async def test_an_app_s_modules_named_like_the_worker_s_own_are_the_app_s(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The worker's modules once were top-level `_protocol`, `_worker`, `_closure_store` in a worker:
    # a task of the app's `_protocol.py` called the worker's function of that name.
    names = ["protocol", "worker", "closure_store", "_protocol", "_worker", "_closure_store", "_wire"]
    for name in names:
        (tmp_path / f"{name}.py").write_text(f"import os\n\ndef answer():\n    return ({name!r}, os.getpid())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = [__import__(name) for name in names]
    try:
        async with Concurrency(driver=ProcessDriver(1), env_file=None) as concurrency:
            answers = await concurrency.run([module.answer for module in modules])
    finally:
        for name in names:
            sys.modules.pop(name, None)
    assert [name for name, _ in answers] == names
    assert os.getpid() not in {pid for _, pid in answers}


async def test_payloads_and_results_are_never_logged(
    pool: tuple[Concurrency, ProcessDriver], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    concurrency, _ = pool
    secret = "s3cr3t-" + os.urandom(8).hex()
    with caplog.at_level(logging.DEBUG):
        results = await concurrency.run(
            [
                functools.partial(helpers.identity, secret),
                functools.partial(helpers.echo_or_crash, secret, True),
                functools.partial(helpers.fail, secret),
            ],
            return_exceptions=True,
        )
        with pytest.raises(TaskTimeout):
            await concurrency.run(functools.partial(helpers.sleep_then, secret, 30), timeout=0.3)
    assert results[0] == secret
    assert isinstance(results[1], WorkerCrashed)
    assert secret not in caplog.text
    out, err = capfd.readouterr()
    assert secret not in out + err


# Start-up ---------------------------------------------------------------------------------------------------


async def test_an_initializer_that_raises_fails_the_start_with_its_reason() -> None:
    concurrency = Concurrency(
        driver=ProcessDriver(1, ProcessOptions(initializer=functools.partial(helpers.fail, "no db"))), env_file=None
    )
    with pytest.raises(WorkerStartFailed, match=r"failed to start: ValueError: no db"):
        await concurrency.__aenter__()
    assert helpers.worker_children() == []


async def test_a_preload_that_cannot_be_imported_fails_the_start_with_its_reason() -> None:
    driver = ProcessDriver(1, ProcessOptions(preload=["sc_no_such_module"]))
    with pytest.raises(WorkerStartFailed, match=r"failed to start: ModuleNotFoundError: No module named"):
        await driver.start()
    await driver.aclose()
    assert helpers.worker_children() == []
