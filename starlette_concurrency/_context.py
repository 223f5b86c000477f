"""Per-request collection of deferred work.

The middleware opens a `RequestDeferrals` for each HTTP request in a ContextVar; `defer()` appends
to it; once the response has been sent the middleware hands it back to the facade. The object is
shared, not copied, with the tasks and threads a request spawns (BaseHTTPMiddleware, sync
endpoints in the threadpool), because they inherit the context and append to the same list.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

from ._tasks import Task

__all__ = ["Deferred", "RequestDeferrals", "new_deferrals_var"]


@dataclass(frozen=True, slots=True)
class Deferred:
    """One `defer()` call: its tasks, the driver to run them on, and whether errors also run them."""

    driver: str
    tasks: list[Task]
    always: bool


@dataclass(eq=False, slots=True)
class RequestDeferrals:
    """What one request deferred, in call order."""

    entries: list[Deferred] = field(default_factory=list)


def new_deferrals_var() -> ContextVar[RequestDeferrals | None]:
    """Make the ContextVar of one facade (two facades in one app keep separate batches)."""
    return ContextVar("starlette_concurrency.deferrals", default=None)
