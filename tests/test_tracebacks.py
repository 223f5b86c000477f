"""A task's traceback names the user's file, line and source line, with every driver (issue 24).

cloudpickle 3.1.2 and later rebuild the code of a function it sends by value with the file name "<dynamic-code>";
the worker's frame of a lambda then read `File "<dynamic-code>", line 5, in <lambda>`, without the
source line. These tests run real workers and read the traceback the caller gets.
"""

from __future__ import annotations

import logging
import pickle
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from starlette_concurrency import Concurrency, _closures as closures
from starlette_concurrency._exceptions import RemoteTraceback
from starlette_concurrency._locations import dumps as located_dumps

pytestmark = pytest.mark.anyio

HERE = __file__


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # where a frame's file name comes from does not depend on the event loop


def traceback_text(exc: BaseException) -> str:
    """The worker's traceback when the task ran elsewhere (its `__cause__`), else the exception's own."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        return cause.traceback
    return "".join(traceback.format_exception(exc))


def frame_line(func: Callable[..., Any], name: str) -> str:
    return f'File "{HERE}", line {func.__code__.co_firstlineno}, in {name}'


def assert_located(text: str, func: Callable[..., Any], name: str, source: str) -> None:
    assert "<dynamic-code>" not in text
    lines = text.splitlines()
    found = [i for i, line in enumerate(lines) if line.strip() == frame_line(func, name)]
    assert found  # (dask shows the frame twice: in the worker's traceback and in the one it re-raises with)
    assert all(lines[index + 1].strip() == source for index in found)  # linecache read the line in the worker


def a_closure() -> Callable[[], int]:
    rows = [1, 2]

    def count_rows() -> int:
        return rows[5]

    return count_rows


def a_nested_function() -> int:
    def deeper() -> int:
        raise LookupError("deeper")

    return deeper()


async def test_a_lambdas_frame_names_its_file_line_and_source(concurrency: Concurrency) -> None:
    task = lambda: 1 / 0  # noqa: E731 - a lambda is the case
    with pytest.raises(ZeroDivisionError) as info:
        await concurrency.run([task])
    assert_located(
        traceback_text(info.value), task, "<lambda>", "task = lambda: 1 / 0  # noqa: E731 - a lambda is the case"
    )


async def test_a_closures_frame_names_its_file_line_and_source(concurrency: Concurrency) -> None:
    task = a_closure()
    assert task.__closure__  # a cell: the function goes by value, through the function cache
    with pytest.raises(IndexError) as info:
        await concurrency.run(task)
    text = traceback_text(info.value)
    assert "<dynamic-code>" not in text
    line = task.__code__.co_firstlineno + 1
    assert f'File "{HERE}", line {line}, in count_rows\n    return rows[5]\n' in text


async def test_a_function_defined_in_a_task_keeps_its_location_too(concurrency: Concurrency) -> None:
    # The inner function's code is a constant of the outer one's: it travels inside it.
    task: Callable[[], Any] = lambda: (lambda: [][0])()  # noqa: E731 - lambdas are the case
    with pytest.raises(IndexError) as info:
        await concurrency.run(task)
    text = traceback_text(info.value)
    assert "<dynamic-code>" not in text
    assert text.count(frame_line(task, "<lambda>")) == 2  # the outer lambda's frame and the inner one's


@pytest.mark.parametrize("driver_name", ["process"], indirect=True)
async def test_a_function_too_large_to_cache_keeps_its_location(
    concurrency: Concurrency, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(closures, "MAX_SKELETON_BYTES", 0)  # every function takes cloudpickle's own path
    task = a_closure()
    with pytest.raises(IndexError) as info:
        await concurrency.run(task)
    assert f'File "{HERE}", line {task.__code__.co_firstlineno + 1}, in count_rows' in traceback_text(info.value)


@pytest.mark.parametrize("driver_name", ["process", "dask"], indirect=True)
async def test_the_deferred_failure_log_names_the_users_line(
    concurrency: Concurrency, caplog: pytest.LogCaptureFixture
) -> None:
    task = lambda: 1 / 0  # noqa: E731 - a lambda is the case
    with caplog.at_level(logging.ERROR, logger="starlette_concurrency"):
        concurrency.defer({"report": task})
        await concurrency.aclose()  # drains the deferred work
    [record] = [record for record in caplog.records if record.exc_info]
    text = logging.Formatter().format(record)
    assert_located(text, task, "<lambda>", "task = lambda: 1 / 0  # noqa: E731 - a lambda is the case")


def test_code_objects_keep_their_file_name_and_lines_when_pickled() -> None:
    outer = a_closure()
    rebuilt = pickle.loads(located_dumps(a_nested_function.__code__))
    assert rebuilt.co_filename == HERE
    assert rebuilt.co_firstlineno == a_nested_function.__code__.co_firstlineno
    [inner] = [const for const in rebuilt.co_consts if hasattr(const, "co_filename")]
    assert inner.co_filename == HERE  # code nested in code
    assert pickle.loads(located_dumps(outer)).__code__.co_filename == HERE
