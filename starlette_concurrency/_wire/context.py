"""What a task is wrapped in where it runs: the caller's context variables, its deferral, its trace.

The server side (`_context.py`, `_tracing.py`) captures them when a call is accepted; these functions
set them around the task in the worker, the fork child or the server's own thread. They are pickled
by reference, as ``getattr(importlib.import_module("starlette_concurrency._wire.context"), name)``:
pickle's own reference would ``__import__`` the dotted name, which imports the package root too
(Starlette, anyio), and a worker must not (see `__init__.py`). A payload that carries context costs
a few bytes more, not a function sent by value.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

__all__ = ["DEFERRAL", "DEFERRAL_PLACE", "CalledOnLoad", "call_in_context", "call_in_trace", "find_variable"]


class CalledOnLoad:
    """Pickles as the call ``fn(*args)``, made where the pickle is loaded."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.fn, self.args


class _Exported:
    """A function of this module that pickles as ``getattr(<this module, imported alone>, <its name>)``."""

    __slots__ = ("__name__", "fn")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.__name__ = fn, fn.__name__

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __reduce__(self) -> tuple[Any, ...]:
        return getattr, (CalledOnLoad(importlib.import_module, __name__), self.__name__)  # this module alone


DEFERRAL: ContextVar[tuple[str | None, int, int, int | None] | None] = ContextVar(
    "starlette_concurrency.deferral", default=None
)
"""The running deferred task's (key, attempt, retries, journal entry): what `current_deferral()` reads."""
DEFERRAL_PLACE = (__name__, "DEFERRAL")  # where a worker finds it: this module, never the package root


def _call_in_context(entries: Any, fn: Callable[[], Any]) -> Any:
    """Call `fn` with the context variables of `entries` set; await what it returns with them set too.

    `entries`: (variable, value) pairs, or the bytes `_context.Carrier.capture` pickled them into for a
    worker: (module, attribute, value) triples, each variable found by its place (`find_variable`).
    """
    if entries.__class__ is bytes:
        entries = [(_find_variable(module, attribute), value) for module, attribute, value in pickle.loads(entries)]
    tokens = [(variable, variable.set(value)) for variable, value in entries]
    try:
        result = fn()
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)
    if not hasattr(result, "__await__"):
        return result

    async def awaited() -> Any:
        tokens = [(variable, variable.set(value)) for variable, value in entries]
        try:
            return await result
        finally:
            for variable, token in reversed(tokens):
                variable.reset(token)

    return awaited()


def _find_variable(module: str, attribute: str) -> ContextVar[Any]:
    """The context variable a server sent by its place: a global of an importable module."""
    variable: ContextVar[Any] = getattr(importlib.import_module(module), attribute)
    return variable


def _call_in_trace(carrier: dict[str, str], fn: Callable[[], Any]) -> Any:
    """Call `fn` with the trace context of `carrier` (a W3C traceparent) current; await what it returns so too.

    Where OpenTelemetry is not installed (a worker's environment may lack it), just call `fn`.
    """
    try:
        from opentelemetry import context, propagate
    except ImportError:
        return fn()
    token = context.attach(propagate.extract(carrier))
    try:
        result = fn()
    finally:
        context.detach(token)
    if not hasattr(result, "__await__"):
        return result

    async def awaited() -> Any:
        token = context.attach(propagate.extract(carrier))
        try:
            return await result
        finally:
            context.detach(token)

    return awaited()


call_in_context = _Exported(_call_in_context)
find_variable = _Exported(_find_variable)
call_in_trace = _Exported(_call_in_trace)
