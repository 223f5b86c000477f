"""Sync code and threads: run_blocking(), `with concurrency:`, many threads and event loops on one facade,
Ctrl-C, and a forked child (gunicorn --preload) starting its own pool."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import psutil
import pytest

from starlette_concurrency import Concurrency, TaskTimeout

from . import helpers
from .asgi import ROOT


def touch(path: Path) -> None:
    path.write_text("ran")


def test_with_starts_and_stops_from_sync_code(tmp_path: Path) -> None:
    concurrency = Concurrency(workers=2, env_file=None)
    with concurrency:
        assert concurrency.run_blocking({"a": functools.partial(helpers.add, 1, 2)}) == {"a": 3}
        concurrency.defer(functools.partial(touch, tmp_path / "drained"))
        assert len(helpers.worker_children()) == 2
    # Leaving drained the deferred work and stopped the workers.
    assert (tmp_path / "drained").exists()
    assert helpers.worker_children() == []
    with pytest.raises(ZeroDivisionError):
        concurrency.run_blocking(lambda: 1 / 0)  # lazily usable again; a task's error comes back as itself
    concurrency.close()


def test_many_threads_share_one_pool_with_run_blocking() -> None:
    concurrency = Concurrency(workers=2, env_file=None)
    results: dict[int, list[int]] = {}

    def call(n: int) -> None:
        results[n] = concurrency.run_blocking([functools.partial(helpers.add, n, i) for i in range(5)])

    threads = [threading.Thread(target=call, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n: [n + i for i in range(5)] for n in range(16)}
    assert len(helpers.worker_children()) == 2  # never more than `workers`
    concurrency.close()
    assert helpers.worker_children() == []


def test_many_event_loops_in_threads_share_one_facade() -> None:
    concurrency = Concurrency(workers=2, env_file=None)
    results: dict[str, object] = {}

    def asyncio_thread(n: int) -> None:
        results[f"asyncio-{n}"] = asyncio.run(concurrency.run([functools.partial(helpers.add, n, 1)] * 3))

    def trio_thread(n: int) -> None:
        results[f"trio-{n}"] = anyio.run(concurrency.run, functools.partial(helpers.add, n, 2), backend="trio")

    threads = [threading.Thread(target=asyncio_thread, args=(n,)) for n in range(12)]
    threads += [threading.Thread(target=trio_thread, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {**{f"asyncio-{n}": [n + 1] * 3 for n in range(12)}, **{f"trio-{n}": n + 2 for n in range(4)}}
    assert len(helpers.worker_children()) == 2
    concurrency.close()


@pytest.mark.anyio
async def test_a_second_loop_is_forwarded_to_the_lifespan_that_hosts_the_pool() -> None:
    async with Concurrency(workers=2, env_file=None) as concurrency:
        # A sync endpoint's thread running its own event loop (a Flask async view, asyncio.run in a thread).
        result = await anyio.to_thread.run_sync(lambda: asyncio.run(concurrency.run([helpers.pid] * 4)))
        assert set(result) <= set(helpers.worker_children())
        assert len(helpers.worker_children()) == 2


def test_run_blocking_timeout_stops_the_tasks() -> None:
    concurrency = Concurrency(workers=1, env_file=None)
    with pytest.raises(TaskTimeout, match=r"did not finish within 0\.5 s"):
        concurrency.run_blocking(functools.partial(helpers.sleep_then, "late", 60), timeout=0.5)
    assert concurrency.run_blocking(functools.partial(helpers.add, 2, 3)) == 5  # the pool serves on
    concurrency.close()


def test_a_forked_child_starts_its_own_pool() -> None:
    # gunicorn --preload: the app (and a facade already in use) is copied into each server process.
    concurrency = Concurrency(workers=1, env_file=None)
    parent_workers = set(concurrency.run_blocking([helpers.pid] * 2))
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which reports through the pipe
        try:
            pids = concurrency.run_blocking([helpers.pid] * 2)
            os.write(write, json.dumps(pids).encode())
            concurrency.close()
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_workers = set(json.loads(pipe.read() or "[]"))
    os.waitpid(child, 0)
    assert child_workers, "the child could not run anything"
    assert child_workers.isdisjoint(parent_workers)  # its own pool, not the parent's workers
    assert set(concurrency.run_blocking([helpers.pid] * 2)) <= parent_workers  # the parent's pool is untouched
    concurrency.close()


def test_ctrl_c_in_run_blocking_stops_its_tasks(tmp_path: Path) -> None:
    # In a child interpreter: SIGINT there raises KeyboardInterrupt in the thread blocked in run_blocking().
    pid_file, marker = tmp_path / "pid", tmp_path / "finished"
    script = (
        "import functools, pathlib\n"
        "from starlette_concurrency import Concurrency\n"
        "from tests import helpers\n"
        "c = Concurrency(workers=1, env_file=None)\n"
        "try:\n"
        f"    paths = pathlib.Path({str(pid_file)!r}), pathlib.Path({str(marker)!r})\n"
        "    c.run_blocking(functools.partial(helpers.report_sleep_touch, *paths, 60))\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "c.close()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the task never started"
        assert child.poll() is None, "the child exited before its task started"
        time.sleep(0.02)
    worker = int(pid_file.read_text())
    child.send_signal(signal.SIGINT)
    output, _ = child.communicate(timeout=60)
    assert output.strip() == "interrupted"
    assert not psutil.pid_exists(worker) or helpers.gone(worker)  # its worker was stopped with it
    assert not marker.exists()


def test_sigterm_in_a_script_drains_then_ends_as_sigterm_would(tmp_path: Path) -> None:
    # No server, no handler of its own: SIGTERM's default action would kill the process at once. The facade
    # drains first (on its own thread: the main thread goes on meanwhile), then lets SIGTERM end the process.
    script = (
        "import functools, pathlib, sys, time\n"
        "from starlette_concurrency import Concurrency\n"
        "from tests import helpers\n"
        "c = Concurrency(workers=2, drain_timeout=30, env_file=None)\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "c.defer({f'd{i}': functools.partial(helpers.sleep_then_touch, out / f'd{i}', 1) for i in range(3)})\n"
        "print('deferred', flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"deferred\n"
    child.send_signal(signal.SIGTERM)
    _, errors = child.communicate(timeout=60)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d0", "d1", "d2"], errors.decode()
    assert child.returncode == -signal.SIGTERM
    assert b"abandoned" not in errors
