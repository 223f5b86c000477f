"""Workers that die: killed from outside, crashing at random, outliving the server, leaving children behind."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from starlette_concurrency import Concurrency, TaskTimeout, WorkerCrashed
from starlette_concurrency._drivers.process import ProcessDriver

from .. import helpers

pytestmark = pytest.mark.anyio


def assert_healed(driver: ProcessDriver) -> None:
    assert len(driver.pids) == driver.workers
    assert not any(helpers.gone(pid) for pid in driver.pids)


async def test_a_worker_killed_while_busy_fails_only_its_task(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path
) -> None:
    concurrency, driver = pool
    victim, bystander = tmp_path / "victim", tmp_path / "bystander"
    results: list[object] = []

    async def call() -> None:
        results.extend(
            await concurrency.run(
                [
                    functools.partial(helpers.report_then_sleep, victim, 30, "never"),
                    functools.partial(helpers.report_then_sleep, bystander, 0.3, "survived"),
                ],
                return_exceptions=True,
            )
        )

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await helpers.eventually(lambda: victim.exists() and bystander.exists())
            killed = int(victim.read_text())
            os.kill(killed, signal.SIGKILL)
    crashed, survived = results
    assert isinstance(crashed, WorkerCrashed)
    assert crashed.signal == signal.SIGKILL
    assert f"pid {killed}" in str(crashed)
    assert "SIGKILL" in str(crashed)
    assert survived == "survived"
    assert killed not in driver.pids
    assert_healed(driver)
    assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]


async def test_a_worker_killed_while_idle_is_replaced(pool: tuple[Concurrency, ProcessDriver]) -> None:
    concurrency, driver = pool
    killed = driver.pids
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    await helpers.eventually(lambda: all(helpers.gone(pid) for pid in killed))
    assert await concurrency.run([helpers.pid] * 4) != []
    assert_healed(driver)


async def test_workers_killed_at_random_under_concurrent_calls_never_hang_a_call() -> None:
    rng = random.Random(1)
    driver = ProcessDriver(2)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        outcomes: list[tuple[object, object]] = []
        killed: list[int] = []

        async def call(n: int) -> None:
            values = [(n, i) for i in range(4)]
            tasks = [functools.partial(helpers.sleep_then, value, 0.05) for value in values]
            results = await concurrency.run(tasks, return_exceptions=True)
            outcomes.extend(zip(values, results, strict=True))

        async def killer() -> None:
            while len(killed) < 10:
                await anyio.sleep(rng.uniform(0.02, 0.1))
                # A started worker (one that is still starting would fail no task: it gets another try).
                started = [worker.pid for worker in driver._pool.workers if worker.ready]
                if started:
                    killed.append(rng.choice(started))
                    os.kill(killed[-1], signal.SIGKILL)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                for n in range(12):
                    tg.start_soon(call, n)
        assert len(outcomes) == 48
        crashed = [result for _, result in outcomes if isinstance(result, WorkerCrashed)]
        assert all(value == result for value, result in outcomes if not isinstance(result, WorkerCrashed))
        assert len(crashed) <= len(killed)
        # The last kills may have hit idle workers just now: once they are dead, the pool sees it.
        await helpers.eventually(lambda: all(helpers.gone(pid) for pid in killed))
        assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]
        assert_healed(driver)


async def test_hundreds_of_calls_with_random_crashes_get_every_answer_right() -> None:
    # 300 calls of 4 tasks, 4 callers at a time; about one task in 15 kills its worker, one in 15
    # raises. Every task must end as exactly what it did: its value, its exception or WorkerCrashed.
    rng = random.Random(2024)
    fates = [[rng.choices(["ok", "raise", "crash"], [13, 1, 1])[0] for _ in range(4)] for _ in range(300)]
    driver = ProcessDriver(2)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        limiter = anyio.Semaphore(4)
        checked = 0

        async def call(n: int) -> None:
            nonlocal checked
            async with limiter:
                tasks = [
                    functools.partial(helpers.echo_raise_or_crash, (n, i), fate) for i, fate in enumerate(fates[n])
                ]
                results = await concurrency.run(tasks, return_exceptions=True)
            for i, (fate, result) in enumerate(zip(fates[n], results, strict=True)):
                if fate == "ok":
                    assert result == (n, i)
                elif fate == "raise":
                    assert isinstance(result, ValueError)
                    assert result.args == ((n, i),)
                else:
                    assert isinstance(result, WorkerCrashed)
                    assert result.exitcode == 7
                checked += 1

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for n in range(300):
                    tg.start_soon(call, n)
        assert checked == 1200
        assert sum(fate == "crash" for row in fates for fate in row) >= 50
        assert_healed(driver)


async def test_crashes_inside_a_long_batched_call_are_attributed_to_the_right_tasks() -> None:
    # 2,000 tasks travel in chunks, two chunks in flight per worker: a crash must fail only the task
    # that was running and send the rest of its chunks to the next worker.
    rng = random.Random(7)
    crashing = set(rng.sample(range(2000), 12))
    driver = ProcessDriver(2)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        with anyio.fail_after(30):
            results = await concurrency.run(
                [functools.partial(helpers.echo_or_crash, i, i in crashing) for i in range(2000)],
                return_exceptions=True,
            )
        for i, result in enumerate(results):
            if i in crashing:
                assert isinstance(result, WorkerCrashed), i
                assert f"task {i} " in str(result)
            else:
                assert result == i
        assert_healed(driver)


SERVER = textwrap.dedent(
    """
    import functools, os, sys, time
    import anyio
    from starlette_concurrency import Concurrency
    from starlette_concurrency._drivers.process import ProcessDriver
    from tests import helpers

    async def main() -> None:
        driver = ProcessDriver(2)
        async with Concurrency(driver=driver, env_file=None) as concurrency:
            if sys.argv[2] == "fork" and os.fork() == 0:  # a child of the server, as the fork driver makes
                time.sleep(60)
                os._exit(0)
            print(*driver.pids, flush=True)
            await concurrency.run(functools.partial(helpers.report_then_sleep, helpers.Path(sys.argv[1]), 60, None))

    anyio.run(main)
    """
)


@pytest.mark.parametrize("fork", ["no-fork", "fork"])
async def test_workers_exit_by_themselves_when_the_server_is_killed(tmp_path: Path, fork: str) -> None:
    # With "fork", a child forked from the server outlives it: it must not keep the workers' pipes open.
    busy = tmp_path / "busy"
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block; its output is read in a thread
        [sys.executable, "-c", SERVER, str(busy), fork],
        cwd=root,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # so that the forked child can be found and killed with the group
    )
    try:
        assert server.stdout is not None
        with anyio.fail_after(10):
            line = await anyio.to_thread.run_sync(server.stdout.readline)
            pids = [int(pid) for pid in line.split()]
            assert len(pids) == 2
            await helpers.eventually(busy.exists)
        assert int(busy.read_text()) in pids  # one of them is in the middle of a task
        server.kill()
        server.wait()
        await helpers.eventually(lambda: all(helpers.gone(pid) for pid in pids), timeout=5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # the forked child, if any
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


@pytest.mark.parametrize("leave_behind", [helpers.spawn_then_crash, helpers.fork_then_crash])
async def test_a_crash_is_seen_even_when_the_task_left_a_child_process_behind(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path, leave_behind: Callable[[Path], None]
) -> None:
    # The parent learns of a death from EOF on the result pipe: a grandchild holding that pipe
    # would hide it for as long as it lives.
    concurrency, driver = pool
    child_file = tmp_path / "child"
    try:
        with anyio.fail_after(10), pytest.raises(WorkerCrashed, match="exited with code 3"):
            await concurrency.run(functools.partial(leave_behind, child_file))
    finally:
        if child_file.exists():
            os.kill(int(child_file.read_text()), signal.SIGKILL)
    assert_healed(driver)


async def test_a_task_that_forks_and_returns_in_both_processes_answers_once(
    pool: tuple[Concurrency, ProcessDriver],
) -> None:
    concurrency, driver = pool
    side, pid = await concurrency.run(helpers.fork_and_return)
    assert (side, pid) == ("parent", pid)
    assert pid in driver.pids
    assert await concurrency.run([functools.partial(helpers.identity, i) for i in range(10)]) == list(range(10))


async def test_a_worker_that_closed_its_pipe_and_hangs_is_not_lost_to_a_timeout() -> None:
    # EOF on the result pipe, no exit status, and the call's timeout expires while the pool is
    # waiting for one: the worker must still be killed and replaced.
    driver = ProcessDriver(1)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        with pytest.raises(WorkerCrashed, match="closed its pipe without exiting"):
            await concurrency.run(helpers.close_result_pipe_and_hang)
        with pytest.raises(TaskTimeout):
            await concurrency.run(helpers.close_result_pipe_and_hang, timeout=0.3)
        with anyio.fail_after(10):
            assert await concurrency.run(lambda: "not stuck") == "not stuck"
        assert_healed(driver)
