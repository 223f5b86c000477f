"""The driver contract kit on drivers that are not ours: a correct one passes it, broken ones fail it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from starlette_concurrency import Driver, DriverFactory, Outcome, Settings, Task
from starlette_concurrency._drivers.sync import SyncDriver
from starlette_concurrency.testing import DriverContract


class Delegating(Driver):
    """A custom driver as a user would write one: it hands every task to a driver it wraps."""

    name = "delegating"

    def __init__(self, settings: Settings) -> None:
        self.inner = SyncDriver()
        self.starts = self.closes = 0

    async def start(self) -> None:
        assert self.starts == self.closes, "start() called twice without aclose() in between"
        self.starts += 1

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        assert self.starts == self.closes + 1, "execute() called on a driver that is not started"
        await self.inner.execute(tasks, outcomes)

    async def aclose(self) -> None:
        self.closes = self.starts


class TestDelegatingDriverPassesTheKit(DriverContract):
    @pytest.fixture
    def driver(self) -> type[Delegating]:
        return Delegating  # a factory: Settings -> Driver


def readme_driver() -> type[Driver]:
    """The `ThreadDriver` that README.md's "Writing a driver" shows, exactly as printed there."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    head, _, tail = readme.partition("class ThreadDriver(Driver):")
    source = (
        head.rpartition("```python\n")[2] + "class ThreadDriver(Driver):" + tail.partition("\n\n\nconcurrency =")[0]
    )
    namespace: dict[str, Any] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    driver: type[Driver] = namespace["ThreadDriver"]
    return driver


class TestTheReadmeDriverPassesTheKit(DriverContract):
    @pytest.fixture
    def driver(self) -> DriverFactory:
        thread_driver = readme_driver()
        return lambda settings: thread_driver(settings.workers)  # type: ignore[call-arg]


# Broken drivers, run by the kit in a pytest of their own: the kit must catch each one.
BROKEN = '''
from collections.abc import Sequence

import pytest

from starlette_concurrency import Driver, Outcome, Task
from starlette_concurrency._drivers.sync import SyncDriver
from starlette_concurrency.testing import DriverContract


class Doubling(Driver):
    """Returns twice what each task returned."""

    name = "doubling"

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        await SyncDriver().execute(tasks, outcomes)
        for index, outcome in enumerate(outcomes):
            if outcome is not None and outcome.error is None and isinstance(outcome.value, int):
                outcomes[index] = Outcome(value=outcome.value * 2)


class OnceOnly(Driver):
    """Cannot be started again after aclose(), as the Driver docstring once allowed."""

    name = "once-only"
    closed = False

    async def start(self) -> None:
        if self.closed:
            raise RuntimeError("already closed")

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        await SyncDriver().execute(tasks, outcomes)

    async def aclose(self) -> None:
        self.closed = True


class TestDoubling(DriverContract):
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def driver(self):
        return lambda settings: Doubling()


class TestOnceOnly(DriverContract):
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "trio"

    @pytest.fixture
    def driver(self):
        return lambda settings: OnceOnly()
'''


def test_the_kit_fails_broken_drivers(tmp_path: Path) -> None:
    (tmp_path / "test_broken.py").write_text(textwrap.dedent(BROKEN))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rf", "test_broken.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    failed = {line.split(" ")[1] for line in run.stdout.splitlines() if line.startswith("FAILED ")}
    assert run.returncode == 1, run.stdout + run.stderr
    assert "test_broken.py::TestDoubling::test_a_single_callable_returns_its_result" in failed
    assert "test_broken.py::TestDoubling::test_many_tasks" in failed
    assert "test_broken.py::TestOnceOnly::test_a_closed_facade_starts_again_when_entered" in failed
    # A driver that does its job otherwise passes the rest: the kit does not fail everything.
    assert "test_broken.py::TestOnceOnly::test_a_single_callable_returns_its_result" not in failed
