"""The middleware under a real uvicorn server on 127.0.0.1 (tests/apps.py, served in a subprocess)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from . import helpers
from .asgi import ROOT, Server, free_port, read_marker, uvicorn

MARKERS_WAIT = 20.0  # seconds: a bound against hangs, not a speed expectation


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    directory = tmp_path / "markers"
    directory.mkdir()
    return directory


@pytest.fixture
def server(markers: Path, tmp_path: Path) -> Iterator[Server]:
    with uvicorn("tests.apps:app", tmp_path / "server.log", env={"TEST_MARKERS": str(markers)}) as running:
        yield running


def wait_for(*paths: Path) -> None:
    deadline = time.monotonic() + MARKERS_WAIT
    while not all(path.exists() for path in paths):
        assert time.monotonic() < deadline, f"never appeared: {[str(p) for p in paths if not p.exists()]}"
        time.sleep(0.02)


def test_the_response_does_not_wait_for_deferred_work(server: Server, markers: Path) -> None:
    response = httpx.get(f"{server.url}/defer", params={"seconds": 1.5})
    assert response.text == "deferred"
    # The batch sleeps 1.5 s before writing its markers: had the response waited for it, they would exist.
    assert list(markers.iterdir()) == []
    wait_for(markers / "slow-a.json", markers / "slow-b.json")
    a, b = read_marker(markers, "slow-a"), read_marker(markers, "slow-b")
    assert a["pid"] != b["pid"], "the batch's tasks ran in the same worker"
    assert a["start"] < b["end"], "the batch's tasks did not run at the same time"
    assert b["start"] < a["end"], "the batch's tasks did not run at the same time"


def test_error_statuses_run_only_always_tasks(server: Server, markers: Path) -> None:
    assert httpx.get(f"{server.url}/status/200").status_code == 200
    assert httpx.get(f"{server.url}/status/404").status_code == 404
    assert httpx.get(f"{server.url}/status/503").status_code == 503
    assert httpx.get(f"{server.url}/error").status_code == 500
    server.stop()  # shutdown drains: whatever was accepted has run once the server is gone
    ran = sorted(path.stem for path in markers.iterdir())
    assert ran == ["always-200", "always-404", "always-503", "always-error", "normal-200"]


def test_streaming_responses_defer_until_the_last_chunk(server: Server, markers: Path) -> None:
    with httpx.stream("GET", f"{server.url}/stream") as response:
        chunks = response.iter_bytes()
        assert next(chunks).startswith(b"chunk 0")
        assert not (markers / "stream.json").exists(), "deferred work started before the body was complete"
        rest = b"".join(chunks)
    assert rest.endswith(b"chunk 2\n")
    wait_for(markers / "stream.json")


def test_file_responses_and_sync_endpoints_defer(server: Server, markers: Path) -> None:
    assert httpx.get(f"{server.url}/file").text.startswith('"""An app exercising the middleware')
    assert httpx.get(f"{server.url}/sync").text == "sync"
    wait_for(markers / "file.json", markers / "from-thread.json")


def test_a_failing_deferred_task_is_logged_and_its_siblings_still_run(server: Server, markers: Path) -> None:
    response = httpx.get(f"{server.url}/failing")
    assert response.status_code == 200
    assert response.text == "ok"
    wait_for(markers / "sibling.json")
    server.stop()
    log = server.output()
    assert "deferred task 'doomed' (partial(explode)) failed" in log
    assert "RuntimeError: deferred failure" in log


def test_run_inside_a_request_uses_worker_processes(server: Server) -> None:
    body = httpx.get(f"{server.url}/run").json()
    assert body["results"]["b"] == 4
    assert body["results"]["a"] != body["server"]


def test_other_middleware_still_applies(server: Server) -> None:
    assert httpx.get(f"{server.url}/run").headers["x-wrapped"] == "yes"


def test_sigterm_drains_deferred_work_in_flight(server: Server, markers: Path) -> None:
    # A module-level function behind functools.partial: the workers import tests.apps to run it.
    assert httpx.get(f"{server.url}/defer", params={"seconds": 1.5}).text == "deferred"
    server.stop()
    assert {path.name for path in markers.iterdir()} == {"slow-a.json", "slow-b.json"}
    assert "abandoned" not in server.output()


