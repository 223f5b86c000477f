"""Each task gets an OpenTelemetry span, child of the caller's, and its code runs in that span's context."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from starlette_concurrency import Concurrency, TaskTimeout

from . import trace_targets as targets

pytestmark = pytest.mark.anyio

_exporter = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # once per test process
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    _exporter.clear()
    yield _exporter
    _exporter.clear()


def ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def finished(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return sorted((s for s in exporter.get_finished_spans() if s.name.startswith(prefix)), key=lambda s: s.name)


async def test_each_task_gets_a_span_child_of_the_callers_and_runs_in_it(
    spans: InMemorySpanExporter, concurrency: Concurrency, driver_name: str
) -> None:
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("GET /checkout") as request_span:
        seen = await concurrency.run([targets.current_span_ids, targets.current_span_ids_after_awaiting])
    first, second = finished(spans, "concurrency.run")
    assert [first.name, second.name] == [
        "concurrency.run task 0 (current_span_ids)",
        "concurrency.run task 1 (current_span_ids_after_awaiting)",
    ]
    for span, inside in zip([first, second], seen, strict=True):
        assert span.parent is not None
        assert span.parent.span_id == request_span.get_span_context().span_id
        assert inside == ids(span)  # what the task's own instrumented code would take as its parent
        assert span.attributes is not None
        assert span.attributes["concurrency.driver"] == driver_name
        assert span.attributes["concurrency.outcome"] == "ok"
        assert span.status.status_code is StatusCode.UNSET
        if driver_name in ("process", "fork"):  # they say which worker ran it, for how long, after what wait
            assert span.attributes["concurrency.worker_pid"] not in (None, os.getpid())
            assert 0 <= span.attributes["concurrency.run_time"] <= (span.end_time - span.start_time) / 1e9  # type: ignore[operator]
            assert span.attributes["concurrency.queue_time"] >= 0  # type: ignore[operator]


async def test_a_failed_task_records_its_exception(spans: InMemorySpanExporter, concurrency: Concurrency) -> None:
    with trace.get_tracer("tests").start_as_current_span("POST /orders"):
        [error] = await concurrency.run([targets.fail], return_exceptions=True)
    assert isinstance(error, LookupError)
    [span] = finished(spans, "concurrency.run")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["concurrency.outcome"] == "error"
    [event] = span.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert str(event.attributes["exception.type"]).endswith("LookupError")
    assert event.attributes["exception.message"] == "order 42 not found"


async def test_a_deferred_task_gets_its_span_too(
    spans: InMemorySpanExporter, concurrency: Concurrency, tmp_path: Path
) -> None:
    with trace.get_tracer("tests").start_as_current_span("POST /signup") as request_span:
        concurrency.defer(functools.partial(targets.write_span_ids, str(tmp_path / "ids")))
    deadline = time.monotonic() + 60
    while not finished(spans, "concurrency.defer"):
        assert time.monotonic() < deadline, "the deferred task's span never ended"
        await concurrency.run(lambda: None)  # lets the loop run the deferred task
    [span] = finished(spans, "concurrency.defer")
    assert span.name == "concurrency.defer task 0 (partial(write_span_ids))"
    assert span.parent is not None
    assert span.parent.span_id == request_span.get_span_context().span_id
    assert (tmp_path / "ids").read_text() == " ".join(ids(span))
    assert span.attributes is not None
    assert span.attributes["concurrency.outcome"] == "ok"


async def test_a_task_stopped_by_the_timeout_says_so(spans: InMemorySpanExporter) -> None:
    async with Concurrency("process", workers=1, env_file=None) as facade:
        with trace.get_tracer("tests").start_as_current_span("GET /slow"), pytest.raises(TaskTimeout):
            await facade.run(lambda: time.sleep(30), timeout=0.5)
    [span] = finished(spans, "concurrency.run")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["concurrency.outcome"] == "timed out"


async def test_no_span_active_no_spans(spans: InMemorySpanExporter, concurrency: Concurrency) -> None:
    assert await concurrency.run(targets.current_span_ids) == ("0" * 32, "0" * 16)  # an invalid span there
    assert spans.get_finished_spans() == ()
