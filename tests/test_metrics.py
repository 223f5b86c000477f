"""`starlette_concurrency.metrics`: the Prometheus exposition of `stats()`, and the readiness probe."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Route

from starlette_concurrency import Concurrency, Driver, Outcome, Stats, Task
from starlette_concurrency._stats import TaskCounters
from starlette_concurrency.metrics import ConcurrencyCollector, health, health_endpoint, register_metrics

from .asgi import client

pytestmark = pytest.mark.anyio


class Scripted(Driver):
    """A custom driver (the public extension point) whose stats the test sets: every field, exactly."""

    name = "scripted"

    def __init__(self) -> None:
        self.current = Stats(driver=self.name)

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        for index, task in enumerate(tasks):
            outcomes[index] = Outcome(value=task.fn())

    def stats(self) -> Stats:
        return self.current


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse the text exposition, as Prometheus does: sample name and labels → value."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def families(registry: CollectorRegistry) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(generate_latest(registry).decode())}


def labels(**pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset(pairs.items())


def test_the_exposition_has_every_metric_with_its_type() -> None:
    registry = CollectorRegistry()
    register_metrics(Concurrency(driver="sync", env_file=None), registry)
    assert families(registry) == {
        "starlette_concurrency_workers": "gauge",
        "starlette_concurrency_busy_workers": "gauge",
        "starlette_concurrency_queued_tasks": "gauge",
        "starlette_concurrency_deferred_pending": "gauge",
        "starlette_concurrency_tasks": "counter",
        "starlette_concurrency_worker_restarts": "counter",
        "starlette_concurrency_task_duration_recent_seconds": "gauge",
        "starlette_concurrency_task_duration_seconds": "histogram",
    }


def test_every_field_of_stats_reaches_its_metric() -> None:
    driver = Scripted()
    counters = TaskCounters()
    for seconds in (0.002, 0.2, 0.2, 7.0):
        counters.record(Outcome(), seconds)
    counters.record(Outcome(error=ValueError()), 0.03)
    counters.timed_out = 4
    counters.restarts = 5
    driver.current = counters.snapshot("scripted", workers=8, busy=3, queued=11)
    registry = CollectorRegistry()
    register_metrics(Concurrency(driver=driver, env_file=None), registry)
    samples = scrape(registry)
    scripted = labels(driver="scripted")
    assert samples[("starlette_concurrency_workers", scripted)] == 8
    assert samples[("starlette_concurrency_busy_workers", scripted)] == 3
    assert samples[("starlette_concurrency_queued_tasks", scripted)] == 11
    assert samples[("starlette_concurrency_deferred_pending", scripted)] == 0
    for outcome, count in {"completed": 4, "failed": 1, "crashed": 0, "timed_out": 4}.items():
        assert samples[("starlette_concurrency_tasks_total", labels(driver="scripted", outcome=outcome))] == count
    assert samples[("starlette_concurrency_worker_restarts_total", scripted)] == 5
    assert (
        samples[("starlette_concurrency_task_duration_recent_seconds", labels(driver="scripted", quantile="0.5"))]
        == 0.2
    )
    assert (
        samples[("starlette_concurrency_task_duration_recent_seconds", labels(driver="scripted", quantile="0.99"))]
        == 7.0
    )
    bucket = "starlette_concurrency_task_duration_seconds_bucket"
    assert samples[(bucket, labels(driver="scripted", le="0.005"))] == 1
    assert samples[(bucket, labels(driver="scripted", le="0.05"))] == 2
    assert samples[(bucket, labels(driver="scripted", le="0.25"))] == 4
    assert samples[(bucket, labels(driver="scripted", le="10.0"))] == 5
    assert samples[(bucket, labels(driver="scripted", le="+Inf"))] == 5
    assert samples[("starlette_concurrency_task_duration_seconds_count", scripted)] == 5
    assert samples[("starlette_concurrency_task_duration_seconds_sum", scripted)] == pytest.approx(7.432)


def test_the_percentiles_are_nan_before_the_first_task_and_a_driver_without_counters_has_no_histogram() -> None:
    registry = CollectorRegistry()
    register_metrics(Concurrency(driver=Scripted(), env_file=None), registry)
    samples = scrape(registry)
    assert math.isnan(
        samples[("starlette_concurrency_task_duration_recent_seconds", labels(driver="scripted", quantile="0.5"))]
    )
    assert not any(name.startswith("starlette_concurrency_task_duration_seconds") for name, _ in samples)


async def test_metrics_are_read_on_scrape_for_every_driver_of_the_facade() -> None:
    registry = CollectorRegistry()
    scripted = Scripted()
    concurrency = Concurrency(driver=scripted, env_file=None)
    register_metrics(concurrency, registry)
    assert {dict(key)["driver"] for name, key in scrape(registry) if name == "starlette_concurrency_workers"} == {
        "scripted"
    }
    concurrency.driver("sync")
    scripted.current = Stats(driver="scripted", busy=2)
    async with concurrency:
        concurrency.defer([lambda: None, lambda: None])  # the scripted driver runs them at the next checkpoint
        samples = scrape(registry)
    assert samples[("starlette_concurrency_busy_workers", labels(driver="scripted"))] == 2
    assert samples[("starlette_concurrency_busy_workers", labels(driver="sync"))] == 0
    # The facade's deferred count covers all its drivers: it is reported once, on the default driver.
    assert samples[("starlette_concurrency_deferred_pending", labels(driver="scripted"))] == 2
    assert samples[("starlette_concurrency_deferred_pending", labels(driver="sync"))] == 0
    assert scrape(registry)[("starlette_concurrency_deferred_pending", labels(driver="scripted"))] == 0


def test_registering_twice_or_something_else_is_a_clear_error() -> None:
    registry = CollectorRegistry()
    concurrency = Concurrency(driver="sync", env_file=None)
    collector = register_metrics(concurrency, registry)
    assert isinstance(collector, ConcurrencyCollector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register_metrics(concurrency, registry)
    registry.unregister(collector)
    register_metrics(concurrency, registry)
    with pytest.raises(TypeError, match="concurrency must be a Concurrency, not str"):
        register_metrics("sync", registry)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="registry must be a prometheus_client CollectorRegistry, not dict"):
        register_metrics(concurrency, {})  # type: ignore[arg-type]


def test_the_package_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, starlette_concurrency, starlette_concurrency.metrics\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
        "sys.modules['prometheus_client'] = None  # as if it were not installed\n"
        "from starlette_concurrency.metrics import health, register_metrics\n"
        "c = starlette_concurrency.Concurrency(driver='sync', env_file=None)\n"
        "assert health(c)[0]\n"
        "try:\n"
        "    register_metrics(c)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "pip install 'starlette-concurrency[prometheus]'" in result.stdout


# Health ----------------------------------------------------------------------------------------------


async def test_health_is_ok_while_tasks_finish_and_not_when_the_queue_is_stuck() -> None:
    driver = Scripted()
    concurrency = Concurrency(driver=driver, env_file=None)
    assert health(concurrency, stuck_after=0.05) == (
        True,
        {
            "ok": True,
            "drivers": {
                "scripted": {"workers": 0, "busy": 0, "queued": 0, "deferred_pending": 0, "stalled_seconds": 0.0,
                             "problems": []},
            },
        },
    )  # fmt: skip
    # No worker and nothing queued is fine (idle workers may exit); queued work that moves is fine.
    driver.current = Stats(driver="scripted", workers=2, busy=2, queued=5, tasks_completed=10)
    assert health(concurrency, stuck_after=0.05)[0]
    await anyio.sleep(0.1)
    driver.current = Stats(driver="scripted", workers=2, busy=2, queued=5, tasks_completed=11)
    assert health(concurrency, stuck_after=0.05)[0]
    # Queued work with nothing finishing for longer than stuck_after: stuck.
    await anyio.sleep(0.1)
    ok, detail = health(concurrency, stuck_after=0.05)
    assert not ok
    assert detail["ok"] is False
    [problem] = detail["drivers"]["scripted"]["problems"]
    assert problem.startswith("5 task(s) queued and none finished for ")
    assert problem.endswith(" s (2 worker(s), 2 busy)")
    assert detail["drivers"]["scripted"]["stalled_seconds"] >= 0.1
    # A failure, a crash or a timeout is progress too; so is an empty queue.
    driver.current = Stats(driver="scripted", workers=2, busy=2, queued=5, tasks_completed=11, tasks_crashed=1)
    assert health(concurrency, stuck_after=0.05)[0]
    await anyio.sleep(0.1)
    assert not health(concurrency, stuck_after=0.05)[0]
    driver.current = Stats(driver="scripted", workers=0, queued=0, tasks_completed=11, tasks_crashed=1)
    assert health(concurrency, stuck_after=0.05)[0]


def test_health_rejects_something_else_than_a_facade() -> None:
    with pytest.raises(TypeError, match="concurrency must be a Concurrency, not str"):
        health("process")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="concurrency must be a Concurrency, not NoneType"):
        health_endpoint(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("stuck_after", [0, -1, math.nan, "60", True])
def test_health_rejects_a_bad_stuck_after(stuck_after: object) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    with pytest.raises(ValueError, match="stuck_after must be a positive number of seconds"):
        health(concurrency, stuck_after=stuck_after)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stuck_after must be a positive number of seconds"):
        health_endpoint(concurrency, stuck_after=stuck_after)  # type: ignore[arg-type]


async def test_the_health_endpoint_answers_200_or_503() -> None:
    # The scrape over HTTP (prometheus_client's ASGI app) is tested under uvicorn in test_dashboard.py.
    driver = Scripted()
    concurrency = Concurrency(driver=driver, env_file=None)
    app = Starlette(routes=[Route("/healthz", health_endpoint(concurrency, stuck_after=0.05))])
    async with client(app) as http:
        response = await http.get("/healthz")
        assert response.status_code == 200
        assert response.json()["ok"] is True
        driver.current = Stats(driver="scripted", workers=1, busy=1, queued=3)
        assert (await http.get("/healthz")).status_code == 200
        await anyio.sleep(0.1)
        response = await http.get("/healthz")
        assert response.status_code == 503
        assert response.json()["drivers"]["scripted"]["queued"] == 3
        assert response.headers["content-type"] == "application/json"
