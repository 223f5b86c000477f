"""The journal: deferred work that survives a crash (SIGKILL), replayed by the next process, exactly one owner."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.types import Message, Receive, Scope, Send

from starlette_concurrency import Concurrency, ConfigurationError
from starlette_concurrency._journal import SCHEMA_VERSION, Journal, NewEntry, PayloadKind
from starlette_concurrency._pickling import dumps_task
from starlette_concurrency._tasks import Task

from . import journal_targets

ROOT = Path(__file__).parent.parent


def server(mode: str, journal: Path, out: Path, backend: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.journal_server", mode, str(journal), str(out), backend],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def lines(out: Path) -> list[tuple[str, int, int]]:
    fields = (line.split() for line in out.read_text().splitlines())
    return [(tag, int(number), int(pid)) for tag, number, pid in fields]


def held_journal(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A journal's path, the file the tasks write to, and their hold (`journal_targets`: they wait while it exists)."""
    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    out.touch()
    hold = Path(str(out) + ".hold")
    hold.touch()
    return journal, out, hold


def fill(journal: Path, tasks: list[Callable[[], object]]) -> None:
    """Write entries as a process that has since gone would have left them."""
    store = Journal(journal)
    entries = [
        NewEntry("process", PayloadKind.PAYLOAD, dumps_task(Task(0, task)), f"task 0 ({i})", "0", str(i), 0, None, None)
        for i, task in enumerate(tasks)
    ]
    store.append(entries)
    store.release()
    store.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_killed_server_s_unfinished_tasks_run_in_the_next_one(tmp_path: Path, backend: str) -> None:
    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    out.touch()
    Path(str(out) + ".hold").touch()
    first = server("crash", journal, out, backend)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "READY"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    Path(str(out) + ".hold").unlink()
    second = server("replay", journal, out, backend)
    output, _ = second.communicate(timeout=180)
    assert second.returncode == 0, output
    seen = lines(out)
    quick = Counter(number for tag, number, _ in seen if tag == "quick")
    assert quick == {0: 1, 1: 1, 2: 1}  # finished before the kill: never replayed
    ends = {number for tag, number, pid in seen if tag == "end" and pid == second.pid}
    assert ends == {0, 1, 2}  # every slow task ran to its end after the restart
    started_before = {number for tag, number, pid in seen if tag == "start" and pid == first.pid}
    assert started_before  # one was under way at the kill: it runs again (at least once)
    assert "PENDING 0 DEAD 0" in output
    replayed = int(output.split()[1])
    assert replayed == 3


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_retry_waiting_at_a_sigkill_runs_in_the_next_process(tmp_path: Path, backend: str) -> None:
    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    first = server("retry", journal, out, backend)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "READY"  # its first attempt failed; its retry waits 2 s
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    [(entry, _, _)] = Journal(journal).entries()
    assert (entry.attempts, entry.failures, entry.user_key) == (1, 1, "order-9")
    second = server("replay", journal, out, backend)
    output, _ = second.communicate(timeout=180)
    assert second.returncode == 0, output
    runs = [line.split() for line in out.read_text().splitlines()]
    # The second attempt, in the second process, after the first one's failure: same key, same entry.
    assert runs == [
        ["retry", "1", str(first.pid), "order-9", str(entry.id)],
        ["retry", "2", str(second.pid), "order-9", str(entry.id)],
    ]
    assert "REPLAYED 1 PENDING 0 DEAD 0" in output


def test_two_live_processes_claim_each_entry_once(tmp_path: Path) -> None:
    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    out.touch()
    fill(journal, [functools.partial(journal_targets.record, str(out), "entry", i) for i in range(40)])
    both = [server("replay", journal, out, "asyncio") for _ in range(2)]
    outputs = [process.communicate(timeout=180)[0] for process in both]
    assert [process.returncode for process in both] == [0, 0], outputs
    counts = Counter(number for _, number, _ in lines(out))
    assert counts == dict.fromkeys(range(40), 1)
    assert sum(int(output.split()[1]) for output in outputs) == 40


