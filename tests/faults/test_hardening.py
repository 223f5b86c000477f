"""Hardening of the process and fork drivers (issue 11): orphans, grandchildren, identity, decoding, re-entry."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from starlette_concurrency import Concurrency, SerializationError, TaskTimeout, WorkerCrashed
from starlette_concurrency._drivers.fork import ForkDriver
from starlette_concurrency._drivers.process import ProcessDriver

from .. import helpers

pytestmark = pytest.mark.anyio

DRIVERS = ["process", "fork"]


@pytest.fixture(params=DRIVERS)
async def facade(request: pytest.FixtureRequest) -> AsyncIterator[Concurrency]:
    driver = ProcessDriver(2) if request.param == "process" else ForkDriver(2)
    async with Concurrency(driver=driver, env_file=None) as concurrency:
        yield concurrency


def _write_whole(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    partial.rename(path)


def catastrophic_regex(pid_path: Path) -> bool:
    """Hold the GIL for minutes: a regex with catastrophic backtracking never releases it."""
    _write_whole(pid_path, str(os.getpid()))
    return re.match(r"(a+)+$", "a" * 40 + "!") is not None


def libc_fork_then_crash(pid_path: Path) -> None:
    """Fork through libc (Python's fork hooks do not run): the grandchild keeps the result pipe open."""
    import ctypes

    child = ctypes.CDLL(None).fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    _write_whole(pid_path, str(child))
    os._exit(3)


def start_sleep_then_block(pid_path: Path) -> None:
    """Start `sleep 60` (work a task started), then block."""
    sleeper = subprocess.Popen(["sleep", "60"])
    _write_whole(pid_path, str(sleeper.pid))
    time.sleep(60)


class PaymentDeclined(Exception):
    """Stands for an app's exception class defined in `__main__` (the module is set in the test)."""


class Receipt:
    """Stands for an app's result class defined in `__main__`."""


def decline() -> None:
    raise PaymentDeclined("card refused")


def receipt() -> Receipt:
    return Receipt()


class ExitsWhenUnpickled:
    """Pickles fine; unpickling it calls sys.exit() in whoever loads it."""

    def __reduce__(self) -> tuple[object, ...]:
        return sys.exit, ("unpickled into SystemExit",)


class BecomesSystemExit(Exception):
    """An exception that travels as itself but arrives as a SystemExit."""

    def __reduce__(self) -> tuple[object, ...]:
        return SystemExit, ("arrived as SystemExit",)


def return_exiting() -> ExitsWhenUnpickled:
    return ExitsWhenUnpickled()


def raise_becomes_system_exit() -> None:
    raise BecomesSystemExit()


SERVER = textwrap.dedent(
    """
    import functools, sys
    import anyio
    from pathlib import Path
    from starlette_concurrency import Concurrency
    from starlette_concurrency._drivers.fork import ForkDriver
    from starlette_concurrency._drivers.process import ProcessDriver
    from tests.faults import test_hardening as here

    async def main() -> None:
        driver = ProcessDriver(2) if sys.argv[2] == "process" else ForkDriver(2)
        async with Concurrency(driver=driver, env_file=None) as concurrency:
            directory = Path(sys.argv[1])
            await concurrency.run([functools.partial(here.catastrophic_regex, directory / str(i)) for i in range(2)])

    anyio.run(main)
    """
)


@pytest.mark.parametrize("driver", DRIVERS)
async def test_workers_die_with_a_killed_server_even_while_a_task_holds_the_gil(tmp_path: Path, driver: str) -> None:
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [sys.executable, "-c", SERVER, str(tmp_path), driver], cwd=root, stdin=subprocess.DEVNULL
    )
    pids: list[int] = []
    try:
        await helpers.eventually(lambda: all((tmp_path / str(i)).exists() for i in range(2)), timeout=30)
        pids = [int((tmp_path / str(i)).read_text()) for i in range(2)]
        server.kill()
        await anyio.to_thread.run_sync(server.wait)
        await helpers.eventually(lambda: all(helpers.gone(pid) for pid in pids), timeout=5)
    finally:
        for pid in pids:
            if not helpers.gone(pid):
                os.kill(pid, signal.SIGKILL)
        server.kill()
        await anyio.to_thread.run_sync(server.wait)


