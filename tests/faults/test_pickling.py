"""What cannot travel between the server and a worker: the caller always gets a clear error."""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from starlette_concurrency import Concurrency, RemoteError, RemoteTraceback, SerializationError
from starlette_concurrency._drivers.process import ProcessDriver
from starlette_concurrency._tasks import function_name

from .. import helpers

pytestmark = pytest.mark.anyio


@pytest.fixture
async def concurrency() -> AsyncIterator[Concurrency]:
    async with Concurrency(driver=ProcessDriver(2), env_file=None) as facade:
        yield facade


@pytest.mark.parametrize(
    "capture",
    [threading.Lock, socket.socket, functools.partial(open, os.devnull, "w"), lambda: (i for i in range(3))],
    ids=["lock", "socket", "open-file", "generator"],
)
async def test_an_unpicklable_closure_names_the_task_and_runs_nothing(
    concurrency: Concurrency, tmp_path: Path, capture: Callable[[], object]
) -> None:
    captured = capture()
    marker = tmp_path / "marker"
    try:
        with pytest.raises(SerializationError, match=r"task 'bad' \(<lambda>\) cannot be pickled"):
            await concurrency.run(
                {"first": functools.partial(helpers.sleep_then_touch, marker, 0), "bad": lambda: captured}
            )
    finally:
        close = getattr(captured, "close", None)
        if close is not None:
            close()
    assert not marker.exists()


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (
            helpers.return_lock,
            r"the result of task 0 \(return_lock\) cannot be pickled: "
            r"TypeError: cannot pickle '_thread.lock'",
        ),
        (
            helpers.return_generator,
            r"the result of task 0 \(return_generator\) cannot be pickled: "
            r"TypeError: cannot pickle 'generator'",
        ),
        (helpers.return_unloadable, r"the result of task 0 \(return_unloadable\) could not be unpickled: ValueError"),
    ],
    ids=["lock", "generator", "fails-to-load"],
)
async def test_a_result_that_cannot_travel_is_a_serialization_error(
    concurrency: Concurrency, task: Callable[[], object], message: str
) -> None:
    with pytest.raises(SerializationError, match=message):
        await concurrency.run([task])
    assert await concurrency.run(lambda: "the worker lives on") == "the worker lives on"


async def test_a_result_of_a_class_defined_in_the_caller_comes_back_as_that_class(concurrency: Concurrency) -> None:
    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    point = await concurrency.run(lambda: Point(3))
    assert type(point) is Point
    assert point.x == 3


async def test_exceptions_whose_init_wants_other_arguments_keep_their_type_and_attributes(
    concurrency: Concurrency,
) -> None:
    two, many, keyword, os_error = await concurrency.run(
        [
            helpers.raise_two_argument_error,
            helpers.raise_many_arguments_error,
            helpers.raise_keyword_only_error,
            helpers.raise_custom_os_error,
        ],
        return_exceptions=True,
    )
    assert type(two) is helpers.TwoArgumentError
    assert str(two) == "418: teapot"
    assert two.code == 418
    assert type(many) is helpers.ManyArgumentsError
    assert (many.code, many.reason, many.retry) == (503, "busy", True)
    assert type(keyword) is helpers.KeywordOnlyError
    assert keyword.field == "email"
    assert type(os_error) is helpers.CustomOSError
    assert (os_error.errno, os_error.filename, os_error.hint) == (2, "/nope", "check the path")
    for error in (two, many, keyword, os_error):
        assert isinstance(error.__cause__, RemoteTraceback)
        assert "Traceback" in error.__cause__.traceback


async def test_an_exception_class_defined_in_the_caller_can_be_caught_as_itself(concurrency: Concurrency) -> None:
    class LocalError(Exception):
        pass

    def fail() -> None:
        raise LocalError("local")

    with pytest.raises(LocalError, match="local"):
        await concurrency.run(fail)


@pytest.mark.parametrize(
    ("task", "type_name", "message"),
    [
        (helpers.raise_unpicklable_attribute_error, "tests.helpers.UnpicklableAttributeError", "has a lock"),
        (helpers.raise_refuses_pickling_error, "tests.helpers.RefusesPicklingError", "stay"),
        (helpers.raise_bad_str_error, "tests.helpers.BadStrError", "<exception str() failed>"),
        (functools.partial(helpers.exit_worker, 3), "SystemExit", "3"),
        (helpers.interrupt, "KeyboardInterrupt", ""),
    ],
    ids=["unpicklable-attribute", "refuses-pickling", "str-fails", "sys-exit", "keyboard-interrupt"],
)
async def test_an_exception_that_cannot_travel_as_itself_is_a_remote_error(
    concurrency: Concurrency, task: Callable[[], object], type_name: str, message: str
) -> None:
    # SystemExit and KeyboardInterrupt too: raised as themselves, they would stop the server.
    with pytest.raises(RemoteError) as info:
        await concurrency.run(task)
    error = info.value
    assert (error.type_name, error.message) == (type_name, message)
    assert "Traceback" in error.traceback
    assert isinstance(error.__cause__, RemoteTraceback)
    assert f"(raised by task 0 ({function_name(task)}))" in error.__notes__
    assert await concurrency.run(lambda: "the worker lives on") == "the worker lives on"


async def test_a_task_that_cannot_be_unpickled_in_the_worker_is_a_serialization_error(
    concurrency: Concurrency, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module the server can import but the workers (started earlier, with the sys.path of then) cannot.
    (tmp_path / "sc_only_here.py").write_text("def where():\n    return 'here'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sc_only_here  # type: ignore[import-not-found]

    try:
        with pytest.raises(SerializationError, match=r"task 0 \(where\) could not be unpickled in the worker.*sc_only"):
            await concurrency.run(sc_only_here.where)
    finally:
        del sys.modules["sc_only_here"]


async def test_in_a_long_call_only_the_task_that_cannot_be_unpickled_fails(
    concurrency: Concurrency, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tasks travel in chunks pickled together; a chunk the worker cannot load is resent task by task.
    (tmp_path / "sc_only_here_too.py").write_text("def where():\n    return 'here'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sc_only_here_too  # type: ignore[import-not-found]

    try:
        tasks: list[Callable[[], object]] = [functools.partial(helpers.identity, i) for i in range(40)]
        tasks[7] = sc_only_here_too.where
        results = await concurrency.run(tasks, return_exceptions=True)
    finally:
        del sys.modules["sc_only_here_too"]
    assert isinstance(results[7], SerializationError)
    assert "task 7 (where) could not be unpickled in the worker" in str(results[7])
    assert results[:7] + results[8:] == [i for i in range(40) if i != 7]
