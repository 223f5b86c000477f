"""Litestar and Quart as the README wires them, each on a real server on 127.0.0.1 with real worker processes.

- The README's snippets are examples/litestar_app.py and examples/quart_app.py, word for word (so that the
  docs cannot rot); served, their workers start with the app (the lifespan reached the middleware), `run()`
  answers from the workers, `defer()` reports, and SIGTERM leaves no process behind.
- tests/deployment_litestar.py and tests/deployment_quart.py (the shutdown matrix's apps: tests/test_deployments.py
  counts what SIGTERM drains) say more: the workers see what the framework's own startup put in the
  environment, a deferred task starts only once the answer has left, a client that goes away stops its
  `run()` call without an error in the logs, and Litestar's ``middleware=[...]`` still works, with one
  warning that names the fix.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from examples.work import count_rows

from .asgi import ROOT, free_port
from .deployment_apps import ANSWER_PAUSE
from .helpers import WORKER_SCRIPT

WORKERS = 2
WAIT = 60.0  # seconds: a bound against hangs on a busy machine, not a speed expectation


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    port: int
    output: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def command(server: str, app: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--no-access-log"]
    assert server == "hypercorn"  # Quart's own server (`quart run` serves with it)
    return [sys.executable, "-m", "hypercorn", app, "-b", f"127.0.0.1:{port}", "--graceful-timeout", "15"]


@contextmanager
def serve(server: str, app: str, directory: Path) -> Iterator[Served]:
    """Serve `app` until the block ends, then SIGTERM it and check that it, and every worker, exited."""
    port = free_port()
    env = {
        **os.environ,
        "CONCURRENCY_WORKERS": str(WORKERS),
        "CONCURRENCY_DRIVER": "process",
        "DEPLOY_DIR": str(directory),  # the deployment apps' files and log
        "EXAMPLE_METRICS_LOG": str(directory / "metrics.log"),  # the examples' reports
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    output = directory / "server.output"
    with output.open("wb") as server_output:
        process = subprocess.Popen(
            command(server, app, port), cwd=ROOT, env=env, stdout=server_output, stderr=subprocess.STDOUT
        )
    served = Served(process, port, output)
    try:
        deadline = time.monotonic() + WAIT
        while True:  # listening; no request is made here (the examples' workers must start without one)
            assert process.poll() is None, f"{server} exited with {process.returncode}:\n{served.text()}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"{server} never listened:\n{served.text()}"
                time.sleep(0.05)
        yield served
        everything = [process.pid, *descendants(process.pid)]
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(WAIT)
        # uvicorn re-raises the signal it shut down on; hypercorn exits 0.
        assert returncode in (0, -signal.SIGTERM), f"{server} exited with {returncode}:\n{served.text()}"
        wait_for(lambda: not [pid for pid in everything if alive(pid)], f"processes outlived {server}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def workers_of(pid: int) -> set[int]:
    """The process-driver workers among a server's descendants (hypercorn's are its worker process's children)."""
    found = set()
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if alive(child.pid) and any(arg.endswith(WORKER_SCRIPT) for arg in child.cmdline()):
                found.add(child.pid)
        except psutil.Error:  # gone meanwhile
            continue
    return found


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# The README's snippets are the examples -------------------------------------------------------------------------