@pytest.fixture
def leftover() -> Iterator[list[int]]:
    """Pids a test expects to be gone; killed at the end whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not helpers.gone(pid):
            os.kill(pid, signal.SIGKILL)


async def test_a_grandchild_holding_the_result_pipe_does_not_hang_a_crash(
    facade: Concurrency, tmp_path: Path, leftover: list[int]
) -> None:
    pid_path = tmp_path / "grandchild"
    with anyio.fail_after(15), pytest.raises(WorkerCrashed, match="exited with code 3"):
        await facade.run(functools.partial(libc_fork_then_crash, pid_path))
    leftover.append(int(pid_path.read_text()))
    # The worker's process group went with it: the grandchild does not live out its 30 s.
    await helpers.eventually(lambda: helpers.gone(leftover[0]), timeout=5)
    assert await facade.run([lambda: 1, lambda: 2]) == [1, 2]


async def test_a_timeout_stops_the_subprocess_a_task_started(
    facade: Concurrency, tmp_path: Path, leftover: list[int]
) -> None:
    pid_path = tmp_path / "sleep"
    with pytest.raises(TaskTimeout):
        await facade.run(functools.partial(start_sleep_then_block, pid_path), timeout=2)
    await helpers.eventually(pid_path.exists)
    leftover.append(int(pid_path.read_text()))
    await helpers.eventually(lambda: helpers.gone(leftover[0]), timeout=5)


async def test_shutdown_stops_the_subprocess_a_task_started(tmp_path: Path, leftover: list[int]) -> None:
    pid_path = tmp_path / "sleep"
    concurrency = Concurrency(driver=ProcessDriver(1), env_file=None)
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(concurrency.run, functools.partial(start_sleep_then_block, pid_path)))
        await helpers.eventually(pid_path.exists)
        leftover.append(int(pid_path.read_text()))
        tg.cancel_scope.cancel()
    await concurrency.aclose()
    await helpers.eventually(lambda: helpers.gone(leftover[0]), timeout=5)


@pytest.fixture
def in_main(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make PaymentDeclined and Receipt classes of `__main__`, as an app's script would define them."""
    main = sys.modules["__main__"]
    for cls in (PaymentDeclined, Receipt):
        monkeypatch.setattr(cls, "__module__", "__main__")
        monkeypatch.setattr(main, cls.__name__, cls, raising=False)


@pytest.mark.usefixtures("in_main")
async def test_fork_driver_keeps_the_identity_of_main_classes() -> None:
    async with Concurrency(driver=ForkDriver(1), env_file=None) as concurrency:
        with pytest.raises(PaymentDeclined, match="card refused"):
            await concurrency.run(decline)
        assert isinstance(await concurrency.run(receipt), Receipt)


@pytest.mark.parametrize("return_exceptions", [False, True])
async def test_a_result_that_unpickles_into_system_exit_never_escapes(
    facade: Concurrency, return_exceptions: bool
) -> None:
    if return_exceptions:
        first, second = await facade.run([return_exiting, raise_becomes_system_exit], return_exceptions=True)
        assert isinstance(first, SerializationError)
        assert "SystemExit" in str(first)
        assert not isinstance(second, SystemExit)
        assert "arrived as SystemExit" in str(second)
    else:
        with pytest.raises(SerializationError, match="SystemExit"):
            await facade.run(return_exiting)
    assert await facade.run(lambda: "still serving") == "still serving"


def run_inside_a_forked_task(concurrency: Concurrency) -> int:
    """Call run() from inside a forked task, with an event loop of its own."""
    return int(anyio.run(concurrency.run, lambda: 41 + 1))


async def test_run_inside_a_forked_task_while_every_slot_is_taken_runs() -> None:
    async with Concurrency(driver=ForkDriver(1), env_file=None) as concurrency:
        with anyio.fail_after(30):
            assert await concurrency.run(functools.partial(run_inside_a_forked_task, concurrency)) == 42