@pytest.mark.anyio
async def test_poison_entries_go_to_the_dead_table_and_the_others_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"

    def vanished() -> None:  # pickled by reference, as a deploy that renamed it would leave it
        pass

    vanished.__module__, vanished.__qualname__ = journal_targets.__name__, "vanished"
    journal_targets.vanished = vanished  # type: ignore[attr-defined]
    try:
        fill(
            journal,
            [
                functools.partial(journal_targets.record, str(out), "good", 1),
                vanished,
                journal_targets.crash,
                functools.partial(journal_targets.record, str(out), "good", 2),
            ],
        )
    finally:
        del journal_targets.vanished  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO, "starlette_concurrency")
    async with Concurrency(workers=2, journal=journal, env_file=None) as concurrency:
        with anyio.fail_after(120):
            while concurrency.stats().journal_dead < 2 or concurrency.stats().journal_pending:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await concurrency.wait_deferred(60)
        stats = concurrency.stats()
    assert sorted(number for _, number, _ in lines(out)) == [1, 2]
    assert (stats.journal_pending, stats.journal_dead, stats.replayed) == (0, 2, 4)
    # Its first start was in the process that left it (attempt 1), then attempts 2 and 3 here.
    assert stats.tasks_crashed == 2
    dead = {entry.function: entry.reason for entry in Journal(journal).dead_entries()}
    assert "would not load in the worker" in (dead["1"] or "")
    assert "started 3 times without finishing" in (dead["2"] or "")
    assert "replaying 4 deferred task(s) left by a previous run" in caplog.text
    assert caplog.text.count("moved to the journal's dead entries") == 2


def test_a_corrupt_file_is_refused_naming_it(tmp_path: Path) -> None:
    journal = tmp_path / "deferred.db"
    journal.write_bytes(b"not a database, certainly not a journal" * 100)
    with pytest.raises(ConfigurationError, match=r"deferred\.db.*move it aside"):
        Concurrency(journal=journal, env_file=None)


def test_a_journal_of_a_newer_release_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "deferred.db"
    Journal(journal).close()
    with contextlib.closing(sqlite3.connect(journal)) as db, db:  # closed, not only committed
        db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(ConfigurationError, match=r"deferred\.db.*newer release"):
        Concurrency(journal=str(journal), env_file=None)


# The layout release 1 of the journal wrote (schema version 1), before retries.
_VERSION_1 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, driver TEXT NOT NULL, kind TEXT NOT NULL,
    payload BLOB NOT NULL, label TEXT NOT NULL, task_key TEXT NOT NULL, function TEXT NOT NULL,
    call INTEGER NOT NULL, method TEXT, path TEXT, attempts INTEGER NOT NULL, user_key TEXT UNIQUE,
    owner TEXT NOT NULL, lease_expires REAL NOT NULL
);
CREATE TABLE dead (
    id INTEGER PRIMARY KEY, created, driver, kind, payload, label, task_key, function, call, method, path,
    attempts, user_key, reason TEXT NOT NULL, died REAL NOT NULL
);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_journal_of_the_release_before_retries_is_upgraded(tmp_path: Path) -> None:
    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    payload = dumps_task(Task(0, functools.partial(journal_targets.record, str(out), "old", 1)))
    with contextlib.closing(sqlite3.connect(journal)) as db, db:
        db.executescript(_VERSION_1)
        db.execute(
            "INSERT INTO entries (created, driver, kind, payload, label, task_key, function, call, attempts, owner, "
            "lease_expires) VALUES (0, 'process', 'payload', ?, 'task 0 (record)', '0', 'record', 0, 1, '', 0)",
            (payload,),
        )
    store = Journal(journal)
    [(entry, _, _)] = store.entries()
    assert (entry.attempts, entry.retries, entry.failures) == (1, 0, 0)
    store.close()
    with contextlib.closing(sqlite3.connect(journal)) as db:
        assert db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)


