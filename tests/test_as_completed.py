"""`as_completed()`: results as their tasks finish, with `run()`'s errors, timeout and cancellation (issue 24).

The order tests need no clock: the task listed first waits for a file that the loop writes only once
it has received the result of the task listed second, so it can only finish after that result came
out of the loop. The stop tests use a task that would otherwise sleep for an hour: its worker must
die (process, fork) or its coroutine be cancelled (sync).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, assert_type

import anyio
import pytest

from starlette_concurrency import Concurrency, SerializationError, TaskTimeout
from starlette_concurrency._as_completed import AsCompleted

from . import helpers
from .conftest import DaskCluster

pytestmark = pytest.mark.anyio

DRIVERS = ["process", "fork", "sync"]


@pytest.fixture(params=[*DRIVERS, "dask"])
def driver_name(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    # (dask on trio is deselected by conftest: Dask distributed is built on asyncio)
    if request.param == "dask":
        cluster: DaskCluster = request.getfixturevalue("dask_cluster")
        monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", cluster.address)
    return str(request.param)


@pytest.fixture
async def concurrency(driver_name: str) -> AsyncIterator[Concurrency]:
    async with Concurrency(driver=driver_name, workers=2, env_file=None) as facade:
        yield facade


def wait_for(path: Path, value: object) -> object:
    """A task that finishes only once `path` exists."""
    import time

    for _ in range(600_000):
        if path.exists():
            return value
        time.sleep(0.001)
    raise TimeoutError(f"{path} never appeared")


async def hang(pid_file: Path, cancelled: Path) -> None:
    """Say where it runs, then sleep for an hour unless stopped; a cancelled coroutine says so."""
    await anyio.Path(pid_file).write_text(str(os.getpid()))
    try:
        await anyio.sleep(3600)
    finally:
        cancelled.write_text("cancelled")  # the sync driver's case; a killed worker writes nothing


def fail_at_once() -> None:
    raise LookupError("no such order")


def fail_once_started(pid_file: Path) -> None:
    wait_for(pid_file, None)  # the hanging task runs: failing now must stop it
    fail_at_once()


async def collect(results: AsyncIterator[tuple[Any, Any]], into: list[object]) -> None:
    async for item in results:
        into.append(item)


async def assert_stopped(driver_name: str, pid_file: Path, cancelled: Path) -> None:
    """The hanging task runs no more: its worker is gone, or its coroutine was cancelled.

    Call it once the call was stopped and waited for (execute() returned): a task that has not
    started by then never will (the driver dropped it), so a missing pid file is a task that never ran.
    """
    if not pid_file.exists():
        return
    if driver_name == "sync":
        await helpers.eventually(cancelled.exists, timeout=60)
    else:
        await helpers.eventually(lambda: helpers.gone(int(pid_file.read_text())), timeout=60)


@pytest.mark.parametrize("driver_name", ["process", "fork", "dask"], indirect=True)
async def test_a_result_comes_out_of_the_loop_while_other_tasks_still_run(
    concurrency: Concurrency, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    seen = []
    async for key, result in concurrency.as_completed({"slow": lambda: wait_for(go, "S"), "fast": lambda: "F"}):
        seen.append((key, result))
        go.touch()  # only now can the slow task finish: it was listed first, it comes out second
    assert seen == [("fast", "F"), ("slow", "S")]


@pytest.mark.parametrize("driver_name", DRIVERS, indirect=True)
async def test_keys_are_indexes_of_a_sequence_and_0_for_one_callable(concurrency: Concurrency) -> None:
    results = [item async for item in concurrency.as_completed([lambda: 10, lambda: 11, lambda: 12])]
    assert sorted(results) == [(0, 10), (1, 11), (2, 12)]
    assert [item async for item in concurrency.as_completed(lambda: "one")] == [(0, "one")]
    nothing: list[Callable[[], int]] = []
    assert [item async for item in concurrency.as_completed(nothing)] == []
    assert [item async for item in concurrency.as_completed(dict(enumerate(nothing)))] == []


async def test_a_failure_raises_when_reached_and_stops_the_other_tasks(
    concurrency: Concurrency, driver_name: str, tmp_path: Path
) -> None:
    pid_file, cancelled = tmp_path / "pid", tmp_path / "cancelled"
    tasks: dict[str, Callable[[], Any]] = {"orders": lambda: hang(pid_file, cancelled), "bad": fail_at_once}
    if driver_name in ("process", "fork"):
        tasks["bad"] = lambda: fail_once_started(pid_file)  # fails while the other task runs
    elif driver_name == "sync":
        tasks = {"bad": fail_at_once, "orders": tasks["orders"]}  # one after the other: the hang would come first
    else:
        del tasks["orders"]  # a dask worker's thread cannot be stopped
    seen: list[object] = []
    with pytest.raises(LookupError, match="no such order") as info:
        await collect(concurrency.as_completed(tasks), seen)
    assert seen == []
    assert any(note.startswith("(raised by task 'bad' (") for note in info.value.__notes__)
    if driver_name in ("process", "fork"):
        assert pid_file.exists()
    await assert_stopped(driver_name, pid_file, cancelled)


async def test_return_exceptions_gives_the_exception_as_the_result(concurrency: Concurrency) -> None:
    results = dict([item async for item in concurrency.as_completed([fail_at_once, lambda: 1], return_exceptions=True)])
    assert results[1] == 1
    assert isinstance(results[0], LookupError)
    assert "(raised by task 0 (fail_at_once))" in results[0].__notes__


@pytest.mark.parametrize("driver_name", DRIVERS, indirect=True)
async def test_leaving_the_loop_early_stops_the_remaining_tasks(
    concurrency: Concurrency, driver_name: str, tmp_path: Path
) -> None:
    pid_file, cancelled = tmp_path / "pid", tmp_path / "cancelled"
    async for key, _ in concurrency.as_completed([lambda: "first", lambda: hang(pid_file, cancelled)]):
        assert key == 0
        await helpers.eventually(pid_file.exists, timeout=60)  # (the sync driver starts it only now)
        break  # no aclose(): the iterator's last reference going stops the call, without waiting
    if driver_name == "sync":
        await helpers.eventually(cancelled.exists, timeout=60)
    else:
        await helpers.eventually(lambda: helpers.gone(int(pid_file.read_text())), timeout=60)


@pytest.mark.parametrize("driver_name", DRIVERS, indirect=True)
async def test_aclose_and_async_with_stop_the_tasks_before_they_return(
    concurrency: Concurrency, driver_name: str, tmp_path: Path
) -> None:
    pid_file, cancelled = tmp_path / "pid", tmp_path / "cancelled"
    async with concurrency.as_completed([lambda: "first", lambda: hang(pid_file, cancelled)]) as results:
        async for key, _ in results:
            assert key == 0
            await helpers.eventually(pid_file.exists, timeout=60)
            break
    if driver_name == "sync":
        assert cancelled.exists()  # already: the block's exit waited for the task to stop
    else:
        await helpers.eventually(lambda: helpers.gone(int(pid_file.read_text())), timeout=60)
    await results.aclose()  # again: nothing left to do
    assert [item async for item in results] == []  # and a closed iterator gives nothing


@pytest.mark.parametrize("driver_name", DRIVERS, indirect=True)
async def test_cancelling_the_loop_stops_the_remaining_tasks(
    concurrency: Concurrency, driver_name: str, tmp_path: Path
) -> None:
    pid_file, cancelled = tmp_path / "pid", tmp_path / "cancelled"
    with anyio.CancelScope() as scope:
        async for _ in concurrency.as_completed([lambda: "first", lambda: hang(pid_file, cancelled)]):
            await helpers.eventually(pid_file.exists, timeout=60)
            scope.cancel()  # the next iteration is cancelled
    assert scope.cancelled_caught
    assert pid_file.exists()
    await assert_stopped(driver_name, pid_file, cancelled)


@pytest.mark.parametrize("driver_name", DRIVERS, indirect=True)
async def test_a_timeout_gives_what_finished_then_raises_and_stops_the_rest(
    concurrency: Concurrency, driver_name: str, tmp_path: Path
) -> None:
    pid_file, cancelled = tmp_path / "pid", tmp_path / "cancelled"
    seen: list[object] = []
    results = concurrency.as_completed({"quick": lambda: "done", "slow": lambda: hang(pid_file, cancelled)}, timeout=1)
    with pytest.raises(TaskTimeout, match=r"as_completed\(\) did not finish within 1.0 s; stopped 1 unfinished task"):
        await collect(results, seen)
    assert seen in ([], [("quick", "done")])  # (a loaded machine may not even start the quick one within the second)
    await assert_stopped(driver_name, pid_file, cancelled)


@pytest.mark.parametrize("driver_name", ["process"], indirect=True)
async def test_a_task_that_cannot_be_pickled_fails_the_first_iteration_and_nothing_runs(
    concurrency: Concurrency, tmp_path: Path
) -> None:
    lock, marker = threading.Lock(), tmp_path / "ran"
    results = concurrency.as_completed([lambda: marker.touch(), lambda: lock])
    with pytest.raises(SerializationError, match=r"task 1 \(<lambda>\) cannot be pickled.*captured variable 'lock'"):
        await results.__anext__()
    assert not marker.exists()
    with pytest.raises(StopAsyncIteration):
        await results.__anext__()


@pytest.mark.parametrize("driver_name", ["process", "sync"], indirect=True)
async def test_bad_input_is_refused_at_the_call(concurrency: Concurrency) -> None:
    with pytest.raises(TypeError, match=r"tasks\[1\] is not callable"):
        concurrency.as_completed([lambda: 1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        concurrency.as_completed([lambda: 1], timeout=-1)


# Each async library hosting, each iterating from another thread: a cancel scope made under the caller's
# library and entered on the host's failed the call (or hung it) before the scope was made on the host.
@pytest.mark.parametrize("caller", ["asyncio", "trio"])
@pytest.mark.parametrize("driver_name", ["process", "fork"], indirect=True)
async def test_another_threads_event_loop_can_iterate(concurrency: Concurrency, tmp_path: Path, caller: str) -> None:
    # The pool is hosted by this test's loop; a loop in another thread reaches it through the portal.
    go = tmp_path / "go"

    async def consume() -> list[tuple[int, object]]:
        seen = []
        async for item in concurrency.as_completed([lambda: wait_for(go, "S"), lambda: "F"]):
            seen.append(item)
            go.touch()
        return seen

    with anyio.fail_after(120):  # a hang fails here, naming itself, rather than at pytest's timeout
        seen = await anyio.to_thread.run_sync(
            functools.partial(anyio.run, consume, backend=caller), abandon_on_cancel=True
        )
    assert seen == [(1, "F"), (0, "S")]


def typing_cases(concurrency: Concurrency) -> None:
    """Not a test: mypy --strict reads it (scripts/check)."""

    async def total() -> int:
        return 1

    assert_type(concurrency.as_completed({"a": lambda: "x"}), AsCompleted[str, str])
    assert_type(concurrency.as_completed([total]), AsCompleted[int, int])
    assert_type(concurrency.as_completed(lambda: 1.5), AsCompleted[int, float])
    assert_type(concurrency.as_completed([total], return_exceptions=True), AsCompleted[int, int | BaseException])
