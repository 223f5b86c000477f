"""Prometheus metrics and a readiness probe, both read from `Concurrency.stats()`.

```python
from prometheus_client import make_asgi_app
from starlette_concurrency.metrics import health_endpoint, register_metrics

register_metrics(concurrency)                  # the default registry; collected on each scrape
app.mount("/metrics", make_asgi_app())
app.add_route("/healthz", health_endpoint(concurrency))
```

`register_metrics` needs the optional extra ``starlette-concurrency[prometheus]``; it imports
``prometheus_client`` only when called, and `health` / `health_endpoint` do not need it at all.
Nothing here costs anything per task: the drivers keep counters, and a scrape or a probe reads them.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._api import Concurrency
from ._stats import Stats

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = ["ConcurrencyCollector", "health", "health_endpoint", "register_metrics"]

PREFIX = "starlette_concurrency"


def _all_stats(concurrency: Concurrency) -> list[Stats]:
    snapshots = [concurrency.driver(name).stats() for name in concurrency.driver_names()]
    # deferred_pending is the facade's count across all its drivers: report it once, on the default
    # driver, so that summing the metric over drivers does not count it twice.
    return [snapshots[0], *(_without_deferred(stats) for stats in snapshots[1:])]


def _without_deferred(stats: Stats) -> Stats:
    return replace(stats, deferred_pending=0)


class ConcurrencyCollector:
    """Expose a facade's `stats()` to Prometheus, read afresh on every scrape.

    Metrics (every one labelled ``driver``, one series per driver the facade has created):
    ``starlette_concurrency_workers``, ``_busy_workers``, ``_queued_tasks``, ``_deferred_pending``
    (gauges), ``_tasks_total{outcome="completed|failed|crashed|timed_out"}``,
    ``_worker_restarts_total`` (counters), ``_task_duration_seconds`` (a histogram since the driver
    started) and ``_task_duration_recent_seconds{quantile="0.5|0.99"}`` (a gauge of the percentiles
    over the driver's window of recent tasks).

    With a journal (``Concurrency(journal=...)``), also, for the facade (no ``driver`` label):
    ``starlette_concurrency_journal_pending`` and ``_journal_dead`` (gauges: entries not finished, and
    poison entries in the dead table) and ``_replayed_total`` (a counter of entries this process replayed).

    Args:
        concurrency: the facade to observe.
    """

    def __init__(self, concurrency: Concurrency) -> None:
        if not isinstance(concurrency, Concurrency):
            raise TypeError(f"concurrency must be a Concurrency, not {type(concurrency).__name__}")
        self.concurrency = concurrency

    def describe(self) -> list[Metric]:
        """Return the metric families without samples, so that registering costs no scrape."""
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of every driver's current `stats()`."""
        yield from self._families(_all_stats(self.concurrency))

    def _families(self, snapshots: list[Stats]) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        gauges = {
            "workers": ("Live worker processes (or slots) of the driver.", "workers"),
            "busy_workers": ("Workers running a task now.", "busy"),
            "queued_tasks": ("Tasks accepted and waiting for a worker.", "queued"),
            "deferred_pending": ("Deferred tasks accepted and not finished (all drivers of the facade).",
                                 "deferred_pending"),
        }  # fmt: skip
        for name, (documentation, field) in gauges.items():
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=["driver"])
            for stats in snapshots:
                gauge.add_metric([stats.driver], getattr(stats, field))
            yield gauge

        tasks = CounterMetricFamily(f"{PREFIX}_tasks", "Tasks finished, by outcome.", labels=["driver", "outcome"])
        restarts = CounterMetricFamily(
            f"{PREFIX}_worker_restarts", "Workers replaced (crash, timeout, recycle, idle exit).", labels=["driver"]
        )
        recent = GaugeMetricFamily(
            f"{PREFIX}_task_duration_recent_seconds",
            "Run-time percentiles of the driver's recent tasks (a window of the last ones).",
            labels=["driver", "quantile"],
        )
        durations = HistogramMetricFamily(
            f"{PREFIX}_task_duration_seconds", "Run time of tasks since the driver started.", labels=["driver"]
        )
        for stats in snapshots:
            for outcome, count in (
                ("completed", stats.tasks_completed),
                ("failed", stats.tasks_failed),
                ("crashed", stats.tasks_crashed),
                ("timed_out", stats.tasks_timed_out),
            ):
                tasks.add_metric([stats.driver, outcome], count)
            restarts.add_metric([stats.driver], stats.worker_restarts)
            for quantile, value in (("0.5", stats.task_time_p50), ("0.99", stats.task_time_p99)):
                recent.add_metric([stats.driver, quantile], math.nan if value is None else value)
            if stats.task_time_buckets:
                buckets = [("+Inf" if math.isinf(le) else repr(le), count) for le, count in stats.task_time_buckets]
                durations.add_metric([stats.driver], buckets, stats.task_time_sum)
        yield from (tasks, restarts, recent, durations)
        if self.concurrency.settings.journal is not None:
            yield from _journal_families(snapshots[0] if snapshots else None)


