"""Driver options: one object per driver, checked when made, forwarded by the facade to the driver's factory."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import pytest
from distributed import Security

from starlette_concurrency import (
    Concurrency,
    ConfigurationError,
    DaskOptions,
    Driver,
    DriverOptions,
    Outcome,
    ProcessOptions,
    Settings,
    Task,
)
from starlette_concurrency._drivers.dask import DaskDriver
from starlette_concurrency._drivers.process import ProcessDriver

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tasks_per_worker": -1}, r"^ProcessOptions\.max_tasks_per_worker must be positive, got -1$"),
        ({"max_tasks_per_worker": 2.5}, r"^ProcessOptions\.max_tasks_per_worker must be a positive int, not float"),
        ({"idle_timeout": 0}, r"^ProcessOptions\.idle_timeout must be positive, got 0$"),
        ({"idle_timeout": "5"}, r"^ProcessOptions\.idle_timeout must be a positive float, not str '5'$"),
        ({"max_worker_memory": 0}, r"^ProcessOptions\.max_worker_memory must be positive, got 0$"),
        ({"initializer": 42}, r"^ProcessOptions\.initializer must be callable, not int$"),
        ({"preload": "json"}, r"^ProcessOptions\.preload must be a list of module names, got 'json'$"),
        ({"preload": ["json", 3]}, r"^ProcessOptions\.preload must be a list of module names, got \['json', 3\]$"),
        ({"preload": ["json", " "]}, r"^ProcessOptions\.preload must be a list of module names"),
    ],
)
def test_process_options_are_checked_when_made(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ProcessOptions(**fields)  # type: ignore[arg-type]


def test_process_options_are_normalised_and_frozen() -> None:
    options = ProcessOptions(idle_timeout=2, preload=["json", "decimal"])
    assert options.idle_timeout == 2.0
    assert isinstance(options.idle_timeout, float)
    assert options.preload == ("json", "decimal")  # a tuple: the options stay frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.idle_timeout = 3  # type: ignore[misc]
    assert ProcessOptions() == ProcessOptions(preload=[])


def test_dask_options_are_checked_when_made() -> None:
    with pytest.raises(ConfigurationError, match=r"^DaskOptions\.address must look like 'tcp://host:8786'"):
        DaskOptions(address="no port here")
    with pytest.raises(ConfigurationError, match=r"^DaskOptions\.security must be a distributed\.Security, not dict"):
        DaskOptions(address="tls://h:8786", security={"tls_ca_file": "ca.pem"})
    assert DaskOptions(address=" tcp://h:8786 ").address == "tcp://h:8786"
    security = Security()  # type: ignore[no-untyped-call]
    assert DaskOptions(address="tls://h:8786", security=security).security is security


def test_the_facade_forwards_options_to_the_drivers_factories() -> None:
    process, dask = ProcessOptions(max_tasks_per_worker=5), DaskOptions(address="tcp://10.0.0.9:8786")
    settings = Concurrency("sync", options=[process, dask], env_file=None).settings
    assert settings.options == (process, dask)
    assert settings.options_for(ProcessOptions) is process
    assert settings.options_for(DaskOptions) is dask
    one = Concurrency("sync", options=process, env_file=None).settings  # a single object needs no list
    assert one.options_for(ProcessOptions) is process
    assert one.options_for(DaskOptions) == DaskOptions()  # not given: the driver's defaults
    assert Concurrency("sync", options=None, env_file=None).settings.options == ()
    facade = Concurrency(workers=1, options=process, env_file=None)
    driver = facade._runtime.driver("process")
    assert isinstance(driver, ProcessDriver)
    assert driver.options is process


async def test_process_options_given_to_the_facade_take_effect_in_the_workers() -> None:
    async with Concurrency(workers=1, options=ProcessOptions(max_tasks_per_worker=1), env_file=None) as facade:
        first, second = await facade.run(os.getpid), await facade.run(os.getpid)
    assert first != second  # a fresh worker for each task
    async with Concurrency(workers=1, options=ProcessOptions(preload=["decimal"]), env_file=None) as facade:
        assert await facade.run(lambda: __import__("sys").modules.get("decimal") is not None)


def test_the_environment_fills_only_what_the_dask_options_leave_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", "tcp://10.0.0.1:8786")
    explicit = DaskOptions(address="tcp://10.0.0.2:8786")
    assert Concurrency("sync", options=explicit, env_file=None).settings.options_for(DaskOptions) is explicit
    security = Security()  # type: ignore[no-untyped-call]
    filled = Concurrency("sync", options=DaskOptions(security=security), env_file=None).settings
    assert filled.options_for(DaskOptions) == DaskOptions(address="tcp://10.0.0.1:8786", security=security)
    process = ProcessOptions(idle_timeout=1)
    kept = Concurrency("sync", options=process, env_file=None).settings
    assert kept.options == (process, DaskOptions(address="tcp://10.0.0.1:8786"))


@dataclasses.dataclass(frozen=True)
class EchoOptions(DriverOptions):
    """A custom driver's options."""

    suffix: str = "!"