def test_an_unwritable_place_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"missing/deferred\.db.*writable"):
        Concurrency(journal=tmp_path / "missing" / "deferred.db", env_file=None)


@pytest.mark.parametrize("driver", ["fork", "sync"])
def test_drivers_that_do_not_pickle_refuse_a_journal(tmp_path: Path, driver: str) -> None:
    with pytest.raises(ConfigurationError, match=f"the '{driver}' driver cannot use a journal"):
        Concurrency(driver, journal=tmp_path / "deferred.db", env_file=None)
    concurrency = Concurrency(journal=tmp_path / "deferred.db", env_file=None)
    with pytest.raises(ConfigurationError, match=f"the '{driver}' driver cannot use a journal"):
        concurrency.driver(driver)


def test_the_journal_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONCURRENCY_JOURNAL", str(tmp_path / "env.db"))
    assert Concurrency(env_file=None).settings.journal == str(tmp_path / "env.db")
    assert Concurrency(journal=tmp_path / "arg.db", env_file=None).settings.journal == str(tmp_path / "arg.db")
    monkeypatch.setenv("CONCURRENCY_JOURNAL", "")
    assert Concurrency(env_file=None).settings.journal is None  # empty: unset, like the other variables
    monkeypatch.setenv("CONCURRENCY_JOURNAL", " ")
    with pytest.raises(ConfigurationError, match="CONCURRENCY_JOURNAL must be a file path"):
        Concurrency(env_file=None)
    monkeypatch.setenv("CONCURRENCY_JOURNAL", ":memory:")
    with pytest.raises(ConfigurationError, match="CONCURRENCY_JOURNAL must be a file"):
        Concurrency(env_file=None)
    monkeypatch.delenv("CONCURRENCY_JOURNAL")
    with pytest.raises(ConfigurationError, match="journal must be a file path"):
        Concurrency(journal=42, env_file=None)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_finished_entries_leave_the_journal_and_a_clean_close_leaves_none(tmp_path: Path) -> None:
    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    async with Concurrency(workers=2, journal=journal, env_file=None) as concurrency:
        batch = concurrency.request_batch(method="GET", path="/")
        token = batch.activate()
        concurrency.defer([functools.partial(journal_targets.record, str(out), "ok", i) for i in range(3)])
        batch.deactivate(token)
        assert Journal(journal).pending == 0  # not written while the request is open
        batch.finish(True)
        await concurrency.wait_deferred(60)
        with anyio.fail_after(60):  # removed in one transaction, a tenth of a second later at most
            while concurrency.stats().journal_pending:  # noqa: ASYNC110
                await anyio.sleep(0.05)
    assert len(lines(out)) == 3
    assert Journal(journal).pending == 0


def test_the_prometheus_collector_exports_the_journal(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from starlette_concurrency.metrics import register_metrics

    journal = tmp_path / "deferred.db"
    fill(journal, [functools.partial(journal_targets.record, str(tmp_path / "out.txt"), "x", 1)])
    registry = CollectorRegistry()
    register_metrics(Concurrency(workers=1, journal=journal, env_file=None), registry)
    text = generate_latest(registry).decode()
    assert "starlette_concurrency_journal_pending 1.0" in text
    assert "starlette_concurrency_journal_dead 0.0" in text
    assert "starlette_concurrency_replayed_total 0.0" in text


def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "starlette_concurrency", *arguments],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_cli_lists_retries_and_purges(tmp_path: Path) -> None:
    journal = str(tmp_path / "deferred.db")
    fill(Path(journal), [journal_targets.crash, journal_targets.crash, journal_targets.crash])
    store = Journal(journal)
    store.dead(2, "it crashed its worker")
    store.dead(3, "it would not load")
    store.close()
    listed = cli("journal", journal, "list")
    assert listed.returncode == 0, listed.stderr
    assert "pending: 1\n  #1  task 0 (0)" in listed.stdout
    assert "lease expired" in listed.stdout
    assert "dead: 2\n  #2  task 0 (1)" in listed.stdout
    assert "reason: it would not load" in listed.stdout
    retried = cli("journal", journal, "retry", "2")
    assert retried.returncode == 0, retried.stderr
    assert "entry 2 is pending again" in retried.stdout
    assert cli("journal", journal, "retry", "2").returncode == 1  # not dead any more
    purged = cli("journal", journal, "purge")
    assert "purged 1 dead" in purged.stdout
    store = Journal(journal)
    assert ([entry.id for entry, _, _ in store.entries()], store.dead_entries()) == ([1, 2], [])
    assert [entry.attempts for entry, _, _ in store.entries()] == [1, 0]  # a retried entry starts afresh
    store.close()
    missing = cli("journal", str(tmp_path / "nope.db"), "list")
    assert missing.returncode == 2
    assert "no journal at" in missing.stderr
    assert not (tmp_path / "nope.db").exists()


