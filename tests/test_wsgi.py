"""ConcurrencyWSGIMiddleware: in-process with Flask's test client, and under a real gunicorn serving
examples/flask_app.py (sync workers, gthread workers, --preload with two workers)."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from flask import Flask

from starlette_concurrency import Concurrency, ConcurrencyWSGIMiddleware

from . import helpers
from .asgi import ROOT, free_port

WAIT = 60.0  # seconds: a bound against hangs, not a speed expectation


def touch(path: Path) -> None:
    path.write_text("ran")


def test_the_batch_starts_at_close_and_follows_the_status(tmp_path: Path) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    app = Flask(__name__)

    @app.get("/<int:code>")
    def status(code: int) -> tuple[str, int]:
        concurrency.defer(functools.partial(touch, tmp_path / f"normal-{code}"))
        concurrency.defer(functools.partial(touch, tmp_path / f"always-{code}"), always=True)
        return "ok", code

    @app.get("/error")
    def error() -> str:
        concurrency.defer(functools.partial(touch, tmp_path / "normal-error"))
        concurrency.defer(functools.partial(touch, tmp_path / "always-error"), always=True)
        raise RuntimeError("the view failed")

    app.wsgi_app = ConcurrencyWSGIMiddleware(app.wsgi_app, concurrency)  # type: ignore[method-assign]
    http = app.test_client()
    for path, code in [("/200", 200), ("/404", 404), ("/error", 500)]:
        response = http.get(path, buffered=False)
        assert response.status_code == code
        assert response.data  # the server sends the body...
        response.close()  # ...then closes the iterable (PEP 3333): the batch starts here
    concurrency.wait_deferred_blocking(timeout=WAIT)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "always-200",
        "always-404",
        "always-error",
        "normal-200",
    ]
    concurrency.close()


@contextmanager
def gunicorn(tmp_path: Path, *options: str) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """Serve examples.flask_app with gunicorn; yield its URL, its process and the metrics log."""
    port = free_port()
    metrics = tmp_path / "metrics.log"
    log = tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "EXAMPLE_METRICS_LOG": str(metrics),
        "CONCURRENCY_WORKERS": "2",
        "CONCURRENCY_DRAIN_TIMEOUT": "10",  # below gunicorn's --graceful-timeout
    }
    gunicorn_bin = str(Path(sys.executable).parent / "gunicorn")
    command = [gunicorn_bin, "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "30", *options]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*command, "examples.flask_app:app"], cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert process.poll() is None, log.read_text()
            try:
                httpx.get(f"{url}/defer/warm-up", timeout=WAIT)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield url, process, metrics
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(WAIT)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hang, reported by the assertion below
            process.kill()
            process.wait()
            raise AssertionError(f"gunicorn did not stop on SIGTERM:\n{log.read_text()}") from None


def reported(metrics: Path) -> list[str]:
    if not metrics.exists():
        return []
    return [json.loads(line)["metric"] for line in metrics.read_text().splitlines()]


def wait_for_metric(metrics: Path, name: str) -> None:
    deadline = time.monotonic() + WAIT
    while name not in reported(metrics):
        assert time.monotonic() < deadline, f"{name} never reported"
        time.sleep(0.02)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(WAIT) == 0


def all_gone(pids: set[int]) -> bool:
    return all(not psutil.pid_exists(pid) or helpers.gone(pid) for pid in pids)


def test_gunicorn_sync_workers(tmp_path: Path) -> None:
    with gunicorn(tmp_path, "--workers", "1") as (url, process, metrics):
        data = httpx.get(url, timeout=WAIT).json()
        assert data["counts"]["users"]["count"] == sum(map(ord, "users")) * 7
        assert data["counts"]["primes below 50k"]["count"] == 5133
        assert data["server_pid"] not in {count["pid"] for count in data["counts"].values()}
        wait_for_metric(metrics, "flask.dashboard")  # deferred, after the response
        assert httpx.get(f"{url}/defer/skipped", params={"status": 404, "always": "kept"}).status_code == 404
        wait_for_metric(metrics, "kept")
        pool = set(httpx.get(f"{url}/pool", timeout=WAIT).json()["task_pids"])
        assert httpx.get(f"{url}/defer/drained", params={"delay": 1}).status_code == 200
        stop(process)  # SIGTERM: the server's worker drains its deferred work before it exits
    assert "drained" in reported(metrics)
    assert "skipped" not in reported(metrics)
    assert len(pool) <= 2
    deadline = time.monotonic() + WAIT
    while not all_gone(pool):  # no worker process outlives the server
        assert time.monotonic() < deadline, f"workers left behind: {pool}"
        time.sleep(0.05)


def test_gunicorn_gthread_load_loses_nothing(tmp_path: Path) -> None:
    requests, threads = 200, 8
    failures: list[Any] = []
    with gunicorn(tmp_path, "--workers", "1", "--threads", "4", "--worker-class", "gthread") as (url, process, metrics):

        def client(n: int) -> None:
            with httpx.Client(timeout=WAIT) as http:
                for i in range(n, requests, threads):
                    response = http.get(f"{url}/defer/load-{i}")
                    if response.status_code != 200:
                        failures.append(response.status_code)  # pragma: no cover - reported below
                    if i % 20 == 0:
                        pool = http.get(f"{url}/pool")
                        if pool.status_code != 200 or len(set(pool.json()["task_pids"])) > 2:
                            failures.append(pool.text)  # pragma: no cover - reported below

        workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        stop(process)
    lost = {f"load-{i}" for i in range(requests)} - set(reported(metrics))
    print(f"gunicorn gthread load: {requests} requests, {len(failures)} failures, {len(lost)} deferred tasks lost")
    assert failures == []
    assert lost == set()


def test_gunicorn_preload_gives_each_server_process_its_own_pool(tmp_path: Path) -> None:
    with gunicorn(tmp_path, "--workers", "2", "--preload") as (url, process, metrics):
        pools: dict[int, set[int]] = {}
        deadline = time.monotonic() + WAIT
        while len(pools) < 2:  # until both server processes have answered
            assert time.monotonic() < deadline, f"only {list(pools)} answered"
            with httpx.Client(timeout=WAIT) as http:  # a new connection: either process may take it
                body = http.get(f"{url}/pool").json()
            pools.setdefault(body["server_pid"], set()).update(body["task_pids"])
        first, second = pools.values()
        assert first.isdisjoint(second)  # a pool created before the fork is never shared
        assert all(len(pids) <= 2 for pids in pools.values())
        assert all(psutil.Process(pid).ppid() == server for server, pids in pools.items() for pid in pids)
        assert httpx.get(f"{url}/defer/after-fork").status_code == 200
        stop(process)
    assert "after-fork" in reported(metrics)


@contextmanager
def waitress(tmp_path: Path, drain_timeout: float) -> Iterator[tuple[str, subprocess.Popen[bytes], Path, Path]]:
    """Serve examples.flask_app with waitress (it has no SIGTERM handler of its own); yield URL, process, logs."""
    port = free_port()
    metrics, log = tmp_path / "metrics.log", tmp_path / "waitress.log"
    env = {
        **os.environ,
        "EXAMPLE_METRICS_LOG": str(metrics),
        "CONCURRENCY_WORKERS": "2",
        "CONCURRENCY_DRAIN_TIMEOUT": str(drain_timeout),
    }
    serve = str(Path(sys.executable).parent / "waitress-serve")
    with log.open("wb") as output:
        process = subprocess.Popen(
            [serve, f"--listen=127.0.0.1:{port}", "--threads=4", "examples.flask_app:app"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert process.poll() is None, log.read_text()
            try:
                httpx.get(f"{url}/defer/warm-up", timeout=WAIT)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield url, process, metrics, log
    finally:
        if process.poll() is None:  # pragma: no cover - a test that failed half-way
            process.kill()
            process.wait()


def test_waitress_sigterm_drains_or_names_every_deferred_task(tmp_path: Path) -> None:
    # waitress calls the app from its own threads and has no SIGTERM handler: the default action would kill
    # the process before anything drains (issue 21: 27 of 200 ran, nothing logged).
    short, long = 30, 2
    with waitress(tmp_path, drain_timeout=5) as (url, process, metrics, log):
        with httpx.Client(timeout=WAIT) as http:
            for i in range(short):
                assert http.get(f"{url}/defer/short-{i}", params={"delay": 0.01}).status_code == 200
            for i in range(long):
                assert http.get(f"{url}/defer/long-{i}", params={"delay": 600}).status_code == 200
        process.send_signal(signal.SIGTERM)
        # While it drains (the long tasks hold it for the whole drain timeout), new requests are turned away
        # with a 503 that a load balancer retries elsewhere, and defer nothing.
        time.sleep(0.5)
        late = httpx.get(f"{url}/defer/late", timeout=WAIT)
        assert late.status_code == 503
        code = process.wait(WAIT)
    output = log.read_text()
    ran = set(reported(metrics))
    abandoned = [line for line in output.splitlines() if "abandoned" in line]
    assert {f"short-{i}" for i in range(short)} <= ran, output
    assert not any(name.startswith("long-") for name in ran)
    assert "late" not in ran
    assert len(abandoned) == long, output  # each long task named once, none of the short ones
    assert all("the 5.0 s drain timeout ran out" in line for line in abandoned), output
    assert code == -signal.SIGTERM  # then it ends as SIGTERM would have ended it


def test_defer_in_a_flask_view_no_middleware_wraps_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    concurrency = Concurrency("sync", env_file=None)
    flask_app = Flask(__name__)
    ran: list[str] = []

    @flask_app.post("/orders")
    def orders() -> str:
        concurrency.defer(lambda: ran.append("deferred"))
        return "ok"

    with concurrency, caplog.at_level(logging.WARNING, logger="starlette_concurrency"):
        client = flask_app.test_client()
        assert client.post("/orders").status_code == 200
        assert client.post("/orders").status_code == 200
        concurrency.run_blocking(lambda: None)
    warnings = [r.getMessage() for r in caplog.records if "no ConcurrencyMiddleware" in r.getMessage()]
    assert len(warnings) == 1
    assert "while serving POST /orders" in warnings[0]
    assert ran == ["deferred", "deferred"]
