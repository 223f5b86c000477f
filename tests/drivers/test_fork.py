"""What only the `fork` driver does: closures that never pickle, children that leave the server alone."""

from __future__ import annotations

import asyncio
import atexit
import errno
import functools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import FrameType

import anyio
import psutil
import pytest
import sniffio
import trio

from starlette_concurrency import (
    Concurrency,
    ConcurrencyClosed,
    ConfigurationError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
)
from starlette_concurrency._config import Settings
from starlette_concurrency._drivers.fork import ForkDriver, create
from starlette_concurrency._tasks import Outcome, Task

from .. import helpers

pytestmark = pytest.mark.anyio

_STATE = {"value": 0}


@pytest.fixture(autouse=True)
def no_child_is_left() -> Iterator[None]:
    """Every test ends with no child of ours alive, zombies included (other fixtures' processes aside)."""
    before = {child.pid for child in psutil.Process().children()}
    yield
    left = [child for child in psutil.Process().children() if child.pid not in before]
    assert left == [], f"children left behind: {left}"


@pytest.fixture
async def concurrency() -> AsyncIterator[Concurrency]:
    async with Concurrency(driver="fork", workers=2, env_file=None) as facade:
        yield facade


def _siblings(ignore: set[int]) -> int:
    """In a child: how many children its parent has right now (itself included), zombies included."""
    return len([p for p in psutil.Process(os.getppid()).children() if p.pid not in ignore])


def _count_then_sleep(ignore: set[int], seconds: float) -> int:
    first = _siblings(ignore)
    time.sleep(seconds)
    return max(first, _siblings(ignore))


def _wait_for(path: Path) -> str:
    deadline = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return "released"


def _touch(path: Path) -> str:
    path.write_text("ran")
    return "touched"


def _fork_a_sleeper_then(pid_file: Path, then: Callable[[], object]) -> object:
    """Leave a grandchild behind that holds every inherited fd (the result pipe too), then do `then`."""
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    pid_file.write_text(str(pid))
    return then()


async def test_a_closure_over_a_lock_runs(concurrency: Concurrency) -> None:
    lock = threading.Lock()

    def locked() -> str:
        with lock:
            return "locked"

    assert await concurrency.run(locked) == "locked"
    assert not lock.locked()


async def test_a_closure_over_a_socket_uses_it(concurrency: Concurrency) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        result: object = await concurrency.run(lambda: theirs.sendall(b"from the child"))  # typed None
        assert result is None
        assert ours.recv(100) == b"from the child"


async def test_a_child_sees_the_parent_as_of_the_call_and_its_changes_stay_there(concurrency: Concurrency) -> None:
    def bump() -> int:
        _STATE["value"] += 1
        return _STATE["value"]

    _STATE["value"] = 41
    assert await concurrency.run([bump, bump]) == [42, 42]
    assert _STATE["value"] == 41


async def test_os_exit_raises_worker_crashed_with_the_exit_code(concurrency: Concurrency) -> None:
    results = await concurrency.run(
        {"crash": functools.partial(helpers.crash, 7), "ok": lambda: "fine"}, return_exceptions=True
    )
    assert results["ok"] == "fine"
    crashed = results["crash"]
    assert isinstance(crashed, WorkerCrashed)
    assert (crashed.exitcode, crashed.signal) == (7, None)
    assert "running task 'crash' (partial(crash)) exited with code 7" in str(crashed)


