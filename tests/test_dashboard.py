"""The example's live dashboard in a real browser (Debian's chromium, driven by playwright), served by uvicorn.

`scripts/install` installs chromium with apt-get. Without it the test skips locally and fails under
CI=true: a dashboard nobody has looked at in a browser is not tested.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .asgi import Server, example_server

CHROMIUM = "/usr/bin/chromium"
# No sandbox: the tests run as root in a container; nothing of the browser's own reaches the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium() -> str:
    if os.path.exists(CHROMIUM) and shutil.which(CHROMIUM):
        return CHROMIUM
    message = f"{CHROMIUM} is missing: scripts/install installs it (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def example(tmp_path: Path) -> Iterator[Server]:
    with example_server(tmp_path) as server:
        yield server


def test_the_dashboard_shows_the_pool_live_and_moves_when_work_starts(example: Server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    executable = chromium()
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.on("request", lambda request: requests.append(request.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.goto(example.url)

            # Live numbers arrive, and keep arriving.
            page.wait_for_function("Number(document.getElementById('polls').textContent) >= 2")
            assert page.text_content("#driver") == "process"
            assert page.text_content("#health") == "ok"
            for field in ("workers", "busy", "queued", "tasks_completed", "worker_restarts"):
                assert (page.text_content(f"#{field}") or "").isdigit(), field
            page.wait_for_function("document.getElementById('deferred_pending').textContent === '0'")
            # The page itself ran four counts: the workers' table agrees with the counters (issue 24).
            assert int(page.text_content("#tasks_completed") or "0") >= 4
            activity = page.text_content("#activity") or ""
            assert "no task has run yet" not in activity
            assert "task(s) finished" in activity, activity

            # Deferred work: pending while it runs, each worker shown with the task it holds; then done.
            page.click("button[data-work=defer]")
            page.wait_for_function("Number(document.getElementById('deferred_pending').textContent) === 6")
            page.wait_for_function("document.getElementById('activity').textContent.includes('running task')")
            assert "(nap, deferred)" in (page.text_content("#activity") or "")
            # Six deferred naps on two workers: one stays free for run(), and the page says why (issue 24).
            page.wait_for_function(
                "document.getElementById('waiting').textContent"
                ".includes('deferred work uses at most 1 of the 2 workers')"
            )
            page.screenshot(path=str(tmp_path / "deferred-waiting.png"))  # (kept under the test's tmp_path)
            page.wait_for_function("document.getElementById('deferred_pending').textContent === '0'")
            page.wait_for_function("document.getElementById('activity').textContent.includes('idle (last: task')")

            # Work that fails and work that crashes its worker: the buttons report what happened.
            page.click("button[data-work=fail]")
            page.wait_for_function("document.getElementById('message').textContent.includes('failed as planned')")
            page.click("button[data-work=crash]")
            page.wait_for_function("document.getElementById('message').textContent.includes('WorkerCrashed')")
            page.click("button[data-work=run]")
            page.wait_for_function("document.getElementById('message').textContent.startsWith('8 counts')")

            # The charts are drawn (a canvas with something on it), and the page still polls.
            polls = int(page.text_content("#polls") or "0")
            page.wait_for_function(f"Number(document.getElementById('polls').textContent) > {polls}")
            for canvas in ("throughput", "latency"):
                drawn = page.evaluate(
                    "(id) => { const c = document.getElementById(id);"
                    " return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v) => v !== 0); }",
                    canvas,
                )
                assert drawn, canvas
        finally:
            browser.close()
    assert errors == []
    assert requests, "the page made no request"
    assert all(url.startswith(example.url) for url in requests), [u for u in requests if not u.startswith(example.url)]


def test_the_example_serves_health_and_prometheus_over_http(example: Server) -> None:
    health = httpx.get(f"{example.url}/healthz", timeout=30)
    assert health.status_code == 200
    assert health.json()["ok"] is True
    assert health.json()["drivers"]["process"]["queued"] == 0
    scrape = httpx.get(f"{example.url}/prometheus/", timeout=30)
    assert scrape.status_code == 200
    names = {family.name for family in text_string_to_metric_families(scrape.text)}
    assert {
        "starlette_concurrency_workers",
        "starlette_concurrency_busy_workers",
        "starlette_concurrency_queued_tasks",
        "starlette_concurrency_deferred_pending",
        "starlette_concurrency_tasks",
        "starlette_concurrency_worker_restarts",
        "starlette_concurrency_task_duration_seconds",
        "starlette_concurrency_task_duration_recent_seconds",
    } <= names
    assert 'starlette_concurrency_tasks_total{driver="process",outcome="completed"}' in scrape.text
