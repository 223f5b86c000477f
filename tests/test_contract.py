"""The contract every driver honours (DESIGN §2), run against each of them on asyncio and trio."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from starlette_concurrency import Concurrency, ConcurrencyClosed, RemoteError, TaskTimeout

from . import helpers

pytestmark = pytest.mark.anyio


async def test_a_single_callable_returns_its_result(concurrency: Concurrency) -> None:
    assert await concurrency.run(lambda: 6 * 7) == 42


async def test_a_sequence_returns_results_in_input_order(concurrency: Concurrency) -> None:
    # The first task finishes last wherever tasks run in parallel: order must not depend on that.
    tasks = [
        functools.partial(helpers.sleep_then, "slow", 0.3),
        functools.partial(helpers.identity, "fast"),
        functools.partial(helpers.sleep_then, "medium", 0.1),
    ]
    assert await concurrency.run(tasks) == ["slow", "fast", "medium"]


async def test_a_mapping_returns_a_dict_with_the_same_keys_in_the_same_order(concurrency: Concurrency) -> None:
    results = await concurrency.run(
        {
            "users": functools.partial(helpers.sleep_then, 3, 0.2),
            "orders": lambda: 5,
            7: lambda: "seven",
        }
    )
    assert results == {"users": 3, "orders": 5, 7: "seven"}
    assert list(results) == ["users", "orders", 7]


async def test_empty_inputs_give_empty_results(concurrency: Concurrency) -> None:
    assert await concurrency.run([]) == []
    assert await concurrency.run({}) == {}
    assert await concurrency.run(()) == []


async def test_any_zero_argument_callable_is_a_task(concurrency: Concurrency) -> None:
    counter = helpers.Counter(41)
    base = 10
    results = await concurrency.run(
        [
            functools.partial(helpers.add, 1, 2),
            counter.next,
            helpers.pid,
            lambda: base + 1,
            (lambda x: lambda: x * 2)(21),
        ]
    )
    assert results[0] == 3
    assert results[1] == 42
    assert isinstance(results[2], int)
    assert results[3:] == [11, 42]


async def test_generators_of_callables_are_accepted(concurrency: Concurrency) -> None:
    assert await concurrency.run(functools.partial(helpers.identity, i) for i in range(5)) == [0, 1, 2, 3, 4]


async def test_coroutine_functions_are_awaited(concurrency: Concurrency) -> None:
    results = await concurrency.run(
        {
            "a": functools.partial(helpers.async_sleep_then, "a", 0.05),
            "b": functools.partial(helpers.async_sleep_then, "b", 0),
        }
    )
    assert results == {"a": "a", "b": "b"}


async def test_a_failure_is_raised_as_its_own_type_with_a_note_naming_the_task(concurrency: Concurrency) -> None:
    with pytest.raises(ValueError, match="boom") as info:
        await concurrency.run({"ok": lambda: 1, "bad": functools.partial(helpers.fail, "boom")})
    assert "(raised by task 'bad')" in info.value.__notes__


async def test_the_first_failure_by_position_wins_and_the_others_are_noted(concurrency: Concurrency) -> None:
    tasks: list[Callable[[], object]] = [
        lambda: "fine",
        functools.partial(helpers.fail_later, "first", 0.2),  # fails last, but comes first by position
        functools.partial(helpers.fail, "second"),
        lambda: 1 / 0,
    ]
    with pytest.raises(LookupError, match="first") as info:
        await concurrency.run(tasks)
    notes = info.value.__notes__
    assert notes[0] == "(raised by task 1)"
    assert "(task 2 also failed: ValueError: second)" in notes
    assert "(task 3 also failed: ZeroDivisionError: division by zero)" in notes


async def test_all_tasks_finish_even_when_one_fails(concurrency: Concurrency, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(ValueError, match="early"):
        await concurrency.run(
            [functools.partial(helpers.fail, "early"), functools.partial(helpers.sleep_then_touch, marker, 0.2)]
        )
    assert marker.read_text() == "ran"


async def test_a_task_calling_sys_exit_does_not_stop_the_caller(concurrency: Concurrency) -> None:
    with pytest.raises(RemoteError) as info:
        await concurrency.run([lambda: 1, functools.partial(sys.exit, 3)])
    assert (info.value.type_name, info.value.message) == ("SystemExit", "3")
    assert "(raised by task 1)" in info.value.__notes__
    assert await concurrency.run(lambda: "still here") == "still here"


async def test_return_exceptions_puts_failures_in_the_results(concurrency: Concurrency) -> None:
    results = await concurrency.run(
        {"ok": lambda: 1, "bad": functools.partial(helpers.fail, "nope")}, return_exceptions=True
    )
    assert results["ok"] == 1
    assert isinstance(results["bad"], ValueError)
    assert str(results["bad"]) == "nope"
    assert "(raised by task 'bad')" in results["bad"].__notes__


async def test_an_exception_returned_as_a_value_is_not_raised(concurrency: Concurrency) -> None:
    result = await concurrency.run(lambda: ValueError("just a value"))
    assert isinstance(result, ValueError)


async def test_a_timeout_raises_task_timeout_and_stops_the_task(concurrency: Concurrency, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(TaskTimeout, match=r"task 1") as info:
        await concurrency.run([lambda: 1, functools.partial(helpers.sleep_then_touch, marker, 1.0)], timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    await anyio.sleep(1.2)
    assert not marker.exists(), "the timed-out task went on running"
    assert await concurrency.run(lambda: "still works") == "still works"


async def test_the_facade_timeout_is_the_default(driver_name: str, tmp_path: Path) -> None:
    async with Concurrency(driver=driver_name, workers=1, timeout=0.2, env_file=None) as concurrency:
        with pytest.raises(TaskTimeout):
            await concurrency.run(functools.partial(helpers.async_sleep_then, None, 5))


async def test_cancelling_the_caller_stops_its_tasks(concurrency: Concurrency, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with anyio.move_on_after(0.3) as scope:
        await concurrency.run(functools.partial(helpers.sleep_then_touch, marker, 1.0))
    assert scope.cancelled_caught
    await anyio.sleep(1.2)
    assert not marker.exists(), "the cancelled task went on running"
    assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]


async def test_concurrent_calls_do_not_mix_results(concurrency: Concurrency) -> None:
    results: dict[int, list[object]] = {}

    async def call(n: int) -> None:
        results[n] = await concurrency.run([functools.partial(helpers.identity, (n, i)) for i in range(7)])

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(call, n)
    assert results == {n: [(n, i) for i in range(7)] for n in range(6)}


async def test_many_tasks(concurrency: Concurrency) -> None:
    results = await concurrency.run([functools.partial(helpers.add, i, 1) for i in range(1000)])
    assert results == list(range(1, 1001))


async def test_a_closed_facade_refuses_work(driver_name: str) -> None:
    concurrency = Concurrency(driver=driver_name, workers=1, env_file=None)
    assert await concurrency.run(lambda: 1) == 1
    await concurrency.aclose()
    await concurrency.aclose()  # idempotent
    with pytest.raises(ConcurrencyClosed):
        await concurrency.run(lambda: 1)
    with pytest.raises(RuntimeError):  # ConcurrencyClosed is also a RuntimeError
        concurrency.defer(lambda: 1)


async def test_a_closed_facade_starts_again_when_entered(driver_name: str) -> None:
    concurrency = Concurrency(driver=driver_name, workers=1, env_file=None)
    async with concurrency:
        assert await concurrency.run(lambda: 1) == 1
    async with concurrency:
        assert await concurrency.run(lambda: 2) == 2


async def test_defer_from_a_worker_thread_runs_in_the_background(concurrency: Concurrency, tmp_path: Path) -> None:
    marker = tmp_path / "from-thread"
    await anyio.to_thread.run_sync(concurrency.defer, functools.partial(helpers.sleep_then_touch, marker, 0))
    await helpers.eventually(marker.exists)


async def test_defer_outside_a_request_runs_in_the_background(concurrency: Concurrency, tmp_path: Path) -> None:
    markers = [tmp_path / "a", tmp_path / "b"]
    concurrency.defer([functools.partial(helpers.sleep_then_touch, marker, 0.05) for marker in markers])
    await helpers.eventually(lambda: all(marker.exists() for marker in markers))