class EchoDriver(Driver):
    """Run tasks in-process and append a suffix to their results."""

    name = "echo"

    def __init__(self, options: EchoOptions) -> None:
        self.options = options

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        for index, task in enumerate(tasks):
            outcomes[index] = Outcome(value=f"{task.fn()}{self.options.suffix}")


async def test_a_custom_driver_reads_its_own_options_from_the_settings() -> None:
    def factory(settings: Settings) -> Driver:
        return EchoDriver(settings.options_for(EchoOptions))

    facade = Concurrency("sync", options=EchoOptions(suffix="?"), env_file=None)
    facade.extend("echo", factory)
    async with facade:
        assert await facade.driver("echo").run(lambda: "why") == "why?"
    plain = Concurrency("sync", env_file=None)
    plain.extend("echo", factory)
    async with plain:
        assert await plain.driver("echo").run(lambda: "yes") == "yes!"


def test_a_driver_refuses_options_of_another_driver() -> None:
    with pytest.raises(ConfigurationError, match=r"^options must be a ProcessOptions, not DaskOptions$"):
        ProcessDriver(1, DaskOptions())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^options must be a DaskOptions, not ProcessOptions$"):
        DaskDriver(ProcessOptions())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keyword", "value", "kind", "field"),
    [
        ("max_tasks_per_worker", 3, ProcessOptions, "max_tasks_per_worker"),
        ("idle_timeout", 2.5, ProcessOptions, "idle_timeout"),
        ("max_worker_memory", 2**30, ProcessOptions, "max_worker_memory"),
        ("initializer", print, ProcessOptions, "initializer"),
        ("preload", ("json",), ProcessOptions, "preload"),
        ("dask_address", "tcp://10.0.0.3:8786", DaskOptions, "address"),
    ],
)
def test_release_1_keywords_still_work_with_a_deprecation_warning(
    keyword: str, value: object, kind: type[DriverOptions], field: str
) -> None:
    expected = rf"Concurrency\({keyword}=\.\.\.\) is deprecated; pass options={kind.__name__}\({field}=\.\.\.\)"
    with pytest.warns(DeprecationWarning, match=expected) as warned:
        settings = Concurrency("sync", env_file=None, **{keyword: value}).settings  # type: ignore[arg-type]
    assert warned[0].filename == __file__  # the warning points at the caller's line
    assert getattr(settings.options_for(kind), field) == value


def test_release_1_keywords_are_checked_and_never_mixed_with_options() -> None:
    with pytest.raises(ConfigurationError, match=r"^ProcessOptions\.idle_timeout must be positive, got 0$"):
        Concurrency("sync", idle_timeout=0, env_file=None)  # an error first, not a warning
    with pytest.raises(ConfigurationError, match="give ProcessOptions either in options= or as keywords, not both"):
        Concurrency("sync", options=ProcessOptions(), idle_timeout=1, env_file=None)
    with pytest.raises(TypeError, match=r"^Concurrency\(\) got an unexpected keyword argument 'wokers'$"):
        Concurrency("sync", wokers=2, env_file=None)  # type: ignore[call-arg]


def test_settings_and_options_stay_hashable_and_readable() -> None:
    settings = Concurrency("sync", options=ProcessOptions(preload=["json"]), env_file=None).settings
    assert hash(settings) == hash(dataclasses.replace(settings))  # usable as a cache key by a driver factory
    assert "variables" not in repr(settings)  # the environment is not echoed into logs
    assert repr(ProcessOptions(idle_timeout=5)).startswith("ProcessOptions(max_tasks_per_worker=None, idle_timeout=5.0")