async def test_the_child_runs_default_signal_handlers_not_the_servers(concurrency: Concurrency, tmp_path: Path) -> None:
    marker = tmp_path / "handler ran"

    def servers_handler(signum: int, frame: FrameType | None) -> None:
        marker.write_text("the server's SIGTERM handler ran in the child")

    previous = signal.signal(signal.SIGTERM, servers_handler)
    try:
        with pytest.raises(WorkerCrashed, match="killed by SIGTERM") as info:
            await concurrency.run(lambda: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.signal == signal.SIGTERM
    assert not marker.exists()


async def test_the_child_forgets_the_event_loop_and_the_servers_signals(concurrency: Concurrency) -> None:
    def inspect() -> dict[str, object]:
        try:
            library: str | None = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            library = None
        return {
            "running loop": asyncio._get_running_loop(),
            "async library": library,
            "SIGINT": signal.getsignal(signal.SIGINT),
            "wakeup fd": signal.set_wakeup_fd(-1),
            "trio.run": trio.run(trio.sleep, 0),  # would say "inside a run" if the server's run showed
        }

    assert await concurrency.run(inspect) == {
        "running loop": None,
        "async library": None,
        "SIGINT": signal.SIG_IGN,  # Ctrl-C in a terminal reaches the children too: the server decides
        "wakeup fd": -1,
        "trio.run": None,
    }


async def test_exceptions_keep_their_type_and_the_childs_traceback(concurrency: Concurrency) -> None:
    def deep_in_the_child() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing") as info:
        await concurrency.run(deep_in_the_child)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "deep_in_the_child" in cause.traceback
    assert "KeyError: 'missing'" in cause.traceback

    def raise_what_cannot_travel() -> None:
        raise ValueError(threading.Lock())

    with pytest.raises(RemoteError, match=r"ValueError: <unlocked _thread\.lock") as remote:
        await concurrency.run(raise_what_cannot_travel)
    assert "raise_what_cannot_travel" in remote.value.traceback


async def test_an_unpicklable_result_is_a_serialization_error(concurrency: Concurrency) -> None:
    with pytest.raises(SerializationError, match=r"the result of task 0 \(\w+\) cannot be pickled"):
        await concurrency.run(threading.Lock)


async def test_a_large_result_comes_back_whole(concurrency: Concurrency) -> None:
    big = os.urandom(8 << 20)
    assert await concurrency.run(lambda: big) == big


async def test_never_more_than_workers_children_at_once(concurrency: Concurrency) -> None:
    ignore = {child.pid for child in psutil.Process().children()}
    seen: list[int] = []
    finished = anyio.Event()

    async def sample() -> None:
        while not finished.is_set():
            seen.append(len([c for c in psutil.Process().children() if c.pid not in ignore]))
            await anyio.sleep(0.005)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        counts = await concurrency.run([functools.partial(_count_then_sleep, ignore, 0.2) for _ in range(6)])
        finished.set()
    assert max(counts) == 2, counts  # each child counted itself and its siblings, twice
    assert max(seen) <= 2, seen


async def test_concurrent_calls_share_the_cap(concurrency: Concurrency) -> None:
    ignore = {child.pid for child in psutil.Process().children()}
    counts: list[int] = []

    async def call() -> None:
        counts.extend(await concurrency.run([functools.partial(_count_then_sleep, ignore, 0.1) for _ in range(3)]))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(call)
    assert len(counts) == 9
    assert max(counts) <= 2, counts


async def test_the_cap_rolls_a_slot_is_reused_as_soon_as_it_frees(concurrency: Concurrency, tmp_path: Path) -> None:
    # Task 0 holds one slot until task 4 runs: only a rolling cap gets tasks 1-4 through the other.
    marker = tmp_path / "marker"
    tasks: list[Callable[[], object]] = [
        functools.partial(_wait_for, marker),
        *[lambda: "short"] * 3,
        functools.partial(_touch, marker),
    ]
    assert await concurrency.run(tasks) == ["released", "short", "short", "short", "touched"]


async def test_a_timeout_kills_a_task_that_blocks(concurrency: Concurrency) -> None:
    with pytest.raises(TaskTimeout, match="task 1"):
        await concurrency.run([lambda: 1, functools.partial(time.sleep, 60)], timeout=0.3)
    # the autouse fixture checks that the sleeping child was killed and reaped


async def test_cancelling_kills_running_children_and_starts_no_more(tmp_path: Path) -> None:
    ignore = {child.pid for child in psutil.Process().children()}
    first, second = tmp_path / "first", tmp_path / "second"
    async with Concurrency(driver="fork", workers=1, env_file=None) as concurrency:
        with anyio.move_on_after(0.3) as scope:
            await concurrency.run(
                [
                    functools.partial(helpers.sleep_then_touch, first, 60),
                    functools.partial(helpers.sleep_then_touch, second, 0),
                ]
            )
        assert scope.cancelled_caught
        # No child of ours exists any more, so nothing can touch either marker later.
        assert [c for c in psutil.Process().children() if c.pid not in ignore] == []
    assert not first.exists()
    assert not second.exists()


async def test_the_child_does_not_run_atexit_handlers(concurrency: Concurrency, tmp_path: Path) -> None:
    marker = tmp_path / "atexit"
    handler = functools.partial(_touch, marker)
    atexit.register(handler)
    try:
        assert await concurrency.run(lambda: "done") == "done"
    finally:
        atexit.unregister(handler)
    assert not marker.exists()


async def test_output_is_neither_lost_nor_doubled(
    concurrency: Concurrency, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stdout"
    with path.open("w", buffering=1 << 16) as stdout:  # fully buffered, like stdout on a pipe
        monkeypatch.setattr(sys, "stdout", stdout)
        print("the server, before", flush=False)
        await concurrency.run(lambda: print("the task"))
        print("the server, after")
        monkeypatch.undo()
    assert path.read_text() == "the server, before\nthe task\nthe server, after\n"


async def test_a_grandchild_holding_the_pipe_hides_neither_a_result_nor_a_crash(
    concurrency: Concurrency, tmp_path: Path
) -> None:
    pid_files = [tmp_path / "ok.pid", tmp_path / "crash.pid"]
    try:
        results = await concurrency.run(
            {
                "ok": functools.partial(_fork_a_sleeper_then, pid_files[0], lambda: "fine"),
                "crash": functools.partial(_fork_a_sleeper_then, pid_files[1], functools.partial(helpers.crash, 3)),
            },
            return_exceptions=True,
        )
        assert results["ok"] == "fine"
        assert isinstance(results["crash"], WorkerCrashed)
        assert results["crash"].exitcode == 3
        grandchildren = [int(path.read_text()) for path in pid_files]
        assert all(psutil.pid_exists(pid) for pid in grandchildren), "the grandchildren should still hold the pipes"
    finally:
        for path in pid_files:
            if path.exists():
                os.kill(int(path.read_text()), signal.SIGKILL)


async def test_a_task_that_cannot_fork_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    real_fork = os.fork
    calls = 0

    def fork_fails_once() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_fork()

    monkeypatch.setattr(os, "fork", fork_fails_once)
    async with Concurrency(driver="fork", workers=1, env_file=None) as concurrency:  # one slot: forks in order
        results = await concurrency.run([lambda: "not started", lambda: "started"], return_exceptions=True)
    assert isinstance(results[0], BlockingIOError)
    assert results[1] == "started"


async def test_closing_the_driver_kills_its_children() -> None:
    driver = ForkDriver(1)
    assert driver.name == "fork"
    await driver.start()
    outcomes: list[Outcome | None] = [None]
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver.execute, [Task(0, functools.partial(time.sleep, 60))], outcomes)
        await helpers.eventually(lambda: bool(driver.pids))
        await driver.aclose()
    assert outcomes[0] is not None
    assert isinstance(outcomes[0].error, WorkerCrashed)
    assert outcomes[0].error.signal == signal.SIGKILL
    assert driver.pids == []
    with pytest.raises(ConcurrencyClosed):
        await driver.execute([Task(0, lambda: 1)], [None])


async def test_options_are_checked_at_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ForkDriver().workers == (os.cpu_count() or 1)
    assert create(Settings(workers=3)).workers == 3
    with pytest.raises(ConfigurationError, match="workers must be positive"):
        ForkDriver(0)
    monkeypatch.delattr(os, "fork")
    with pytest.raises(ConfigurationError, match=r"needs os\.fork\(\).*use the 'process' driver"):
        Concurrency(driver="fork", env_file=None)


async def test_a_facade_of_another_driver_runs_closures_on_its_fork_view() -> None:
    lock = threading.Lock()
    async with Concurrency(driver="sync", workers=2, env_file=None) as concurrency:
        assert await concurrency.driver("fork").run(lambda: lock.locked()) is False


async def test_a_call_cancelled_while_waiting_for_a_slot_gives_its_place_up(tmp_path: Path) -> None:
    ignore = {child.pid for child in psutil.Process().children()}
    marker = tmp_path / "go"
    async with Concurrency(driver="fork", workers=1, env_file=None) as concurrency:
        async with anyio.create_task_group() as tg:
            tg.start_soon(concurrency.run, functools.partial(_wait_for, marker))
            await helpers.eventually(lambda: any(c.pid not in ignore for c in psutil.Process().children()))
            with anyio.move_on_after(0.2) as scope:
                await concurrency.run(functools.partial(_touch, tmp_path / "never"))  # waits for the only slot
            assert scope.cancelled_caught
            marker.write_text("go")
        assert await concurrency.run(lambda: "next") == "next"
    assert not (tmp_path / "never").exists()


async def test_one_driver_serves_one_event_loop_after_another(anyio_backend: str) -> None:
    # As a facade used without its lifespan does: TestClient runs each request in a loop of its own.
    driver = ForkDriver(1)

    async def use() -> object:
        outcomes: list[Outcome | None] = [None]
        await driver.execute([Task(0, lambda: "ok")], outcomes)
        assert outcomes[0] is not None
        return outcomes[0].value

    other = "trio" if anyio_backend == "asyncio" else "asyncio"
    assert await use() == "ok"
    assert await anyio.to_thread.run_sync(functools.partial(anyio.run, use, backend=other)) == "ok"
    assert await use() == "ok"


async def test_a_server_that_ignores_sigchld_still_gets_results_and_crashes(concurrency: Concurrency) -> None:
    # With SIGCHLD ignored the kernel reaps children itself: their exit status is lost, not their result.
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        results = await concurrency.run([lambda: "fine", functools.partial(helpers.crash, 5)], return_exceptions=True)
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert results[0] == "fine"
    assert isinstance(results[1], WorkerCrashed)
    assert "ended without a result; its exit status was collected elsewhere" in str(results[1])


async def test_a_child_that_closes_its_pipe_and_lives_on_is_killed(concurrency: Concurrency) -> None:
    def close_everything_then_sleep() -> None:
        os.closerange(3, 4096)
        time.sleep(60)

    with pytest.raises(WorkerCrashed, match="closed its pipe without exiting"):
        await concurrency.run(close_everything_then_sleep)
