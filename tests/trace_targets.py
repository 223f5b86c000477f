"""Tasks that read the trace context they run in, for tests/test_tracing.py (importable by workers)."""

from __future__ import annotations

from opentelemetry import trace


def current_span_ids() -> tuple[str, str]:
    """The trace id and span id current in the task: the task's span, carried into the worker."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


async def current_span_ids_after_awaiting() -> tuple[str, str]:
    import anyio  # the sync driver awaits it on the caller's loop: asyncio or trio

    await anyio.lowlevel.checkpoint()
    return current_span_ids()


def fail() -> None:
    raise LookupError("order 42 not found")


def write_span_ids(path: str) -> None:
    with open(path, "w") as file:
        file.write(" ".join(current_span_ids()))