@pytest.mark.anyio
async def test_a_key_dedupes_while_its_task_is_pending(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    other = Journal(journal)  # another live facade holds a pending "order-7"
    payload = dumps_task(Task(0, functools.partial(journal_targets.record, str(out), "other", 7)))
    entry = NewEntry("process", PayloadKind.PAYLOAD, payload, "task 0 (x)", "0", "x", 0, None, None, "order-7")
    other.append([entry])
    caplog.set_level(logging.INFO, "starlette_concurrency")
    async with Concurrency(workers=2, journal=journal, env_file=None) as concurrency:
        batch = concurrency.request_batch(method="POST", path="/orders")
        token = batch.activate()
        for number in (1, 2):  # the second is a no-op: the first is pending
            concurrency.defer(functools.partial(journal_targets.record, str(out), "first", number), key="order-42")
        concurrency.defer(functools.partial(journal_targets.record, str(out), "mine", 7), key="order-7")
        batch.deactivate(token)
        batch.finish(True)
        await concurrency.wait_deferred(60)
        # Settled: the key is free again.
        concurrency.defer(functools.partial(journal_targets.record, str(out), "again", 3), key="order-42")
        await concurrency.wait_deferred(60)
        with pytest.raises(TypeError, match="key must be a str naming one callable"):
            concurrency.defer([print, print], key="both")
        with pytest.raises(TypeError, match="key must be a str"):
            concurrency.defer(print, key=42)  # type: ignore[arg-type]
        assert concurrency.stats().deferred_pending == 0
    assert sorted((tag, number) for tag, number, _ in lines(out)) == [("again", 3), ("first", 1)]
    assert "task of key 'order-7' is already pending in the journal" in caplog.text
    assert [entry.user_key for entry, _, _ in Journal(journal).entries()] == ["order-7"]
    other.close()


@pytest.mark.anyio
async def test_a_key_dedupes_without_a_journal_too() -> None:
    ran: list[int] = []
    async with Concurrency("sync", env_file=None) as concurrency:
        batch = concurrency.request_batch()
        token = batch.activate()
        concurrency.defer(lambda: ran.append(1), key="k")
        concurrency.defer(lambda: ran.append(2), key="k")
        batch.deactivate(token)
        batch.finish(False)  # a failed request: not run, and its key is free again
        concurrency.defer(lambda: ran.append(3), key="k")
        await concurrency.wait_deferred(60)
    assert ran == [3]


@pytest.mark.anyio
async def test_what_the_drain_stops_stays_for_the_next_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal, out, hold = held_journal(tmp_path)
    caplog.set_level(logging.INFO, "starlette_concurrency")
    concurrency = Concurrency(workers=2, journal=journal, drain_timeout=0.5, env_file=None)
    async with concurrency:
        concurrency.defer([functools.partial(journal_targets.slow, str(out), number) for number in range(3)])
        with anyio.fail_after(60):
            while "start" not in out.read_text():  # noqa: ASYNC110
                await anyio.sleep(0.05)
    assert "it stays in the journal and runs at the next start" in caplog.text
    left = Journal(journal).entries()
    assert len(left) == 3
    started = {number for tag, number, _ in lines(out) if tag == "start"}
    # A start is counted for each, except for those the drain stopped before they began.
    assert sorted(entry.attempts for entry, _, _ in left) == sorted(
        1 if number in started else 0 for number in range(3)
    )
    hold.unlink()
    async with Concurrency(workers=2, journal=journal, env_file=None) as again:  # same process: released
        with anyio.fail_after(60):
            while len([tag for tag, _, _ in lines(out) if tag == "end"]) < 3:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await again.wait_deferred(60)
        with anyio.fail_after(60):  # removed a tenth of a second after they finished, at most
            while again.stats().journal_pending:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        assert again.stats().replayed == 3
    assert "replaying 3 deferred task(s) left by a previous run" in caplog.text


# How each server of the crash tests is started, with ``{port}`` for its port: one per event loop.
SERVERS = {
    "uvicorn (asyncio)": ["uvicorn", "tests.journal_app:app", "--port", "{port}", "--no-access-log"],
    "hypercorn (trio)": ["hypercorn", "tests.journal_app:app", "-k", "trio", "-b", "127.0.0.1:{port}"],
}


def killed_uvicorn(env: dict[str, str], log: Path, *options: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start uvicorn on the journal's app (to be SIGKILLed, so not `asgi.uvicorn`, which stops it gracefully)."""
    return killed_server("uvicorn (asyncio)", env, log, *options)


def killed_server(name: str, env: dict[str, str], log: Path, *options: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start one of `SERVERS` on the journal's app, to be SIGKILLed; return it and its URL once it answers.

    In a session of its own: `kill_server` kills its whole process group (``--workers`` processes too).
    """
    import socket

    from .asgi import free_port

    port = free_port()
    command = [part.format(port=port) for part in SERVERS[name]]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", *command, *options],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    for _ in range(600):  # a bound against hangs
        assert process.poll() is None, log.read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, f"http://127.0.0.1:{port}"
        except OSError:
            subprocess.run(["sleep", "0.05"], check=True)
    raise AssertionError(f"{name} never answered:\n{log.read_text()}")


def kill_server(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a `killed_uvicorn` server, every process of it at once (its pools' workers die with their parents)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def journaled(journal: Path) -> int:
    """How many `/orders` entries the journal holds."""
    with contextlib.closing(sqlite3.connect(journal)) as db:
        return int(db.execute("SELECT count(*) FROM entries WHERE user_key LIKE 'order-%'").fetchone()[0])


def wait_for(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1200):  # a bound against hangs, not a speed expectation
        if condition():
            return
        subprocess.run(["sleep", "0.05"], check=True)
    raise AssertionError(f"never happened: {what}")


# The crash test's storm: requests sent by `_STORM_CLIENTS` threads at once, the server killed the moment the
# `_KILL_AT`-th 2xx response has arrived (the rest are in flight, or never sent).
_STORM, _STORM_CLIENTS, _KILL_AT = 40, 8, 16


@pytest.mark.parametrize("name", list(SERVERS))
def test_every_task_whose_response_arrived_runs_after_a_sigkill_right_after_it(tmp_path: Path, name: str) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    journal, out, hold = held_journal(tmp_path)
    env = {"JOURNAL_PATH": str(journal), "JOURNAL_OUT": str(out), "PYTHONPATH": str(ROOT)}
    first, url = killed_server(name, env, tmp_path / "first.log")
    accepted: list[int] = []
    counting = threading.Lock()

    def order(client: httpx.Client, number: int) -> None:
        try:
            response = client.post(f"{url}/orders/{number}")
        except httpx.TransportError:  # in flight at the kill, or sent after it: not accepted
            return
        with counting:
            if response.status_code == 200 and len(accepted) < _KILL_AT:
                accepted.append(number)
                if len(accepted) == _KILL_AT:
                    kill_server(first)  # at once: nothing waits for the journal, or for the tasks

    try:
        with httpx.Client(timeout=60) as client:
            assert client.get(f"{url}/status/500").status_code == 500
            with ThreadPoolExecutor(_STORM_CLIENTS) as clients:
                list(clients.map(functools.partial(order, client), range(_STORM)))
    finally:
        kill_server(first)  # mid-storm: tasks queued, one or two running (held), batches being written
    assert len(accepted) == _KILL_AT, (tmp_path / "first.log").read_text()
    before = len(lines(out))
    assert all(tag == "start" for tag, _, _ in lines(out))  # held: none had finished
    hold.unlink()
    second, _ = killed_server(name, env, tmp_path / "second.log")
    try:
        wait_for(lambda: journaled(journal) == 0, "the journal emptied after the restart")
        ends = {number for tag, number, _ in lines(out)[before:] if tag == "end"}
        # Every task whose 2xx arrived ran after the restart; so may tasks whose responses were in flight.
        assert set(accepted) <= ends, (sorted(set(accepted) - ends), (tmp_path / "second.log").read_text())
        assert "replaying" in (tmp_path / "second.log").read_text()
    finally:
        kill_server(second)
    assert all(tag != "failed" for tag, _, _ in lines(out))  # a failed request's deferral is never journaled
    assert Journal(journal).pending == 0


@pytest.mark.anyio
async def test_a_full_journal_refuses_defer_until_a_write_succeeds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from starlette_concurrency import DeferralRejected

    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    caplog.set_level(logging.INFO, "starlette_concurrency")
    async with Concurrency(workers=2, journal=journal, env_file=None) as concurrency:
        store = concurrency._runtime.journal
        assert store is not None
        # A full disk, as SQLite sees it: no page may be added to the file.
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
        batch = concurrency.request_batch(method="POST", path="/orders")
        token = batch.activate()
        ballast = b"x" * 100_000  # travels with the lambda: more than the pages the file has room for
        concurrency.defer(lambda: journal_targets.record(str(out), "unjournaled", len(ballast) // 100_000))
        batch.deactivate(token)
        batch.finish(True)
        await concurrency.wait_deferred(60)
        assert "could not be written to the journal" in caplog.text
        assert lines(out)[0][:2] == ("unjournaled", 1)  # accepted before the failure: it ran, not dropped
        with pytest.raises(DeferralRejected, match=r"deferred\.db.*could not be written.*full"):
            concurrency.defer(print)
        store._db.execute("PRAGMA max_page_count = 1073741823")
        with anyio.fail_after(60):
            while store.failure is not None:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        concurrency.defer(functools.partial(journal_targets.record, str(out), "journaled", 2))
        await concurrency.wait_deferred(60)
    assert [tag for tag, _, _ in lines(out)] == ["unjournaled", "journaled"]


def test_under_uvicorn_with_two_workers_every_accepted_task_runs_after_a_sigkill(tmp_path: Path) -> None:
    import httpx

    from .asgi import uvicorn

    journal, out, hold = held_journal(tmp_path)
    env = {"JOURNAL_PATH": str(journal), "JOURNAL_OUT": str(out), "PYTHONPATH": str(ROOT)}
    first, url = killed_uvicorn(env, tmp_path / "first.log", "--workers", "2")
    try:
        with httpx.Client(timeout=60) as client:
            accepted = [n for n in range(10) if client.post(f"{url}/orders/{n}").status_code == 200]
            wait_for(lambda: "start" in out.read_text(), "a task under way")
            accepted += [n for n in range(10, 20) if client.post(f"{url}/orders/{n}").status_code == 200]
            # The moment the last response has arrived, the supervisor and both workers at once: a power cut,
            # as far as they know. Nothing waits for the journal.
            kill_server(first)
    finally:
        kill_server(first)
    assert accepted == list(range(20))
    before = lines(out)
    running_at_kill = {number for tag, number, _ in before if tag == "start"}
    assert running_at_kill
    assert all(tag == "start" for tag, _, _ in before)  # held: none had finished
    hold.unlink()
    with uvicorn("tests.journal_app:app", tmp_path / "second.log", env, "--workers", "2") as second:
        wait_for(
            lambda: {number for tag, number, _ in lines(out) if tag == "end"} == set(accepted),
            "every accepted task ran to its end after the restart",
        )
        assert "replaying" in second.output()
    after = lines(out)[len(before) :]
    assert Counter(number for tag, number, _ in after if tag == "end") == dict.fromkeys(accepted, 1)
    # Each ran once after the restart; the tasks running at the kill had started once before too.
    starts = Counter(number for tag, number, _ in lines(out) if tag == "start")
    duplicates = {number for number, count in starts.items() if count > 1}
    assert duplicates == running_at_kill
    assert Journal(journal).pending == 0


def test_two_overlapping_servers_on_one_journal_hand_over_after_a_sigkill(tmp_path: Path) -> None:
    import httpx

    journal, out, hold = held_journal(tmp_path)
    env = {"JOURNAL_PATH": str(journal), "JOURNAL_OUT": str(out), "PYTHONPATH": str(ROOT)}
    old, old_url = killed_uvicorn(env, tmp_path / "old.log")
    new: subprocess.Popen[bytes] | None = None
    try:
        with httpx.Client(timeout=60) as client:
            assert all(client.post(f"{old_url}/orders/{n}").status_code == 200 for n in range(8))
            wait_for(lambda: "start" in out.read_text(), "the old server's work under way")
            # A deploy that overlaps: the new server starts while the old one still serves (and owns its entries).
            new, new_url = killed_uvicorn(env, tmp_path / "new.log")
            assert all(client.post(f"{new_url}/orders/{n}").status_code == 200 for n in range(8, 12))
            # While both live, neither claims the other's entries; each answered only once they were journaled.
            owners = Counter(owner for entry, owner, _ in Journal(journal).entries())
            assert sorted(owners.values()) == [4, 8]
            assert all(client.post(f"{old_url}/orders/{n}").status_code == 200 for n in range(12, 16))
            kill_server(old)  # the moment its last response has arrived: nothing waits for the journal
        assert all(tag == "start" for tag, _, _ in lines(out))
        before = lines(out)
        running_at_kill = {number for tag, number, pid in before if tag == "start" and pid == old.pid}
        hold.unlink()
        wait_for(
            lambda: {number for tag, number, _ in lines(out) if tag == "end"} == set(range(16)),
            "every task ran to its end in the new server",
        )
        ends = [(number, pid) for tag, number, pid in lines(out) if tag == "end"]
        assert Counter(number for number, _ in ends) == dict.fromkeys(range(16), 1)
        assert {pid for _, pid in ends} == {new.pid}
        starts = Counter(number for tag, number, _ in lines(out) if tag == "start")
        assert {number for number, count in starts.items() if count > 1} == running_at_kill
        wait_for(lambda: journaled(journal) == 0, "the journal emptied")
        assert "replaying" in (tmp_path / "new.log").read_text()
    finally:
        kill_server(old)
        if new is not None:
            kill_server(new)


def order_app(concurrency: Concurrency, out: Path) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app deferring a task and an ``always`` one, answering the status its path names in two parts."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        concurrency.defer(functools.partial(journal_targets.record, str(out), "normal", 1))
        concurrency.defer(functools.partial(journal_targets.record, str(out), "always", 2), always=True)
        await send({"type": "http.response.start", "status": int(scope["path"][1:]), "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await send({"type": "http.response.body", "body": b"end"})

    return app


async def serve_once(app: Callable[[Scope, Receive, Send], Awaitable[None]], path: str, send: Send) -> None:
    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    with anyio.fail_after(60):  # a bound against hangs
        await app({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)


@pytest.mark.anyio
async def test_a_response_ends_once_its_batch_is_journaled_and_the_batch_starts_after_it(tmp_path: Path) -> None:
    from starlette_concurrency import ConcurrencyMiddleware

    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    out.touch()
    concurrency = Concurrency(workers=2, journal=journal, env_file=None)
    app = ConcurrencyMiddleware(order_app(concurrency, out), concurrency=concurrency)
    async with concurrency:
        for status, journaled_at_end, ran in [(200, 2, ["always", "normal"]), (500, 1, ["always"])]:
            seen: list[tuple[bytes, int, str]] = []

            async def send(message: Message) -> None:
                if message["type"] == "http.response.body":
                    seen.append((message["body"], Journal(journal).pending, out.read_text()))  # noqa: B023

            await serve_once(app, f"/{status}", send)
            # Written before the end went out (none of it before: the request was open), started after it.
            assert seen == [(b"part", 0, ""), (b"end", journaled_at_end, "")]
            await concurrency.wait_deferred(60)
            assert sorted(tag for tag, _, _ in lines(out)) == ran
            out.write_text("")
            with anyio.fail_after(60):  # removed a tenth of a second after they finish
                while Journal(journal).pending:  # noqa: ASYNC110
                    await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_a_failed_journal_write_neither_holds_nor_fails_the_response(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from starlette_concurrency import ConcurrencyMiddleware

    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    out.touch()
    caplog.set_level(logging.INFO, "starlette_concurrency")
    concurrency = Concurrency(workers=2, journal=journal, env_file=None)
    ballast = b"x" * 100_000  # travels with the lambda: more than the pages the file has room for

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        concurrency.defer(lambda: journal_targets.record(str(out), "unjournaled", len(ballast) // 100_000))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async with concurrency:
        store = concurrency._runtime.journal
        assert store is not None
        # A full disk, as SQLite sees it: no page may be added to the file.
        store._db.execute(f"PRAGMA max_page_count = {store._db.execute('PRAGMA page_count').fetchone()[0]}")
        await serve_once(ConcurrencyMiddleware(app, concurrency=concurrency), "/orders", send)
        assert [message.get("body") for message in sent] == [None, b"ok"]
        await concurrency.wait_deferred(60)
        store._db.execute("PRAGMA max_page_count = 1073741823")
    assert "could not be written to the journal" in caplog.text
    assert [tag for tag, _, _ in lines(out)] == ["unjournaled"]  # accepted: it ran, not dropped


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
def test_wsgi_the_last_bytes_go_out_once_the_batch_is_journaled(tmp_path: Path, sized: bool) -> None:
    from starlette_concurrency import ConcurrencyWSGIMiddleware

    journal, out = tmp_path / "deferred.db", tmp_path / "out.txt"
    out.touch()
    concurrency = Concurrency(workers=2, journal=journal, env_file=None)

    def app(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterator[bytes]:
        concurrency.defer(functools.partial(journal_targets.record, str(out), "normal", 1))
        start_response("200 OK", [("Content-Length", "8")] if sized else [])  # lazily, as a generator may
        yield b"part"
        yield b"end!"

    with concurrency:
        response = ConcurrencyWSGIMiddleware(app, concurrency)({"REQUEST_METHOD": "POST"}, lambda *_: print)
        chunks = iter(response)
        assert (next(chunks), Journal(journal).pending) == (b"part", 0)
        # The chunk that completes the Content-Length waits for the journal; without one, the iterable's end does.
        assert (next(chunks), Journal(journal).pending) == (b"end!", 1 if sized else 0)
        assert list(chunks) == []
        assert (Journal(journal).pending, out.read_text()) == (1, "")  # written, not started before close()
        response.close()  # type: ignore[attr-defined]
        concurrency.wait_deferred_blocking(timeout=60)
    assert [tag for tag, _, _ in lines(out)] == ["normal"]