def test_a_client_that_goes_away_cancels_nothing(server: Server, markers: Path) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"GET /defer?seconds=0.5 HTTP/1.1\r\nHost: test\r\n\r\n")
        assert connection.recv(1024).startswith(b"HTTP/1.1 200")
    wait_for(markers / "slow-a.json", markers / "slow-b.json")


def test_the_example_app_serves_its_dashboard(tmp_path: Path) -> None:
    env = {"EXAMPLE_METRICS_LOG": str(tmp_path / "metrics.log"), "CONCURRENCY_WORKERS": "2"}
    with uvicorn("examples.app:app", tmp_path / "example.log", env=env) as example:
        data = httpx.get(f"{example.url}/api/dashboard", timeout=30).json()
        assert data["counts"]["users"]["count"] == sum(map(ord, "users")) * 7
        assert data["counts"]["primes below 200k"]["count"] == 17984
        assert {count["pid"] for count in data["counts"].values()}.isdisjoint({data["server_pid"]})
        assert "<h1>Dashboard</h1>" in httpx.get(example.url, timeout=30).text
        example.stop()
    metrics = (tmp_path / "metrics.log").read_text().splitlines()
    assert len(metrics) == 4  # two deferred metrics per dashboard request, all drained at shutdown


def leave_during_run(server: Server, markers: Path, name: str) -> int:
    """Start a 5 s run() through a raw connection, hang up once its task runs; return the task's worker pid."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(f"GET /slow-run?name={name}&seconds=5 HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        wait_for(markers / f"{name}.pid")
    return int((markers / f"{name}.pid").read_text())


def test_a_client_that_goes_away_stops_its_run_call(server: Server, markers: Path) -> None:
    pid = leave_during_run(server, markers, "left")
    deadline = time.monotonic() + MARKERS_WAIT
    while not helpers.gone(pid):  # the task's worker was stopped (and replaced), not left to finish
        assert time.monotonic() < deadline, "the run() of a client that went away kept running"
        time.sleep(0.02)
    assert not (markers / "left.json").exists()  # its side effect never happens: its process is gone
    assert httpx.get(f"{server.url}/run").json()["results"]["b"] == 4  # the pool serves on
    server.stop()
    output = server.output()
    assert "Exception in ASGI application" not in output  # the middleware took ClientDisconnected
    # A client leaving is normal: the worker killed for it is logged at INFO, which default logging hides.
    assert "retired" not in output, output


def test_cancel_on_disconnect_can_be_turned_off(markers: Path, tmp_path: Path) -> None:
    env = {"TEST_MARKERS": str(markers)}
    with uvicorn("tests.apps:app_keep_on_disconnect", tmp_path / "server.log", env) as server:
        pid = leave_during_run(server, markers, "kept")
        wait_for(markers / "kept.json")
        assert not helpers.gone(pid)


def test_the_disconnect_watch_leaves_the_body_to_the_app(server: Server) -> None:
    body = "x" * 200_000  # more than the watch ever holds for the app, in several messages
    response = httpx.post(f"{server.url}/run-then-echo", content=body)
    assert response.text == f"4:{body}"
    assert httpx.post(f"{server.url}/run-then-echo", content=b"small").text == "4:small"


def test_without_a_lifespan_sigterm_drains_at_exit_and_names_what_it_drops(markers: Path, tmp_path: Path) -> None:
    env = {"TEST_MARKERS": str(markers)}
    log = tmp_path / "server.log"
    with uvicorn("tests.apps:app_short_drain", log, env, "--lifespan", "off") as server:
        assert httpx.get(f"{server.url}/defer-long").text == "deferred"
        wait_for(markers / "quick.json")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) in (0, -signal.SIGTERM)
        output = server.output()
    abandoned = (
        # /defer-long's second defer() call: its "task 0" is named apart from the first call's
        "deferred task 0 (partial(mark)) of defer() #2 abandoned, stopped unfinished (it may have done part of "
        "its work): the 3.0 s drain timeout ran out"
    )
    assert abandoned in output, output
    assert "Application shutdown complete." not in output  # no lifespan ran: the drain came with the SIGTERM


def shut_down_under_deferrals_from_threads(
    markers: Path, tmp_path: Path
) -> tuple[set[str], set[str], set[str], set[str]]:
    """Four threads defer outside any request (far more than the drain can run) while uvicorn shuts down.

    Returns:
        The keys accepted, the keys that ran, the keys logged as abandoned, those of them logged as never
        started.
    """
    with uvicorn("tests.apps:app_scheduler", tmp_path / "server.log", {"TEST_MARKERS": str(markers)}) as server:
        wait_for(markers / "bg-0-20.json")
        server.stop()
        output = server.output()
    accepted = {key for path in markers.glob("accepted-*.txt") for key in path.read_text().split()}
    ran = {path.stem for path in markers.glob("bg-*.json")}
    abandoned = set(re.findall(r"deferred task '(bg-\d+-\d+)' \(partial\(mark\)\) abandoned", output))
    never_started = set(
        re.findall(r"deferred task '(bg-\d+-\d+)' \(partial\(mark\)\) abandoned, never started", output)
    )
    assert "Traceback" not in output, output
    return accepted, ran, abandoned, never_started


def test_deferrals_from_threads_at_sigterm_run_or_are_named_never_lost(markers: Path, tmp_path: Path) -> None:
    # The lifespan drains; once the drain is over defer() raises ConcurrencyClosed: it never starts a
    # pool that the process's exit would kill. Every accepted task ran or was logged abandoned.
    accepted, ran, abandoned, _ = shut_down_under_deferrals_from_threads(markers, tmp_path)
    assert len(accepted) > 80
    assert accepted - ran - abandoned == set()  # none unaccounted for


def test_no_deferred_task_logged_as_never_started_ran(markers: Path, tmp_path: Path) -> None:
    # When the drain runs out (a loaded machine), most tasks it stops are still queued: "never started" must
    # be true of them. (One stopped while it ran says "stopped unfinished (it may have done part of its
    # work)"; the exact split is checked in tests/test_middleware.py.)
    _, ran, _, never_started = shut_down_under_deferrals_from_threads(markers, tmp_path)
    assert ran & never_started == set()


def test_without_a_lifespan_a_new_connection_after_sigterm_gets_a_503(markers: Path, tmp_path: Path) -> None:
    env = {"TEST_MARKERS": str(markers)}
    with uvicorn("tests.apps:app_short_drain", tmp_path / "server.log", env, "--lifespan", "off") as server:
        assert httpx.get(f"{server.url}/defer-long").text == "deferred"  # holds the drain for its 3 s
        wait_for(markers / "quick.json")
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        late = httpx.get(f"{server.url}/defer-long", timeout=MARKERS_WAIT)  # the server runs on, answering 503
        assert server.process.wait(60) in (0, -signal.SIGTERM)
    assert late.status_code == 503
    assert late.headers["connection"] == "close"


def test_a_server_that_would_kill_before_the_drain_ends_is_named_at_startup(markers: Path, tmp_path: Path) -> None:
    # gunicorn's graceful timeout (3 s) below the facade's drain_timeout (20 s): everything still deferred
    # 3 s into a shutdown would be lost. Say so once, at startup, with the numbers.
    log = tmp_path / "gunicorn.log"
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "gunicorn"),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "--worker-class",
        "uvicorn.workers.UvicornWorker",
        "--graceful-timeout",
        "3",
        "tests.apps:app",
    ]
    env = {**os.environ, "TEST_MARKERS": str(markers)}
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + MARKERS_WAIT
        while "Application startup complete" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/run", timeout=MARKERS_WAIT).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    warnings = [line for line in log.read_text().splitlines() if "graceful timeout" in line]
    assert warnings == [
        "the server's graceful timeout (gunicorn's graceful_timeout = 3.0 s) is below drain_timeout (20.0 s): "
        "deferred work still running when the server kills this process at shutdown is lost; raise the "
        "server's timeout above drain_timeout, or lower drain_timeout"
    ], log.read_text()
