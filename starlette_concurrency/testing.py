"""The driver contract kit: every test the built-in drivers pass, ready to run against your own driver.

Subclass `DriverContract` in a test module and say how to build your driver::

    import pytest
    from starlette_concurrency.testing import DriverContract

    class TestMyDriver(DriverContract):
        @pytest.fixture
        def driver(self):
            return lambda settings: MyDriver(workers=settings.workers)

pytest then runs each contract test (input shapes, ordering, errors and their notes, timeouts,
cancellation, concurrent calls, lifecycle, `defer()`) on asyncio and on trio. Override the
`anyio_backend` fixture to run on one backend only. The tasks the tests send are module-level
functions of `starlette_concurrency._contract_tasks`, closures and lambdas: a driver that runs tasks
elsewhere needs this package importable there. Needs pytest and anyio's pytest plugin (installed
with anyio).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from . import _contract_tasks as work
from ._api import Concurrency, DriverFactory
from ._config import Settings
from ._exceptions import ConcurrencyClosed, RemoteError, TaskTimeout

__all__ = ["DriverContract", "eventually"]


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `predicate()` holds, polling (files and processes have no event to wait on).

    Raises:
        TimeoutError: it did not hold within `timeout` seconds.
    """
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.02)


class DriverContract:
    """The contract every driver honours (DESIGN §2); subclass it and provide the `driver` fixture.

    Fixtures a subclass may override: `driver` (required: a driver factory, ``Settings -> Driver``,
    or the name of a registered driver), `anyio_backend` (default: asyncio and trio).
    """

    pytestmark = pytest.mark.anyio

    #: How many tasks `test_many_tasks` sends in one call.
    many_tasks = 1000

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> str:
        """Run every test on asyncio and on trio."""
        return str(request.param)

    @pytest.fixture
    def driver(self) -> str | DriverFactory:
        """Return the driver factory under test (``Settings -> Driver``) or a registered driver's name."""
        raise NotImplementedError("override the `driver` fixture: return a driver factory or a driver name")

    @pytest.fixture
    def make_concurrency(self, driver: str | DriverFactory) -> Callable[..., Concurrency]:
        """Return a function that builds a facade on the driver under test, with the given options."""

        def make(**options: Any) -> Concurrency:
            if isinstance(driver, str):
                return Concurrency(driver=driver, env_file=None, **options)
            return Concurrency(driver=driver(Settings.resolve(None, **options)), env_file=None, **options)

        return make

    @pytest.fixture
    async def concurrency(self, make_concurrency: Callable[..., Concurrency]) -> AsyncIterator[Concurrency]:
        """Yield a started two-worker facade on the driver under test; close it afterwards."""
        async with make_concurrency(workers=2) as facade:
            yield facade

    async def test_a_single_callable_returns_its_result(self, concurrency: Concurrency) -> None:
        assert await concurrency.run(lambda: 6 * 7) == 42

    async def test_a_sequence_returns_results_in_input_order(self, concurrency: Concurrency) -> None:
        # The first task finishes last wherever tasks run in parallel: order must not depend on that.
        tasks = [
            functools.partial(work.sleep_then, "slow", 0.3),
            functools.partial(work.identity, "fast"),
            functools.partial(work.sleep_then, "medium", 0.1),
        ]
        assert await concurrency.run(tasks) == ["slow", "fast", "medium"]

    async def test_a_mapping_returns_a_dict_with_the_same_keys_in_the_same_order(
        self, concurrency: Concurrency
    ) -> None:
        results = await concurrency.run(
            {"users": functools.partial(work.sleep_then, 3, 0.2), "orders": lambda: 5, 7: lambda: "seven"}
        )
        assert results == {"users": 3, "orders": 5, 7: "seven"}
        assert list(results) == ["users", "orders", 7]

    async def test_empty_inputs_give_empty_results(self, concurrency: Concurrency) -> None:
        assert await concurrency.run([]) == []
        assert await concurrency.run({}) == {}
        assert await concurrency.run(()) == []

    async def test_any_zero_argument_callable_is_a_task(self, concurrency: Concurrency) -> None:
        counter = work.Counter(41)
        base = 10
        results = await concurrency.run(
            [
                functools.partial(work.add, 1, 2),
                counter.next,
                work.pid,
                lambda: base + 1,
                (lambda x: lambda: x * 2)(21),
            ]
        )
        assert results[0] == 3
        assert results[1] == 42
        assert isinstance(results[2], int)
        assert results[3:] == [11, 42]

    async def test_generators_of_callables_are_accepted(self, concurrency: Concurrency) -> None:
        assert await concurrency.run(functools.partial(work.identity, i) for i in range(5)) == [0, 1, 2, 3, 4]

    async def test_coroutine_functions_are_awaited(self, concurrency: Concurrency) -> None:
        results = await concurrency.run(
            {
                "a": functools.partial(work.async_sleep_then, "a", 0.05),
                "b": functools.partial(work.async_sleep_then, "b", 0),
            }
        )
        assert results == {"a": "a", "b": "b"}

    async def test_a_failure_is_raised_as_its_own_type_with_a_note_naming_the_task(
        self, concurrency: Concurrency
    ) -> None:
        with pytest.raises(ValueError, match="boom") as info:
            await concurrency.run({"ok": lambda: 1, "bad": functools.partial(work.fail, "boom")})
        assert "(raised by task 'bad' (partial(fail)))" in info.value.__notes__

    async def test_the_first_failure_by_position_wins_and_the_others_are_noted(self, concurrency: Concurrency) -> None:
        tasks: list[Callable[[], object]] = [
            lambda: "fine",
            functools.partial(work.fail_later, "first", 0.2),  # fails last, but comes first by position
            functools.partial(work.fail, "second"),
            lambda: 1 / 0,
        ]
        with pytest.raises(LookupError, match="first") as info:
            await concurrency.run(tasks)
        notes = info.value.__notes__
        assert notes[0] == "(raised by task 1 (partial(fail_later)))"
        assert "(task 2 (partial(fail)) also failed: ValueError: second)" in notes
        assert "(task 3 (<lambda>) also failed: ZeroDivisionError: division by zero)" in notes

    async def test_all_tasks_finish_even_when_one_fails(self, concurrency: Concurrency, tmp_path: Path) -> None:
        marker = tmp_path / "marker"
        with pytest.raises(ValueError, match="early"):
            await concurrency.run(
                [functools.partial(work.fail, "early"), functools.partial(work.sleep_then_touch, marker, 0.2)]
            )
        assert marker.read_text() == "ran"

    async def test_a_task_calling_sys_exit_does_not_stop_the_caller(self, concurrency: Concurrency) -> None:
        with pytest.raises(RemoteError) as info:
            await concurrency.run([lambda: 1, functools.partial(sys.exit, 3)])
        assert (info.value.type_name, info.value.message) == ("SystemExit", "3")
        assert "(raised by task 1 (partial(exit)))" in info.value.__notes__
        assert await concurrency.run(lambda: "still here") == "still here"

    async def test_other_base_exceptions_of_a_task_come_back_as_outcomes(self, concurrency: Concurrency) -> None:
        results = await concurrency.run(
            [functools.partial(work.raise_, GeneratorExit("gen")), functools.partial(work.raise_, work.Abort("stop"))],
            return_exceptions=True,
        )
        errors = [result for result in results if isinstance(result, RemoteError)]
        assert len(errors) == len(results)
        # The type's name, qualified by its module or not (the built-in drivers qualify what is not a builtin).
        assert [(error.type_name.rpartition(".")[2], error.message) for error in errors] == [
            ("GeneratorExit", "gen"),
            ("Abort", "stop"),
        ]
        assert await concurrency.run(lambda: "still here") == "still here"

    async def test_return_exceptions_puts_failures_in_the_results(self, concurrency: Concurrency) -> None:
        results = await concurrency.run(
            {"ok": lambda: 1, "bad": functools.partial(work.fail, "nope")}, return_exceptions=True
        )
        assert results["ok"] == 1
        assert isinstance(results["bad"], ValueError)
        assert str(results["bad"]) == "nope"
        assert "(raised by task 'bad' (partial(fail)))" in results["bad"].__notes__

    async def test_an_exception_returned_as_a_value_is_not_raised(self, concurrency: Concurrency) -> None:
        result = await concurrency.run(lambda: ValueError("just a value"))
        assert isinstance(result, ValueError)

    async def test_a_key_whose_repr_raises_does_not_hide_the_failure(self, concurrency: Concurrency) -> None:
        with pytest.raises(ValueError, match="boom") as info:
            await concurrency.run({_BadRepr(): functools.partial(work.fail, "boom"), "ok": lambda: 1})
        assert "(raised by task <_BadRepr whose repr raised RuntimeError> (partial(fail)))" in info.value.__notes__

    async def test_keys_that_cannot_key_the_results_are_refused_before_anything_runs(
        self, concurrency: Concurrency, tmp_path: Path
    ) -> None:
        marker = tmp_path / "marker"
        touch = functools.partial(work.sleep_then_touch, marker, 0)
        with pytest.raises(TypeError, match=r"^tasks has a key that cannot key the results: TypeError: unhashable"):
            await concurrency.run(_Pairs([("ok", touch), (["a", "list"], touch)]))
        with pytest.raises(TypeError, match=r"^tasks has 1 duplicate key\(s\)"):
            await concurrency.run(_Pairs([("same", touch), ("same", touch)]))
        await anyio.sleep(0.3)
        assert not marker.exists(), "a task ran although the call was refused"

    async def test_a_timeout_raises_task_timeout_and_stops_the_task(
        self, concurrency: Concurrency, tmp_path: Path
    ) -> None:
        marker = tmp_path / "marker"
        with pytest.raises(TaskTimeout, match=r"task 1") as info:
            await concurrency.run([lambda: 1, functools.partial(work.sleep_then_touch, marker, 1.0)], timeout=0.3)
        assert isinstance(info.value, TimeoutError)
        await anyio.sleep(1.2)
        assert not marker.exists(), "the timed-out task went on running"
        assert await concurrency.run(lambda: "still works") == "still works"

    async def test_the_facade_timeout_is_the_default(self, make_concurrency: Callable[..., Concurrency]) -> None:
        async with make_concurrency(workers=1, timeout=0.2) as concurrency:
            with pytest.raises(TaskTimeout):
                await concurrency.run(functools.partial(work.async_sleep_then, None, 5))

    async def test_cancelling_the_caller_stops_its_tasks(self, concurrency: Concurrency, tmp_path: Path) -> None:
        marker = tmp_path / "marker"
        with anyio.move_on_after(0.3) as scope:
            await concurrency.run(functools.partial(work.sleep_then_touch, marker, 1.0))
        assert scope.cancelled_caught
        await anyio.sleep(1.2)
        assert not marker.exists(), "the cancelled task went on running"
        assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]

    async def test_concurrent_calls_do_not_mix_results(self, concurrency: Concurrency) -> None:
        results: dict[int, list[object]] = {}

        async def call(n: int) -> None:
            results[n] = await concurrency.run([functools.partial(work.identity, (n, i)) for i in range(7)])

        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(call, n)
        assert results == {n: [(n, i) for i in range(7)] for n in range(6)}

    async def test_many_tasks(self, concurrency: Concurrency) -> None:
        results = await concurrency.run([functools.partial(work.add, i, 1) for i in range(self.many_tasks)])
        assert results == list(range(1, self.many_tasks + 1))

    async def test_a_closed_facade_refuses_work(self, make_concurrency: Callable[..., Concurrency]) -> None:
        concurrency = make_concurrency(workers=1)
        assert await concurrency.run(lambda: 1) == 1
        await concurrency.aclose()
        await concurrency.aclose()  # idempotent
        with pytest.raises(ConcurrencyClosed):
            await concurrency.run(lambda: 1)
        with pytest.raises(RuntimeError):  # ConcurrencyClosed is also a RuntimeError
            concurrency.defer(lambda: 1)

    async def test_a_closed_facade_starts_again_when_entered(
        self, make_concurrency: Callable[..., Concurrency]
    ) -> None:
        concurrency = make_concurrency(workers=1)
        async with concurrency:
            assert await concurrency.run(lambda: 1) == 1
        async with concurrency:  # the same driver instance: started again after aclose()
            assert await concurrency.run(lambda: 2) == 2

    async def test_defer_from_a_worker_thread_runs_in_the_background(
        self, concurrency: Concurrency, tmp_path: Path
    ) -> None:
        marker = tmp_path / "from-thread"
        await anyio.to_thread.run_sync(concurrency.defer, functools.partial(work.sleep_then_touch, marker, 0))
        await eventually(marker.exists)

    async def test_defer_outside_a_request_runs_in_the_background(
        self, concurrency: Concurrency, tmp_path: Path
    ) -> None:
        markers = [tmp_path / "a", tmp_path / "b"]
        concurrency.defer([functools.partial(work.sleep_then_touch, marker, 0.05) for marker in markers])
        await eventually(lambda: all(marker.exists() for marker in markers))


class _BadRepr:
    """A hashable key whose `repr` raises."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class _Pairs(Mapping[Any, Callable[[], object]]):
    """A mapping that can hold what a dict cannot (unhashable or repeated keys), as a custom Mapping may."""

    def __init__(self, pairs: list[tuple[Any, Callable[[], object]]]) -> None:
        self._pairs = pairs

    def __getitem__(self, key: Any) -> Callable[[], object]:
        return next(fn for candidate, fn in self._pairs if candidate == key)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(key for key, _ in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)