def _journal_families(stats: Stats | None) -> Iterator[Metric]:
    """The facade's journal figures (the same on every driver's snapshot: read from the first)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    pending = GaugeMetricFamily(f"{PREFIX}_journal_pending", "Journal entries not finished yet (every process's).")
    dead = GaugeMetricFamily(f"{PREFIX}_journal_dead", "Journal entries in the dead table (poison), to inspect.")
    replayed = CounterMetricFamily(
        f"{PREFIX}_replayed", "Journal entries left by earlier runs or gone processes that this process ran."
    )
    if stats is not None:
        pending.add_metric([], stats.journal_pending)
        dead.add_metric([], stats.journal_dead)
        replayed.add_metric([], stats.replayed)
    yield from (pending, dead, replayed)


def register_metrics(concurrency: Concurrency, registry: CollectorRegistry | None = None) -> ConcurrencyCollector:
    """Register a collector of the facade's stats with a Prometheus registry.

    Args:
        concurrency: the facade to observe (all of its drivers are reported).
        registry: where to register; default ``prometheus_client.REGISTRY``.

    Returns:
        The registered `ConcurrencyCollector` (``registry.unregister(collector)`` removes it).

    Raises:
        ImportError: ``prometheus_client`` is not installed (``pip install starlette-concurrency[prometheus]``).
        TypeError: `concurrency` is not a `Concurrency`, or `registry` not a ``CollectorRegistry``.
        ValueError: the registry already has these metrics (``register_metrics`` was called twice).
    """
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            "register_metrics() needs prometheus_client: pip install 'starlette-concurrency[prometheus]'"
        ) from exc
    if registry is not None and not isinstance(registry, prometheus_client.CollectorRegistry):
        raise TypeError(f"registry must be a prometheus_client CollectorRegistry, not {type(registry).__name__}")
    collector = ConcurrencyCollector(concurrency)
    (prometheus_client.REGISTRY if registry is None else registry).register(collector)
    return collector


@dataclass
class _Progress:
    finished: int = -1  # tasks finished at the last look
    since: float = 0.0  # when that count last moved, or the queue was last empty (time.monotonic)


# What each probed facade's drivers looked like at the previous probe: "stuck" is about time.
_progress: weakref.WeakKeyDictionary[Concurrency, dict[str, _Progress]] = weakref.WeakKeyDictionary()


def _check_health_arguments(concurrency: object, stuck_after: object) -> None:
    if not isinstance(concurrency, Concurrency):
        raise TypeError(f"concurrency must be a Concurrency, not {type(concurrency).__name__}")
    if isinstance(stuck_after, bool) or not isinstance(stuck_after, int | float) or not stuck_after > 0:
        raise ValueError(f"stuck_after must be a positive number of seconds, not {stuck_after!r}")


def health(concurrency: Concurrency, *, stuck_after: float = 60.0) -> tuple[bool, dict[str, Any]]:
    """Tell whether the facade's pools can take work, for a readiness probe.

    A driver is unhealthy when its queue is stuck: tasks are queued and none of its tasks finished
    (completed, failed, crashed or timed out) for `stuck_after` seconds, as seen by successive calls of
    this function. That covers a pool whose workers are all gone or all hung. A pool with no worker
    and nothing queued is healthy: idle workers may exit (``idle_timeout``) and start on demand.

    Args:
        concurrency: the facade to check (all of its drivers).
        stuck_after: seconds of queued work with no task finishing before the queue counts as stuck.

    Returns:
        ``(ok, detail)``: `detail` is JSON-ready, ``{"ok": ..., "drivers": {name: {"workers", "busy",
        "queued", "deferred_pending", "stalled_seconds", "problems": [...]}}}``.

    Raises:
        TypeError: `concurrency` is not a `Concurrency`.
        ValueError: `stuck_after` is not a positive number.
    """
    _check_health_arguments(concurrency, stuck_after)
    now = time.monotonic()
    progress = _progress.setdefault(concurrency, {})
    drivers: dict[str, Any] = {}
    for stats in _all_stats(concurrency):
        finished = stats.tasks_completed + stats.tasks_failed + stats.tasks_crashed + stats.tasks_timed_out
        seen = progress.setdefault(stats.driver, _Progress())
        if finished != seen.finished or stats.queued == 0:
            seen.finished, seen.since = finished, now
        stalled = now - seen.since
        problems = []
        if stats.queued and stalled >= stuck_after:
            problems.append(
                f"{stats.queued} task(s) queued and none finished for {stalled:.0f} s "
                f"({stats.workers} worker(s), {stats.busy} busy)"
            )
        drivers[stats.driver] = {
            "workers": stats.workers,
            "busy": stats.busy,
            "queued": stats.queued,
            "deferred_pending": stats.deferred_pending,
            "stalled_seconds": round(stalled, 3) if stats.queued else 0.0,
            "problems": problems,
        }
    ok = not any(detail["problems"] for detail in drivers.values())
    return ok, {"ok": ok, "drivers": drivers}


def health_endpoint(concurrency: Concurrency, *, stuck_after: float = 60.0) -> Callable[[Request], Awaitable[Response]]:
    """Return a Starlette endpoint answering 200 when `health` is ok, 503 otherwise, with its detail as JSON.

    Use it as ``Route("/healthz", health_endpoint(concurrency))`` and point the readiness probe at it.

    Args:
        concurrency: the facade to check.
        stuck_after: see `health`.

    Raises:
        TypeError: `concurrency` is not a `Concurrency`.
        ValueError: `stuck_after` is not a positive number.
    """
    _check_health_arguments(concurrency, stuck_after)  # at wiring time, not on the first probe

    async def endpoint(request: Request) -> Response:
        ok, detail = health(concurrency, stuck_after=stuck_after)
        return JSONResponse(detail, status_code=200 if ok else 503)

    return endpoint
