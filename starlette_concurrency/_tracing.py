"""OpenTelemetry spans for tasks, and the trace context carried into the worker that runs them.

```
 caller (run(), defer())                               where the task runs (a worker, a fork, the loop)
 ───────────────────────                               ────────────────────────────────────────────────
 start(): a span per task, child of the caller's    call_in_trace(carrier, fn): the carrier's context
   current span ("concurrency.run task 0 (f)"),  ──▶   attached around fn, so that the spans the
   its W3C traceparent in a carrier dict               task's instrumented code makes are children
 end(): when the call is over, each span gets           of the task's span (exported by the worker's
   its outcome (an exception recorded) and ends         own SDK: see the README's "Tracing")
```

Only when `opentelemetry-api` is installed and a span is active where the call is made (a
request's span, made by an instrumentation); otherwise `start` returns None after one check, and
nothing else is done. `call_in_trace` lives in `_wire/context.py`, which a worker imports without
the package root; a worker without OpenTelemetry just calls the task.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._tasks import NOT_STARTED, Outcome, Task
from ._wire.context import call_in_trace

if TYPE_CHECKING:
    from opentelemetry.trace import Span

try:
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - the [otel] extra is not installed: no spans, at no cost
    trace = None  # type: ignore[assignment]

__all__ = ["TaskTrace", "call_in_trace", "end", "start"]


@dataclass(eq=False)
class TaskTrace:
    """A task's span and the carrier of its trace context (what a worker attaches around the task)."""

    span: Span
    carrier: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    started: float = field(default_factory=time.monotonic)
    worker_pid: int | None = None  # told by the process and fork drivers when the task answers
    run_time: float | None = None

    def ran(self, pid: int, seconds: float) -> None:
        """The driver's word: which process ran the task, and for how long (the rest was waiting)."""
        self.worker_pid, self.run_time = pid, seconds

    def wrap(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """`fn`, to be called with this span as the current one."""
        return functools.partial(call_in_trace, self.carrier, fn)


def start(tasks: list[Task], kind: str, driver: str) -> list[Task] | None:
    """If a span is active here: start a span for each task, its child; return the tasks carrying them.

    `kind`: ``run`` or ``defer`` (the spans' names: ``concurrency.run task 0 (charge)``).

    Returns:
        The tasks, each with its `TaskTrace`; None when OpenTelemetry is not installed or no span is active.
    """
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    tracer = trace.get_tracer("starlette_concurrency")
    traced = []
    for task in tasks:
        attributes: dict[str, Any] = {"concurrency.driver": driver, "concurrency.task": task.label}
        if isinstance(task.key, str | int):
            attributes["concurrency.task_key"] = task.key
        span = tracer.start_span(f"concurrency.{kind} {task.label}", attributes=attributes)
        task_trace = TaskTrace(span)
        propagate.inject(task_trace.carrier, context=trace.set_span_in_context(span))
        traced.append(task.with_trace(task_trace))
    return traced


def end(tasks: Sequence[Task], outcomes: Sequence[Outcome | None], unfinished: str) -> None:
    """End the spans of a call's tasks (those not ended yet), each with its outcome.

    `unfinished`: what became of a task without an outcome (``cancelled``, ``timed out``...).
    """
    now = time.time_ns()
    for task, outcome in zip(tasks, outcomes, strict=False):
        task_trace = task.trace
        if task_trace is None or task_trace.ended:
            continue
        task_trace.ended = True
        span = task_trace.span
        if task_trace.worker_pid is not None and task_trace.run_time is not None:
            span.set_attribute("concurrency.worker_pid", task_trace.worker_pid)
            span.set_attribute("concurrency.run_time", task_trace.run_time)
            waited = time.monotonic() - task_trace.started - task_trace.run_time
            span.set_attribute("concurrency.queue_time", max(0.0, waited))
        if outcome is None or outcome is NOT_STARTED:
            what = "never started" if outcome is NOT_STARTED else unfinished
            span.set_attribute("concurrency.outcome", what)
            span.set_status(trace.StatusCode.ERROR, what)
        elif outcome.error is not None:
            span.set_attribute("concurrency.outcome", "error")
            span.record_exception(outcome.error)
            span.set_status(trace.StatusCode.ERROR, f"{type(outcome.error).__name__}: {outcome.error}")
        else:
            span.set_attribute("concurrency.outcome", "ok")
        span.end(end_time=now)
