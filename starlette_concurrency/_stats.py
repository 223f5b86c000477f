"""What `Concurrency.stats()` returns, and the counters a driver keeps to fill it in."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass

from ._exceptions import WorkerCrashed
from ._tasks import Outcome

__all__ = ["DURATION_BOUNDS", "Stats", "TaskCounters"]

# Upper bounds (seconds) of the task run-time histogram: Prometheus' default buckets, stretched to a
# minute because a task in a worker is often longer than an HTTP request.
DURATION_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of one driver: its workers, its queue and what its tasks did so far.

    Attributes:
        driver: the driver's name.
        workers: live worker processes (or the slots/threads the driver has).
        busy: workers running a task now.
        queued: tasks accepted and waiting for a worker.
        deferred_pending: deferred tasks accepted and not finished yet (the facade's count).
        tasks_completed: tasks that returned a value.
        tasks_failed: tasks that raised.
        tasks_crashed: tasks whose worker died under them (`WorkerCrashed`).
        tasks_timed_out: tasks stopped by a timeout or a cancellation before they finished.
        worker_restarts: workers replaced after a crash, a timeout, a recycle or an idle exit.
        task_time_p50: median run time of recent tasks, in seconds (``None`` before the first).
        task_time_p99: 99th percentile of the same window, in seconds.
        task_time_buckets: the run-time histogram since the driver started, cumulative as in
            Prometheus: ``(upper bound in seconds, tasks that took at most that long)`` pairs, the
            last bound ``inf``. Empty before the first timed task.
        task_time_sum: the run times of those tasks added up, in seconds.
        journal_pending: entries in the facade's journal not finished yet, every owner's (0 without a
            journal); counted at each write of this facade and recounted every few seconds.
        journal_dead: entries in the journal's dead table (poison: see the journal CLI).
        replayed: journal entries left by earlier runs (or gone processes) this facade has run.
    """

    driver: str
    workers: int = 0
    busy: int = 0
    queued: int = 0
    deferred_pending: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    tasks_crashed: int = 0
    tasks_timed_out: int = 0
    worker_restarts: int = 0
    task_time_p50: float | None = None
    task_time_p99: float | None = None
    task_time_buckets: tuple[tuple[float, int], ...] = ()
    task_time_sum: float = 0.0
    journal_pending: int = 0
    journal_dead: int = 0
    replayed: int = 0


class TaskCounters:
    """The counters behind `Stats`: a few additions and a deque append per task, percentiles on demand."""

    __slots__ = ("buckets", "completed", "crashed", "durations", "failed", "restarts", "seconds", "timed_out")

    def __init__(self, window: int = 1024) -> None:
        self.completed = 0
        self.failed = 0
        self.crashed = 0
        self.timed_out = 0
        self.restarts = 0
        self.durations: deque[float] = deque(maxlen=window)  # the most recent run times, in seconds
        self.buckets = [0] * (len(DURATION_BOUNDS) + 1)  # per bucket, not cumulative; the last one is +Inf
        self.seconds = 0.0  # all recorded run times added up

    def record(self, outcome: Outcome, seconds: float | None = None) -> None:
        """Count how a task ended; `seconds` is its run time where the driver knows it."""
        if outcome.error is None:
            self.completed += 1
        elif isinstance(outcome.error, WorkerCrashed):
            self.crashed += 1
        else:
            self.failed += 1
        if seconds is not None:
            self.durations.append(seconds)
            self.buckets[bisect_left(DURATION_BOUNDS, seconds)] += 1
            self.seconds += seconds

    def snapshot(self, driver: str, *, workers: int = 0, busy: int = 0, queued: int = 0) -> Stats:
        """Freeze the counters, with the live figures the driver passes, into a `Stats`."""
        ordered = sorted(self.durations)
        cumulative = 0
        buckets = []
        for bound, count in zip((*DURATION_BOUNDS, math.inf), self.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return Stats(
            driver=driver,
            workers=workers,
            busy=busy,
            queued=queued,
            tasks_completed=self.completed,
            tasks_failed=self.failed,
            tasks_crashed=self.crashed,
            tasks_timed_out=self.timed_out,
            worker_restarts=self.restarts,
            task_time_p50=_percentile(ordered, 0.50),
            task_time_p99=_percentile(ordered, 0.99),
            # Empty before the first timed task: a fresh driver's snapshot equals `Stats(driver=name)`.
            task_time_buckets=tuple(buckets) if cumulative else (),
            task_time_sum=self.seconds,
        )


def _percentile(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
