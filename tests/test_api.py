"""The facade itself: configuration, argument checking, drivers and the public names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest

import starlette_concurrency
from starlette_concurrency import (
    Concurrency,
    ConcurrencyClosed,
    ConcurrencyError,
    ConfigurationError,
    DaskOptions,
    Driver,
    Outcome,
    ProcessOptions,
    Settings,
    Task,
)
from starlette_concurrency._config import usable_cpus

pytestmark = pytest.mark.anyio


def test_the_public_names_are_pinned() -> None:
    assert starlette_concurrency.__all__ == [
        "ClientDisconnected",
        "Concurrency",
        "ConcurrencyClosed",
        "ConcurrencyError",
        "ConcurrencyMiddleware",
        "ConcurrencyWSGIMiddleware",
        "ConfigurationError",
        "DaskOptions",
        "Deferral",
        "DeferralRejected",
        "Driver",
        "DriverError",
        "DriverFactory",
        "DriverOptions",
        "Outcome",
        "ProcessOptions",
        "RemoteError",
        "RemoteTraceback",
        "RequestBatch",
        "SerializationError",
        "Settings",
        "Stats",
        "Task",
        "TaskTimeout",
        "WorkerCrashed",
        "WorkerStartFailed",
        "WrongContext",
        "__version__",
        "current_deferral",
    ]
    for name in starlette_concurrency.__all__:
        value = getattr(starlette_concurrency, name)
        if isinstance(value, type):
            assert value.__module__ == "starlette_concurrency"
            assert value.__doc__, f"{name} has no docstring"


def test_the_error_tree() -> None:
    errors = starlette_concurrency
    for name in [
        "ConfigurationError",
        "SerializationError",
        "WorkerCrashed",
        "TaskTimeout",
        "RemoteError",
        "ClientDisconnected",
        "DriverError",
        "WrongContext",
    ]:
        assert issubclass(getattr(errors, name), ConcurrencyError)
    assert issubclass(errors.TaskTimeout, TimeoutError)
    assert issubclass(errors.ConcurrencyClosed, RuntimeError)
    assert issubclass(errors.DeferralRejected, ConcurrencyError)


def test_the_default_driver_is_process() -> None:
    concurrency = Concurrency(env_file=None)
    assert concurrency.driver_name == "process"
    assert repr(concurrency) == f"<Concurrency driver='process' workers={usable_cpus()}>"  # the resolved default


def test_unknown_drivers_are_refused_with_the_known_names() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown concurrency driver 'threads'; known drivers: .*'process'"):
        Concurrency(driver="threads", env_file=None)
    with pytest.raises(ConfigurationError, match="unknown concurrency driver 'nope'"):
        Concurrency(driver="sync", env_file=None).driver("nope")
    with pytest.raises(ConfigurationError, match="driver must be a driver name or a Driver instance, not int"):
        Concurrency(driver=3, env_file=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "workers must be positive, got 0"),
        ({"workers": -2}, "workers must be positive, got -2"),
        ({"workers": 1.5}, "workers must be a positive int, not float 1.5"),
        ({"workers": True}, "workers must be a positive int, not bool True"),
        ({"timeout": 0}, "timeout must be positive, got 0"),
        ({"timeout": -1.0}, r"timeout must be positive, got -1.0"),
        ({"timeout": "3"}, "timeout must be a positive float, not str '3'"),
        ({"drain_timeout": 0}, "drain_timeout must be positive"),
        ({"max_pending_deferred": 0}, "max_pending_deferred must be positive"),
        ({"options": {"idle_timeout": 1}}, "options must be a driver options object .* not dict"),
        ({"options": [ProcessOptions(), 3]}, "options must be driver options such as .* not int 3"),
        ({"options": [ProcessOptions(), ProcessOptions()]}, "options holds two ProcessOptions objects"),
    ],
)
def test_invalid_options_name_themselves(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Concurrency(env_file=None, **options)  # type: ignore[arg-type]


def test_environment_variables_configure_what_arguments_leave_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCURRENCY_DRIVER", "SYNC")
    monkeypatch.setenv("CONCURRENCY_WORKERS", "3")
    monkeypatch.setenv("CONCURRENCY_TIMEOUT", "2.5")
    monkeypatch.setenv("CONCURRENCY_DRAIN_TIMEOUT", "4")
    monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", "tcp://10.0.0.1:8786")
    settings = Concurrency(env_file=None).settings
    assert (
        settings.driver,
        settings.workers,
        settings.timeout,
        settings.drain_timeout,
        settings.options_for(DaskOptions).address,
    ) == (
        "sync",
        3,
        2.5,
        4.0,
        "tcp://10.0.0.1:8786",
    )
    explicit = Concurrency("process", workers=1, timeout=9, env_file=None).settings
    assert (explicit.driver, explicit.workers, explicit.timeout) == ("process", 1, 9.0)


def test_a_dotenv_file_is_read_and_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("CONCURRENCY_DRIVER=sync\nCONCURRENCY_WORKERS=5\n")
    monkeypatch.setenv("CONCURRENCY_WORKERS", "7")
    settings = Concurrency(env_file=env_file).settings
    assert (settings.driver, settings.workers) == ("sync", 7)
    with pytest.warns(UserWarning, match="missing.env' does not exist"):  # named explicitly: worth a warning
        assert Concurrency(env_file=tmp_path / "missing.env").settings.driver == "process"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CONCURRENCY_WORKERS", "many", "CONCURRENCY_WORKERS must be a positive integer, got 'many'"),
        ("CONCURRENCY_WORKERS", "0", "CONCURRENCY_WORKERS must be positive, got 0"),
        ("CONCURRENCY_TIMEOUT", "soon", "CONCURRENCY_TIMEOUT must be a positive number, got 'soon'"),
        ("CONCURRENCY_TIMEOUT", "-3", "CONCURRENCY_TIMEOUT must be positive, got -3.0"),
        ("CONCURRENCY_DRIVER", "threads", "unknown concurrency driver 'threads'"),
    ],
)
def test_invalid_environment_variables_name_themselves(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=message):
        Concurrency(env_file=None)


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (42, "tasks must be a callable, a sequence of callables or a mapping of callables, not int"),
        ("abc", "tasks must be a callable, a sequence of callables or a mapping of callables, not str"),
        (b"abc", "not bytes"),
        (None, "not NoneType"),
        ({lambda: 1}, r"tasks must be ordered, not a set \(its order is arbitrary"),
        (frozenset([int]), "tasks must be ordered, not a frozenset"),
        ({int: 1}.keys(), "tasks must be ordered, not a dict_keys"),
        ([1, 2], r"tasks\[0\] is not callable: got int 1; wrap the work in a function or a lambda"),
        ([lambda: 1, "x"], r"tasks\[1\] is not callable: got str 'x'"),
        ({"users": lambda: 1, "orders": None}, r"tasks\['orders'\] is not callable: got NoneType None"),
    ],
)
async def test_bad_tasks_get_a_clear_type_error(tasks: object, message: str) -> None:
    async with Concurrency(driver="sync", env_file=None) as concurrency:
        with pytest.raises(TypeError, match=message):
            await concurrency.run(tasks)  # type: ignore[call-overload]


class Point:
    def __init__(self) -> None:
        self.x = 1


async def test_a_class_is_a_task_alone_as_in_a_list() -> None:
    # A class is a zero-argument callable; on Python 3.13 so is threading.Lock.
    async with Concurrency(driver="sync", env_file=None) as concurrency:
        assert (await concurrency.run(Point)).x == 1
        assert [point.x for point in await concurrency.run([Point])] == [1]
        assert await concurrency.run(int) == 0
        assert await concurrency.run({"n": int}) == {"n": 0}


async def test_ordered_iterables_are_task_lists() -> None:
    async with Concurrency(driver="sync", env_file=None) as concurrency:
        assert await concurrency.run(iter([lambda: 1, lambda: 2])) == [1, 2]
        assert await concurrency.run({"a": lambda: 1}.values()) == [1]
        assert await concurrency.run(fn for fn in (int, lambda: 3)) == [0, 3]


@pytest.mark.parametrize("timeout", [0, -1, float("nan")])
async def test_bad_timeouts_get_a_clear_value_error(timeout: float) -> None:
    async with Concurrency(driver="sync", env_file=None) as concurrency:
        with pytest.raises(ValueError, match="timeout must be positive"):
            await concurrency.run(lambda: 1, timeout=timeout)


async def test_driver_views_share_the_facade_and_are_cached() -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    view = concurrency.driver("process")
    assert view is concurrency.driver("process")
    assert view.driver_name == "process"
    assert concurrency.driver("sync") is concurrency
    assert view.settings is concurrency.settings
    async with concurrency:
        assert await view.run(lambda: 1) == 1
    assert concurrency._runtime.drivers == {}  # closing the facade closed the view's driver too


class Doubling(Driver):
    """Runs in-process and doubles every result: proves a custom driver only needs `execute()`."""

    name = "doubling"

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        for index, task in enumerate(tasks):
            outcomes[index] = Outcome(value=task.fn() * 2)


async def test_extend_registers_a_custom_driver() -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    seen: list[Settings] = []

    def factory(settings: Settings) -> Driver:
        seen.append(settings)
        return Doubling()

    concurrency.extend("doubling", factory)
    assert await concurrency.driver("doubling").run({"a": lambda: 2, "b": lambda: 5}) == {"a": 4, "b": 10}
    assert seen == [concurrency.settings]
    with pytest.raises(ConfigurationError, match="driver 'doubling' is already in use"):
        concurrency.extend("doubling", factory)
    with pytest.raises(ConfigurationError, match="must be callable"):
        concurrency.extend("other", 42)  # type: ignore[arg-type]
    await concurrency.aclose()


async def test_a_driver_instance_can_be_given_directly() -> None:
    async with Concurrency(Doubling(), env_file=None) as concurrency:
        assert concurrency.driver_name == "doubling"
        assert await concurrency.run([lambda: 1, lambda: 2]) == [2, 4]


async def test_entering_twice_is_counted() -> None:
    # Two lifespans at once (two TestClients, two servers in one process): the inner exit leaves
    # the facade working, the outer one closes it back to its not-started state.
    async with Concurrency(driver="sync", env_file=None) as concurrency:
        async with concurrency:
            assert await concurrency.run(lambda: 1) == 1
        assert await concurrency.run(lambda: 2) == 2
        assert concurrency._runtime.host is not None
    assert concurrency._runtime.host is None
    assert await concurrency.run(lambda: 3) == 3  # lazily usable again
    await concurrency.aclose()


def test_a_facade_serves_one_event_loop_after_another() -> None:
    # A module-level facade outlives event loops: each test, each server run, each TestClient block.
    concurrency = Concurrency(workers=1, env_file=None)

    async def lifetime(value: int) -> int:
        async with concurrency:
            result: int = await concurrency.run(lambda: value)
            return result

    assert anyio.run(lifetime, 1, backend="asyncio") == 1
    assert anyio.run(lifetime, 2, backend="trio") == 2
    assert anyio.run(lifetime, 3, backend="asyncio") == 3
    # After a lifespan the facade is back to its not-started state: usable lazily, on any loop.
    assert anyio.run(concurrency.run, lambda: 4, backend="trio") == 4
    concurrency.close()
    with pytest.raises(ConcurrencyClosed, match=r"closed by close\(\)"):
        anyio.run(concurrency.run, lambda: 5, backend="trio")
