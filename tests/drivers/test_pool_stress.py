"""A randomized stress test of the process pool on real workers: at most once, bounded, no hang.

Mixed call sizes and durations, exceptions, cancellations, timeouts, SIGKILLed workers and failed
spawns, from a few seeds. Every task appends its id to a file when it starts, so a task that ran twice
shows. Bounded for CI (a few seeds of 40 calls); ``SC_STRESS_CALLS=2000 SC_STRESS_SEEDS=10`` for more.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

from starlette_concurrency import Concurrency, ProcessOptions, TaskTimeout, WorkerCrashed, WorkerStartFailed
from starlette_concurrency._drivers.process import ProcessDriver

from .. import helpers

if TYPE_CHECKING:
    from starlette_concurrency._drivers.process._handle import Worker

pytestmark = pytest.mark.anyio

CALLS = int(os.environ.get("SC_STRESS_CALLS", "40"))
SEEDS = int(os.environ.get("SC_STRESS_SEEDS", "2"))
WORKERS = 2


def record(path: str, task_id: int, seconds: float, fail: bool) -> int:
    """Say that this task started (one line per run), work a while, then return its id or raise."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{task_id}\n".encode())  # one small write to an O_APPEND file: whole, never interleaved
    os.close(fd)
    time.sleep(seconds)
    if fail:
        raise ValueError(f"task {task_id} failed")
    return task_id


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("seed", range(SEEDS))
@pytest.mark.timeout(300)
async def test_random_load_runs_every_task_at_most_once_on_a_bounded_pool(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    runs = str(tmp_path / "runs")
    driver = ProcessDriver(WORKERS, ProcessOptions(cancel_grace=0.05, start_timeout=5.0))
    pool_sizes: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pool_sizes.append(len(helpers.worker_children()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    ids = iter(range(1, 1 << 30))
    settled: dict[int, object] = {}  # task id → its outcome, for the calls that returned
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        pool = driver._pool
        spawn = pool._spawn_worker

        async def flaky_spawn() -> Worker:
            if rng.random() < 0.15:
                raise OSError(24, "Too many open files")
            return await spawn()

        pool._spawn_worker = flaky_spawn

        async def one_call() -> None:
            size = rng.choice([1, 1, 2, 3, 6, 20])
            task_ids = [next(ids) for _ in range(size)]
            tasks = [
                functools.partial(
                    record, runs, task_id, rng.choice([0.0, 0.0, 0.001, 0.01, 0.05, 0.3]), rng.random() < 0.1
                )
                for task_id in task_ids
            ]
            how = rng.random()
            if how < 0.15:  # the caller goes away
                with anyio.move_on_after(rng.choice([0.0, 0.005, 0.05])):
                    await concurrency.run(tasks, return_exceptions=True)
                return
            try:
                results = await concurrency.run(tasks, return_exceptions=True, timeout=5.0 if how < 0.9 else 0.1)
            except TaskTimeout:
                return
            for task_id, result in zip(task_ids, results, strict=True):
                settled[task_id] = result

        async def killer() -> None:
            while True:
                await anyio.sleep(rng.uniform(0.05, 0.4))
                pids = driver.pids
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(pids), signal.SIGKILL)

        sampler.start()
        try:
            with anyio.fail_after(240):  # a hang fails here, never passes
                async with anyio.create_task_group() as tg:
                    tg.start_soon(killer)
                    async with anyio.create_task_group() as calls:
                        for _ in range(CALLS):
                            calls.start_soon(one_call)
                            await anyio.sleep(rng.uniform(0, 0.02))
                    tg.cancel_scope.cancel()
                pool._spawn_worker = spawn
                assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]  # healed
        finally:
            stop.set()
            sampler.join()
    started = Counter(int(line) for line in Path(runs).read_text().split()) if os.path.exists(runs) else Counter()
    twice = [task_id for task_id, count in started.items() if count > 1]
    assert twice == [], f"tasks that ran more than once: {twice}"
    assert max(pool_sizes, default=0) <= WORKERS
    for task_id, result in settled.items():
        if isinstance(result, ValueError | WorkerCrashed | WorkerStartFailed):
            continue
        assert result == task_id  # never another task's answer
        assert started[task_id] == 1
    assert helpers.worker_children() == []
