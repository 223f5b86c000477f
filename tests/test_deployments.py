"""The shutdown matrix: every server we document, a real process on 127.0.0.1, SIGTERM after the last response.

Each row serves tests/deployment_asgi.py (Starlette), deployment_wsgi.py (Flask), deployment_litestar.py or
deployment_quart.py, defers tasks from requests (short ones, some about as long as the drain, some far longer)
and from a background thread outside any request, then sends SIGTERM as `docker stop` or Kubernetes would. The
files the app and its tasks write (deployment_apps.py) and the package's log lines tell, for each task, whether
the facade accepted it, whether it ran, and whether it was logged as not run. Each row runs once (`shutdown()`);
the tests below read what it left:

- every task accepted before shutdown began either ran or was logged by name — never neither (lost); no task
  ran twice, none was logged twice;
- no task both ran and was logged as not run (an operator replaying the log would run it twice);
- the background thread goes on calling `defer()` through the shutdown (it is refused, and tries again a
  millisecond later): what is accepted after the first refusal must run or be logged too;
- a new connection made while the app drains is refused or answered 503 (so that a load balancer retries
  elsewhere), in the rows whose server can do that;
- no process of the server outlives it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from .asgi import ROOT, free_port
from .deployment_apps import THREAD_FIRST_ID

DRAIN_TIMEOUT = 2.0  # seconds: the facade's, in every row (long enough to cover the probe below)
GRACE = 15  # seconds: the servers' own graceful timeouts, well above the drain
PROBE_AFTER = 1.0  # seconds after SIGTERM: when a new client tries to connect (the drain lasts 2)
PROBE_TIMEOUT = 5.0  # seconds the new client waits for an answer before calling the server hung
EXIT_WAIT = DRAIN_TIMEOUT + 30  # a bound against hangs, not a speed expectation
READY_WAIT = 60.0

# (first id, count, seconds): short tasks, tasks about as long as the drain is (the race between a task's end
# and the drain's), and tasks far longer than the drain (those must be stopped and logged).
REQUEST_TASKS = [(0, 12, 0.02), (100, 4, DRAIN_TIMEOUT * 0.9), (200, 2, DRAIN_TIMEOUT * 10)]
FAR_LONGER = {200, 201}

TASK_IN_LOG = re.compile(r"task 't-(\d+)'")
# The lines that say a task did not run at all (as opposed to "stopped unfinished", which may have).
NOT_RUN_IN_LOG = re.compile(
    r"task 't-(\d+)'[^\n]*(?:never started|dropped \(not run\)|could not run|before it started)"
)


@dataclass(frozen=True)
class Row:
    """One server and how it serves the app."""

    name: str
    command: Callable[[int], list[str]]
    # Whether the server can refuse (or answer 503) a new connection while the app drains.
    refuses_new_connections: bool = True
    # Whether the background thread defers before any request does (and so is the facade's first user).
    thread_first: bool = False


def python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


ASGI, WSGI = "tests.deployment_asgi:app", "tests.deployment_wsgi:app"
LITESTAR, LITESTAR_LISTED = "tests.deployment_litestar:app", "tests.deployment_litestar:listed"
QUART = "tests.deployment_quart:app"

ROWS = {
    row.name: row
    for row in [
        Row("uvicorn", lambda port: python("uvicorn", ASGI, "--port", str(port), "--no-access-log")),
        Row("uvicorn --lifespan off",
            lambda port: python("uvicorn", ASGI, "--port", str(port), "--no-access-log", "--lifespan", "off")),
        Row("uvicorn --lifespan off, a thread defers first",
            lambda port: python("uvicorn", ASGI, "--port", str(port), "--no-access-log", "--lifespan", "off"),
            thread_first=True),
        Row("gunicorn + UvicornWorker", lambda port: python(
            "gunicorn", ASGI, "-k", "uvicorn.workers.UvicornWorker", "-w", "1", "-b", f"127.0.0.1:{port}",
            "--graceful-timeout", str(GRACE))),
        Row("gunicorn + UvicornWorker -w 2 --preload", lambda port: python(
            "gunicorn", ASGI, "-k", "uvicorn.workers.UvicornWorker", "-w", "2", "--preload", "-b", f"127.0.0.1:{port}",
            "--graceful-timeout", str(GRACE))),
        Row("gunicorn gthread (Flask)", lambda port: python(
            "gunicorn", WSGI, "-k", "gthread", "--threads", "4", "-w", "1", "-b", f"127.0.0.1:{port}",
            "--graceful-timeout", str(GRACE))),
        Row("waitress (Flask)", lambda port: python("waitress", "--listen", f"127.0.0.1:{port}", WSGI)),
        # hypercorn's supervisor holds the listening socket until its worker process has exited: a new
        # connection waits in its backlog through the drain, then is reset. --workers 0 serves in one process.
        Row("hypercorn (asyncio)", lambda port: python(
            "hypercorn", ASGI, "-b", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACE)),
            refuses_new_connections=False),
        Row("hypercorn (trio)", lambda port: python(
            "hypercorn", ASGI, "-k", "trio", "-b", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACE)),
            refuses_new_connections=False),
        Row("hypercorn --workers 0 (asyncio)", lambda port: python(
            "hypercorn", ASGI, "-w", "0", "-b", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACE))),
        Row("hypercorn --workers 0 (trio)", lambda port: python(
            "hypercorn", ASGI, "-k", "trio", "-w", "0", "-b", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACE))),
        Row("daphne", lambda port: python("daphne", "-b", "127.0.0.1", "-p", str(port), ASGI)),
        # Other frameworks, as the README wires them: ConcurrencyMiddleware around the whole app (Litestar,
        # Quart), and Litestar's own `middleware=[...]`, which never sees the lifespan.
        Row("uvicorn (Litestar)", lambda port: python("uvicorn", LITESTAR, "--port", str(port), "--no-access-log")),
        Row("uvicorn (Litestar, middleware=[...])",
            lambda port: python("uvicorn", LITESTAR_LISTED, "--port", str(port), "--no-access-log")),
        Row("uvicorn (Quart)", lambda port: python("uvicorn", QUART, "--port", str(port), "--no-access-log")),
        Row("hypercorn (Quart)", lambda port: python(
            "hypercorn", QUART, "-b", f"127.0.0.1:{port}", "--graceful-timeout", str(GRACE)),
            refuses_new_connections=False),
    ]
}  # fmt: skip

# Defects that the matrix shows today; each row's test flips to a pass when its fix lands. A defect of a whole
# row (its server cannot be run through the scenario) marks every test of the row.
ROW_DEFECTS: dict[str, str] = {}  # none today (daphne's hang after SIGTERM is fixed)


def rows(xfail: dict[str, str], only: Callable[[Row], bool] = lambda row: True) -> list[object]:
    """The rows as parameters, each marked a strict xfail where the row, or `xfail`, names a defect."""
    xfail = {**ROW_DEFECTS, **xfail}
    return [
        pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=True, reason=xfail[name])] if name in xfail else [])
        for name, row in ROWS.items()
        if only(row)
    ]


@dataclass
class Shutdown:
    """What one row's server did, read from the files its app, its tasks and its log left."""

    name: str
    returncode: int
    new_client: str  # what a connection made PROBE_AFTER s after SIGTERM got
    accepted: list[int]  # in the order the app noted them
    refused: list[int]
    ran: Counter[int]
    logged: Counter[int]
    not_run: set[int]  # logged as not having run at all
    log: str
    server_log: str
    survivors: list[int] = field(default_factory=list)

    def figures(self) -> str:
        late = self.late()
        before = set(self.accepted) - late
        ran, logged = set(self.ran), set(self.logged)
        return (
            f"{self.name}: exit {self.returncode}; accepted before shutdown {len(before)} "
            f"({sum(task < THREAD_FIRST_ID for task in before)} from requests): {len(before & ran)} ran, "
            f"{len(before & logged)} logged, {len(self.unaccounted(before))} lost, {len(ran & logged)} both; "
            f"refused {len(self.refused)}; accepted after a refusal {len(late)}: {len(late & ran)} ran, "
            f"{len(late & logged)} logged, {len(self.unaccounted(late))} lost; "
            f"a new connection {PROBE_AFTER} s after SIGTERM: {self.new_client}"
        )

    def late(self) -> set[int]:
        """The thread's tasks accepted after `defer()` had refused one (shutdown had begun)."""
        if not self.refused:
            return set()
        first_refusal = min(self.refused)
        return {task for task in self.accepted if task > first_refusal}

    def unaccounted(self, tasks: set[int]) -> list[int]:
        return sorted(tasks - set(self.ran) - set(self.logged))


