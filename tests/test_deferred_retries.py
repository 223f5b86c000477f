"""Deferred work's retries (``defer(fn, retries=3, backoff=...)``) and what a task reads of itself
(`current_deferral()`), on every driver; with a journal, see test_journal.py too."""

from __future__ import annotations

import functools
import logging
import math
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from starlette_concurrency import Concurrency, Deferral, current_deferral
from starlette_concurrency._closures import Payload
from starlette_concurrency._context import carry_deferral
from starlette_concurrency._journal import Journal
from starlette_concurrency._pickling import dumps_task
from starlette_concurrency._tasks import Task
from starlette_concurrency._wire import context
from starlette_concurrency._wire.context import DEFERRAL

from . import journal_targets

pytestmark = pytest.mark.anyio


def records(out: Path) -> list[tuple[str, int, str, str]]:
    """(tag, attempt, key, entry id) of each line `journal_targets.flaky` wrote."""
    fields = (line.split() for line in out.read_text().splitlines())
    return [(tag, int(attempt), key, entry) for tag, attempt, _, key, entry in fields]


async def test_a_failing_task_runs_again_until_its_retries_run_out(
    concurrency: Concurrency, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out.txt"
    caplog.set_level(logging.INFO, "starlette_concurrency")
    flaky = functools.partial(journal_targets.flaky, str(out))
    concurrency.defer(functools.partial(flaky, "twice", 2), key="order-1", retries=3, backoff=0.01)
    concurrency.defer(functools.partial(flaky, "always", 99), retries=2, backoff=0.01)
    concurrency.defer(functools.partial(flaky, "once", 1))  # no retries: one failure, logged, as ever
    await concurrency.wait_deferred(120)
    seen = records(out)
    assert [(attempt, key) for tag, attempt, key, _ in seen if tag == "twice"] == [
        (1, "order-1"),
        (2, "order-1"),
        (3, "order-1"),
    ]
    assert [attempt for tag, attempt, _, _ in seen if tag == "always"] == [1, 2, 3]
    assert [attempt for tag, attempt, _, _ in seen if tag == "once"] == [1]
    assert {entry for _, _, _, entry in seen} == {"None"}  # no journal: no entry
    assert concurrency.stats().deferred_pending == 0
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 4  # two failures of each retried task, each followed by a retry
    assert "failed (attempt 1): RuntimeError: attempt 1 fails on purpose; retry 1 of 3 in 0.01 s" in caplog.text
    assert "retry 2 of 2 in 0.02 s" in caplog.text  # the backoff doubles
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert sorted(record.getMessage() for record in errors) == [  # two tasks: in either order
        "deferred task 0 (partial(flaky)) failed",
        "deferred task 0 (partial(flaky)) failed (attempt 3; no retry left of 2)",
    ]
    assert all(record.exc_info for record in errors)  # the final failure, once, with its traceback
    # Its key is held while a retry is pending, and free once the task has settled.
    concurrency.defer(functools.partial(flaky, "again", 0), key="order-1")
    await concurrency.wait_deferred(120)
    assert [tag for tag, _, _, _ in records(out)].count("again") == 1


async def test_a_drain_waits_for_a_pending_retry(tmp_path: Path, anyio_backend: str) -> None:
    out = tmp_path / "out.txt"
    async with Concurrency("sync", env_file=None) as concurrency:
        concurrency.defer(functools.partial(journal_targets.flaky, str(out), "t", 1), retries=1, backoff=0.2)
        with anyio.fail_after(60):
            while not out.exists():  # noqa: ASYNC110 - the first attempt has run: the retry waits its backoff
                await anyio.sleep(0.01)
    assert [attempt for _, attempt, _, _ in records(out)] == [1, 2]
    assert concurrency.stats().deferred_pending == 0


async def test_a_retry_the_drain_cuts_short_is_logged_by_name(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    caplog.set_level(logging.INFO, "starlette_concurrency")
    async with Concurrency("sync", drain_timeout=0.2, env_file=None) as concurrency:
        concurrency.defer(functools.partial(journal_targets.flaky, str(out), "t", 1), retries=1, backoff=3600)
        with anyio.fail_after(60):
            while not out.exists():  # noqa: ASYNC110
                await anyio.sleep(0.01)
    assert "deferred task 0 (partial(flaky)) abandoned, never started" in caplog.text
    assert concurrency.stats().deferred_pending == 0


def test_retries_and_backoff_are_checked_naming_them() -> None:
    concurrency = Concurrency("sync", env_file=None)
    with pytest.raises(TypeError, match=r"retries must be an int .* not str '3'"):
        concurrency.defer(print, retries="3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="retries must be an int"):
        concurrency.defer(print, retries=True)
    with pytest.raises(ValueError, match="retries must be 0 or more, got -1"):
        concurrency.defer(print, retries=-1)
    with pytest.raises(TypeError, match="backoff must be a number of seconds, not str"):
        concurrency.defer(print, retries=1, backoff="1")  # type: ignore[arg-type]
    for wrong in (-1.0, math.nan, math.inf, 1e9):
        with pytest.raises(ValueError, match="backoff must be from 0 to 86400 seconds"):
            concurrency.defer(print, retries=1, backoff=wrong)
    assert concurrency.stats().deferred_pending == 0


async def test_only_a_deferred_task_has_a_deferral(concurrency: Concurrency) -> None:
    assert current_deferral() is None
    assert await concurrency.run(journal_targets.deferral) is None
    result: list[object] = []

    def keep() -> None:
        result.append(journal_targets.deferral())

    if concurrency.driver_name == "sync":  # in this process: the deferral is set around the task, then reset
        concurrency.defer(keep, key="k", retries=2)
        await concurrency.wait_deferred(60)
        assert result == [Deferral(key="k", attempt=1, retries=2, entry_id=None)]
        assert current_deferral() is None


async def test_a_journaled_task_reads_its_entry_and_a_retry_counts_its_start(tmp_path: Path) -> None:
    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    async with Concurrency(workers=2, journal=journal, env_file=None) as concurrency:
        concurrency.defer(
            functools.partial(journal_targets.flaky, str(out), "t", 1), key="order-5", retries=1, backoff=0
        )
        await concurrency.wait_deferred(60)
    seen = records(out)
    assert [(attempt, key) for _, attempt, key, _ in seen] == [(1, "order-5"), (2, "order-5")]
    assert len({entry for _, _, _, entry in seen}) == 1
    assert seen[0][3].isdigit()  # its journal entry, the same in both attempts
    assert Journal(journal).pending == 0


async def test_a_retry_waiting_at_the_drain_stays_in_the_journal_with_its_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    caplog.set_level(logging.INFO, "starlette_concurrency")
    async with Concurrency(workers=2, journal=journal, drain_timeout=0.2, env_file=None) as concurrency:
        task = functools.partial(journal_targets.flaky, str(out), "t", 1)
        concurrency.defer(task, retries=2, backoff=3600)
        with anyio.fail_after(60):
            while not out.exists():  # noqa: ASYNC110
                await anyio.sleep(0.01)
    assert "it stays in the journal and runs at the next start" in caplog.text
    store = Journal(journal)
    [(entry, _, _)] = store.entries()
    store.close()
    # One start, one failure: its retry's start is counted when it begins, not before.
    assert (entry.attempts, entry.failures, entry.retries, entry.backoff) == (1, 1, 2, 3600.0)
    async with Concurrency(workers=2, journal=journal, env_file=None) as again:
        await anyio.sleep(0.3)  # a claim has looked: the retry is not due for an hour
        assert again.stats().replayed == 0


def test_a_worker_runs_a_deferral_s_payload_without_this_package() -> None:
    task = Task(0, DEFERRAL.get)  # the task reads its deferral where it runs
    stored = Task(0, task.fn, Payload(dumps_task(task), ()))
    first = carry_deferral(stored, ("k", 1, 0, 7)).prepared.data
    second = carry_deferral(stored, ("k", 2, 0, 7)).prepared.data
    wire = Path(context.__file__).parent
    program = (
        "import importlib.util, pickle, sys\n"
        # What a worker started by path does (see _wire/worker.py): its folder, without the package root.
        f"spec = importlib.util.spec_from_file_location('starlette_concurrency._wire', {str(wire / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(wire)!r}])\n"
        "sys.modules[spec.name] = module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        f"print(pickle.loads({first!r})(), pickle.loads({second!r})())\n"
        "print('starlette_concurrency' in sys.modules, len(" + repr(first) + "))"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.splitlines()[0] == "('k', 1, 0, 7) ('k', 2, 0, 7)"
    package_imported, size = done.stdout.splitlines()[1].split()
    assert package_imported == "False"
    assert int(size) < len(stored.prepared.data) + 400  # the wrapper is a few names, not a function by value
