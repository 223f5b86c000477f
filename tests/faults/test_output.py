"""Tasks that write to stdout and stderr, every way they can, never disturb the protocol."""

from __future__ import annotations

import functools

import pytest

from starlette_concurrency import Concurrency
from starlette_concurrency._drivers.process import ProcessDriver

from .. import helpers

pytestmark = pytest.mark.anyio


async def test_print_write_and_warnings_show_in_the_servers_output(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers start inside the test, so they inherit the captured stdout and stderr: files, on which
    # print() is block-buffered unless PYTHONUNBUFFERED says otherwise (as it does in some CI images).
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    async with Concurrency(driver=ProcessDriver(2), env_file=None) as concurrency:
        assert await concurrency.run([functools.partial(helpers.chatter, i) for i in range(4)]) == [0, 1, 2, 3]
        out, err = capfd.readouterr()  # already there: the worker flushes before it answers
    for i in range(4):
        assert f"print {i}" in out
        assert f"os.write(1) {i}" in out
        assert f"to stderr {i}" in err
        assert f"os.write(2) {i}" in err
        assert f"UserWarning: warning {i}" in err


async def test_hundreds_of_chatty_tasks_all_answer_right(capfd: pytest.CaptureFixture[str]) -> None:
    async with Concurrency(driver=ProcessDriver(2), env_file=None) as concurrency:
        assert await concurrency.run([functools.partial(helpers.chatter, i) for i in range(300)]) == list(range(300))
        assert await concurrency.run(functools.partial(helpers.print_a_lot, 4 << 20)) == 4 << 20
    out, _ = capfd.readouterr()
    assert out.count("print ") == 300


async def test_closing_stdout_or_reading_stdin_harms_only_the_task() -> None:
    async with Concurrency(driver=ProcessDriver(1), env_file=None) as concurrency:
        assert await concurrency.run(helpers.close_stdout) == "closed"
        with pytest.raises(EOFError):  # stdin is /dev/null: a task never hangs waiting for input
            await concurrency.run(helpers.read_stdin)
        with pytest.raises(ValueError, match="closed file"):  # its own problem, reported as such
            await concurrency.run(functools.partial(helpers.print_a_lot, 10))
        assert await concurrency.run(lambda: "fine") == "fine"
