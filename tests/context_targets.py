"""Context variables and tasks that read them, in an importable module (workers import it to find them)."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path

import anyio
import anyio.lowlevel

request_id: ContextVar[str] = ContextVar("request_id")
tenant: ContextVar[str] = ContextVar("tenant", default="no tenant")


def read() -> tuple[str, str, int]:
    """What a task sees: both variables, and the process it runs in."""
    return request_id.get("-"), tenant.get(), os.getpid()


async def read_after_awaiting() -> tuple[str, str]:
    await anyio.lowlevel.checkpoint()
    return request_id.get("-"), tenant.get()


def write(path: str) -> None:
    """A deferred task: record what it saw."""
    Path(path).write_text(f"{request_id.get('-')} {tenant.get()}")


def set_and_read() -> tuple[str, str]:
    """Read the tenant, then set both variables: the caller must not see them change."""
    before = tenant.get()
    request_id.set("set by the task")
    tenant.set("changed by the task")
    return before, request_id.get()


async def set_and_read_after_awaiting() -> tuple[str, str]:
    import anyio

    before = tenant.get()
    request_id.set("set by the task")
    tenant.set("changed by the task")
    await anyio.lowlevel.checkpoint()
    return before, request_id.get()


def package_root_loaded() -> tuple[str, bool]:
    """The request id, and whether this process imported the package root (a worker must not need it)."""
    import sys

    return request_id.get("-"), "starlette_concurrency" in sys.modules