def readme_blocks(section: str) -> list[str]:
    """The Python code blocks of one README section, in order."""
    readme = (ROOT / "README.md").read_text()
    text = readme.partition(f"\n## {section}\n")[2].partition("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def example_body(path: Path) -> str:
    """An example file less its docstring and its ``from __future__`` line: what the README shows."""
    source = path.read_text()
    docstring = ast.parse(source).body[0]
    assert isinstance(docstring, ast.Expr)
    assert docstring.end_lineno is not None
    rest = "".join(source.splitlines(keepends=True)[docstring.end_lineno :]).lstrip("\n")
    return rest.removeprefix("from __future__ import annotations\n").lstrip("\n")


def test_the_readme_shows_the_examples_word_for_word() -> None:
    blocks = readme_blocks("Litestar and Quart")
    assert blocks[:2] == [
        example_body(ROOT / "examples/litestar_app.py"),
        example_body(ROOT / "examples/quart_app.py"),
    ]


EXAMPLES = [
    ("uvicorn", "examples.litestar_app:app"),
    ("uvicorn", "examples.quart_app:app"),
    ("hypercorn", "examples.quart_app:app"),
]


@pytest.mark.parametrize(("server", "app"), EXAMPLES)
def test_the_readme_examples_start_their_workers_with_the_app_and_answer_from_them(
    server: str, app: str, tmp_path: Path
) -> None:
    with serve(server, app, tmp_path) as served:
        # The lifespan reached the middleware: the pool starts with the app, before any request.
        wait_for(lambda: len(workers_of(served.process.pid)) == WORKERS, f"no {WORKERS} workers:\n{served.text()}")
        workers = workers_of(served.process.pid)
        response = httpx.get(f"{served.url}/", timeout=WAIT)
        assert response.status_code == 200, served.text()
        counts = response.json()
        assert {key: value["count"] for key, value in counts.items()} == {
            "users": count_rows("users")["count"],
            "orders": count_rows("orders")["count"],
        }
        # run() ran in the workers, at the same time (one each).
        assert {value["pid"] for value in counts.values()} == workers
        metrics = tmp_path / "metrics.log"
        wait_for(metrics.exists, f"defer() never reported:\n{served.text()}")
        [report] = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert report["metric"] == "dashboard.users"
        assert report["value"] == counts["users"]["count"]
        assert report["pid"] in workers
    assert "never received the ASGI lifespan" not in served.text()


# The matrix's apps: startup, deferral after the answer, Litestar's middleware list ------------------------------

FRAMEWORK_APPS = [
    ("uvicorn", "tests.deployment_litestar:app", "litestar"),
    ("uvicorn", "tests.deployment_litestar:listed", "litestar"),
    ("uvicorn", "tests.deployment_quart:app", "quart"),
    ("hypercorn", "tests.deployment_quart:app", "quart"),
]


@pytest.mark.parametrize(("server", "app", "framework"), FRAMEWORK_APPS)
def test_the_workers_see_what_the_frameworks_startup_did_and_defer_waits_for_the_answer(
    server: str, app: str, framework: str, tmp_path: Path
) -> None:
    with serve(server, app, tmp_path) as served, httpx.Client(base_url=served.url, timeout=WAIT) as client:
        startup = client.get("/startup")
        assert startup.status_code == 200, served.text()
        seen = startup.json()
        assert seen["values"] == {"sum": 6, "max": 9}
        # Both workers (two tasks at once) see what Litestar's on_startup or Quart's before_serving set:
        # the pool started once that had run.
        assert [worker["started"] for worker in seen["workers"]] == [framework, framework]
        pids = {worker["pid"] for worker in seen["workers"]}
        assert len(pids) == WORKERS
        assert seen["server"] not in pids
        for attempt in range(3):
            answer = client.get("/after", params={"marker": f"after-{attempt}"})
            assert answer.status_code == 200, served.text()
            marker = tmp_path / f"after-{attempt}"
            wait_for(marker.exists, f"the deferred task never ran:\n{served.text()}")
            # The handler deferred, then waited ANSWER_PAUSE s before answering: a task started at once
            # would have begun before the answer's time.
            assert float(marker.read_text()) >= answer.json()["answered"], ANSWER_PAUSE
    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
    warnings = [line for line in log.splitlines() if "never received the ASGI lifespan" in line]
    if app.endswith(":listed"):
        # Several routes served, each with a middleware instance of its own: one warning, naming the fix.
        assert len(warnings) == 1, log
        assert "Litestar: `app = ConcurrencyMiddleware(Litestar(...), concurrency=c)`" in warnings[0]
    else:
        assert warnings == [], log


@pytest.mark.parametrize(("server", "app", "framework"), FRAMEWORK_APPS)
def test_a_client_that_goes_away_stops_its_run_call_quietly(
    server: str, app: str, framework: str, tmp_path: Path
) -> None:
    # Litestar turns an exception in a handler into a 500 and Quart cancels its handler when the client
    # leaves: either way the call's worker is stopped, and nothing is logged as an error.
    with serve(server, app, tmp_path) as served:
        marker = tmp_path / "held"
        with socket.create_connection(("127.0.0.1", served.port), timeout=WAIT) as client:
            client.sendall(b"GET /hold?marker=held HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            wait_for(marker.exists, f"the task never started:\n{served.text()}")
        holder = int(marker.read_text())  # the client has gone: the worker holding the task is stopped
        wait_for(lambda: not alive(holder), f"the worker of a run() whose client left still runs:\n{served.text()}")
    output = served.text()
    assert "Traceback" not in output
    assert "ERROR" not in output
    assert not (tmp_path / "log").exists() or (tmp_path / "log").read_text().count(" WARNING ") == (
        1 if app.endswith(":listed") else 0  # Litestar's middleware list: the one warning about its wiring
    ), (tmp_path / "log").read_text()
