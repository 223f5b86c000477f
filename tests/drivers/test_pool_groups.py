"""Tasks of a long call pickled in groups (one dump each): naming, loading, crashes, the wire format."""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from starlette_concurrency import Concurrency, SerializationError, WorkerCrashed
from starlette_concurrency._closures import ClosureCache, Payload
from starlette_concurrency._drivers.process import ProcessDriver
from starlette_concurrency._pickling import pickle_group
from starlette_concurrency._tasks import Task
from starlette_concurrency._wire.protocol import (
    SINGLE,
    TASKS,
    ProtocolError,
    parse_tasks,
    resend_body,
    split_resend,
    tasks_frame,
)

from .. import helpers

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def server_only_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], str]]:
    """Yield a function of a module the server imports but the workers, started earlier, cannot.

    The workers got the server's sys.path as it was when they started, so a function of this module
    (pickled by name) does not load in them.
    """
    name = f"sc_server_only_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("def where():\n    return 'here'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    try:
        yield module.where
    finally:
        del sys.modules[name]


def touch(path: Path) -> None:
    path.touch()


async def test_a_long_call_is_pickled_in_groups_and_a_short_one_task_by_task(
    pool: tuple[Concurrency, ProcessDriver],
) -> None:
    _, driver = pool
    long = await driver._pool._pickle([Task(i, functools.partial(helpers.identity, i)) for i in range(300)])
    assert {slot for _, slot in long} == set(range(300 // 16))  # groups of 300 // (8 x 2 workers) tasks
    assert len({id(payload) for payload, _ in long}) == 17
    short = await driver._pool._pickle([Task(i, functools.partial(helpers.identity, i)) for i in range(20)])
    assert {slot for _, slot in short} == {-1}


async def test_one_unpicklable_task_in_a_long_call_is_named_and_nothing_runs(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path
) -> None:
    concurrency, driver = pool
    tasks: list[Callable[[], object]] = [functools.partial(touch, tmp_path / str(i)) for i in range(300)]
    lock = threading.Lock()
    tasks[123] = lambda: lock  # a lock will not pickle
    with pytest.raises(SerializationError, match=r"task 123 \(<lambda>\) cannot be pickled"):
        await concurrency.run(tasks)
    assert list(tmp_path.iterdir()) == []
    assert driver.stats().tasks_completed == 0
    assert await concurrency.run(tasks[:100] + tasks[124:]) == [None] * 276  # the others were fine


async def test_in_a_group_that_will_not_load_only_the_task_that_cannot_be_unpickled_fails(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    concurrency, _ = pool
    # The group's payload does not load, so its tasks are sent again one by one.
    with server_only_function(tmp_path, monkeypatch) as where:
        tasks: list[Callable[[], object]] = [functools.partial(helpers.identity, i) for i in range(400)]
        tasks[150] = where
        tasks[151] = lambda: "a lambda beside it"
        results = await concurrency.run(tasks, return_exceptions=True)
    assert isinstance(results[150], SerializationError)
    assert "task 150 (where) could not be unpickled in the worker" in str(results[150])
    assert results[151] == "a lambda beside it"
    assert results[:150] + results[152:] == [i for i in range(400) if i not in (150, 151)]
    assert await concurrency.run([functools.partial(helpers.identity, i) for i in range(200)]) == list(range(200))


async def test_a_crash_in_the_middle_of_a_group_fails_exactly_the_task_that_was_running(
    pool: tuple[Concurrency, ProcessDriver],
) -> None:
    concurrency, driver = pool
    crashing = {5, 100, 101, 250}  # in groups of 18: mid-group, two in a row, near the end
    with anyio.fail_after(60):
        results = await concurrency.run(
            [functools.partial(helpers.echo_or_crash, i, i in crashing) for i in range(300)], return_exceptions=True
        )
    for i, result in enumerate(results):
        if i in crashing:
            assert isinstance(result, WorkerCrashed), i
            assert f"task {i} " in str(result)
        else:
            assert result == i, i  # the un-run rest of its group ran on a worker, exactly once
    assert driver.stats().tasks_crashed == len(crashing)


async def test_lambdas_in_one_group_keep_their_own_state(pool: tuple[Concurrency, ProcessDriver]) -> None:
    concurrency, _ = pool

    def make(i: int) -> Callable[[], object]:
        return lambda: (i, [i] * (i % 3))

    tasks = [make(i) if i % 2 else functools.partial(helpers.identity, i) for i in range(500)]
    expected = [(i, [i] * (i % 3)) if i % 2 else i for i in range(500)]
    assert await concurrency.run(tasks) == expected


def test_a_tasks_frame_carries_single_tasks_and_ranges_of_groups() -> None:
    entries = [(7, 1, SINGLE, b"one callable"), (8, 3, 2, b"a list of callables"), (11, 1, 0, b"")]
    data = tasks_frame(b"definitions", entries)
    assert data[6:7] == TASKS
    assert parse_tasks(data[7:]) == (b"definitions", entries)


@pytest.mark.parametrize(("count", "start"), [(0, 0), (2, SINGLE)])
def test_a_tasks_frame_with_an_impossible_entry_is_a_protocol_error(count: int, start: int) -> None:
    body = tasks_frame(b"", [(7, count, start, b"x")])[7:]
    with pytest.raises(ProtocolError, match="malformed TASKS frame"):
        parse_tasks(body)


def test_a_resend_names_its_tasks() -> None:
    assert split_resend(resend_body(2**40, 18)) == (2**40, 18)
    with pytest.raises(ProtocolError, match="malformed RESEND"):
        split_resend(resend_body(1, 2)[:-1])


_LOADS: dict[int, int] = {}  # in a worker: how many times each Marker was unpickled there


def _loaded(value: int) -> int:
    _LOADS[value] = _LOADS.get(value, 0) + 1
    return value


class Marker:
    """Counts, in the worker, how many times it was unpickled."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return _loaded, (self.value,)


def loads_of(value: int) -> int:
    return _LOADS[value]


async def test_a_group_sent_in_several_frames_is_loaded_once_by_a_worker(
    pool: tuple[Concurrency, ProcessDriver],
) -> None:
    # The queue's tail goes out a task or two per frame, so the last groups reach each worker in
    # pieces: each piece must not unpickle the whole group again.
    concurrency, _ = pool
    tasks: list[Callable[[], object]] = [functools.partial(loads_of, Marker(i)) for i in range(300)]  # type: ignore[arg-type]  # a Marker loads as an int
    results = await concurrency.run(tasks)
    assert results == [1] * 300


class PicklesOnce:
    """A task that pickles the first time only (its state changes after the call started, say)."""

    def __init__(self) -> None:
        self.pickled = 0

    def __call__(self) -> str:
        return "ran"

    def __reduce__(self) -> tuple[object, tuple[()]]:
        self.pickled += 1
        if self.pickled > 1:
            raise TypeError("not any more")
        return PicklesOnce, ()


async def test_a_task_of_a_group_sent_back_that_no_longer_pickles_fails_alone(
    pool: tuple[Concurrency, ProcessDriver], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    concurrency, _ = pool
    with server_only_function(tmp_path, monkeypatch) as where:
        tasks: list[Callable[[], object]] = [functools.partial(helpers.identity, i) for i in range(300)]
        tasks[150] = where  # the group will not load in the worker: it is sent back
        tasks[151] = PicklesOnce()  # and pickled again, task by task
        results = await concurrency.run(tasks, return_exceptions=True)
    assert isinstance(results[150], SerializationError)
    assert isinstance(results[151], SerializationError)
    assert "task 151 (PicklesOnce) cannot be pickled" in str(results[151])
    assert results[:150] + results[152:] == [i for i in range(300) if i not in (150, 151)]


class ListRefusingCache(ClosureCache):
    """A cache that will not pickle a list as a whole (as a dump too deep for the whole group would)."""

    def dumps(self, obj: object) -> Payload:
        if isinstance(obj, list):
            raise RecursionError("too deep as a whole")
        return super().dumps(obj)


def test_a_group_that_will_not_pickle_as_a_whole_falls_back_to_one_dump_per_task() -> None:
    tasks = [Task(i, functools.partial(helpers.identity, i)) for i in range(8)]
    assert pickle_group(tasks, ListRefusingCache()) is None
    lock = threading.Lock()
    tasks[6] = Task(6, lambda: lock)
    with pytest.raises(SerializationError, match=r"task 6 \(<lambda>\) cannot be pickled"):
        pickle_group(tasks, ListRefusingCache())