_shutdowns: dict[str, Shutdown | str] = {}  # a row's result, or why its server could not be run


def probe(url: str) -> str:
    """What a new client gets from the server: 'refused', an HTTP status, 'reset' or 'hung'."""
    try:
        return str(httpx.get(f"{url}/health", timeout=PROBE_TIMEOUT).status_code)
    except httpx.ConnectError:
        return "refused"
    except httpx.TimeoutException:
        return "hung"
    except httpx.TransportError:  # closed or reset without an answer
        return "reset"


def shutdown(name: str, tmp_path_factory: pytest.TempPathFactory) -> Shutdown:
    """Serve the row's app, defer, SIGTERM after the last response; once per row, whichever test asks first."""
    if name not in _shutdowns:
        try:
            run = _run(ROWS[name], tmp_path_factory.mktemp("deploy"))
        except (AssertionError, pytest.fail.Exception) as exc:
            _shutdowns[name] = str(exc)  # the row's other tests fail at once with the same reason
            raise
        _shutdowns[name] = run
        print(run.figures())
    result = _shutdowns[name]
    if isinstance(result, str):
        pytest.fail(f"{name} could not be run: {result}")
    return result


def _run(row: Row, directory: Path) -> Shutdown:
    port, url = (port := free_port()), f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DEPLOY_DIR": str(directory),
        "CONCURRENCY_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    output = directory / "server.output"
    with output.open("wb") as server_output:
        process = subprocess.Popen(
            row.command(port),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=server_output,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(row, process, url, output)
        with httpx.Client(base_url=url, timeout=30) as client:
            if row.thread_first:
                assert client.get("/thread").text == "started"
                time.sleep(0.1)  # its first defer() starts the facade
            for first, count, seconds in REQUEST_TASKS:
                for task_id in range(first, first + count):
                    assert client.get("/defer", params={"id": task_id, "seconds": seconds}).text == "deferred"
                    if task_id == 0 and not row.thread_first:
                        assert client.get("/thread").text == "started"
        assert process.pid in _processes_of(directory)  # the survivors' check below can see the server's processes
        process.send_signal(signal.SIGTERM)  # right after the last response
        time.sleep(PROBE_AFTER)
        new_client = probe(url)
        try:
            returncode = process.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{row.name} still runs {EXIT_WAIT} s after SIGTERM:\n{_tail(output)}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    time.sleep(0.5)  # the last workers' own exits (they follow their parent's)
    survivors = _processes_of(directory)

    def read(kind: str) -> list[int]:
        path = directory / kind
        return [int(line) for line in path.read_text().split()] if path.exists() else []

    log = (directory / "log").read_text() if (directory / "log").exists() else ""
    return Shutdown(
        name=row.name,
        returncode=returncode,
        new_client=new_client,
        accepted=read("accepted"),
        refused=read("refused"),
        ran=Counter(read("ran")),
        logged=Counter(int(match) for match in TASK_IN_LOG.findall(log)),
        not_run={int(match) for match in NOT_RUN_IN_LOG.findall(log)},
        log=log,
        server_log=_tail(output),
        survivors=survivors,
    )


def _wait_ready(row: Row, process: subprocess.Popen[bytes], url: str, output: Path) -> None:
    deadline = time.monotonic() + READY_WAIT
    while True:
        assert process.poll() is None, f"{row.name} exited with {process.returncode}:\n{_tail(output)}"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{row.name} never answered:\n{_tail(output)}"
        time.sleep(0.1)


def _processes_of(directory: Path) -> list[int]:
    """Every live process of the row's server: they all inherit DEPLOY_DIR (workers started after SIGTERM too)."""
    found = []
    for candidate in psutil.process_iter():
        try:
            if candidate.status() != psutil.STATUS_ZOMBIE and candidate.environ().get("DEPLOY_DIR") == str(directory):
                found.append(candidate.pid)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return found


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


@pytest.mark.parametrize(
    "name",
    rows({}),
)
def test_every_task_accepted_before_shutdown_ran_or_was_logged(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    result = shutdown(name, tmp_path_factory)
    before = set(result.accepted) - result.late()
    lost = result.unaccounted(before)
    context = f"{result.figures()}\n{result.log[-3000:]}"
    assert not lost, f"{len(lost)} accepted tasks neither ran nor were logged: {lost[:20]}\n{context}"
    assert [task for task, times in result.ran.items() if times > 1] == [], f"tasks ran twice\n{context}"
    assert [task for task, times in result.logged.items() if times > 1] == [], f"tasks logged twice\n{context}"
    # The tasks far longer than the drain cannot have run: they are the ones the log must name.
    assert set(result.logged) >= FAR_LONGER, context


@pytest.mark.parametrize("name", rows({}))
def test_no_task_both_ran_and_was_logged_as_not_run(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tasks as long as the drain end as it times out: one that ended within its cancel grace is not logged
    # at all; one still running is logged "stopped unfinished (it may have done part of its work)", which
    # is no claim that it did not run. "Never started" (and "dropped") must be true.
    result = shutdown(name, tmp_path_factory)
    both = sorted(set(result.ran) & result.not_run)
    assert not both, f"{len(both)} tasks ran and were logged as not having run: {both[:20]}\n{result.figures()}"


@pytest.mark.parametrize(
    "name",
    rows({}),
)
def test_a_defer_after_shutdown_began_is_refused_or_kept(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    result = shutdown(name, tmp_path_factory)
    late = result.late()
    lost = result.unaccounted(late)
    assert not lost, (
        f"{len(lost)} of the {len(late)} tasks accepted after a refusal neither ran nor were logged: {lost[:20]}\n"
        f"{result.figures()}"
    )


@pytest.mark.parametrize(
    "name",
    rows({}, only=lambda row: row.refuses_new_connections),
)
def test_a_new_connection_during_the_drain_is_refused(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    result = shutdown(name, tmp_path_factory)
    assert result.new_client in ("refused", "503"), f"{result.figures()}\n{result.server_log}"


@pytest.mark.parametrize("name", rows({}))
def test_no_process_of_the_server_outlives_it(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    result = shutdown(name, tmp_path_factory)
    assert not result.survivors, f"{result.figures()}: still running: {result.survivors}"


def test_a_graceful_timeout_below_the_drain_is_warned_about(tmp_path_factory: pytest.TempPathFactory) -> None:
    row = Row("gunicorn + UvicornWorker, --graceful-timeout 1", lambda port: python(
        "gunicorn", ASGI, "-k", "uvicorn.workers.UvicornWorker", "-w", "1", "-b", f"127.0.0.1:{port}",
        "--graceful-timeout", "1"))  # fmt: skip
    result = _run(row, tmp_path_factory.mktemp("deploy"))
    print(result.figures())
    warnings = [line for line in result.log.splitlines() if " WARNING " in line and "graceful" in line]
    assert warnings, f"nothing said that a 1 s graceful timeout cuts a {DRAIN_TIMEOUT} s drain\n{result.figures()}"
