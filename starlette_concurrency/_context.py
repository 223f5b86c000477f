"""Context variables that travel with a call's tasks: captured when `run()` or `defer()` accepts them,
set around each task where it runs.

```
 caller (run(), defer())                         where the task runs (a worker, a fork, the loop)
 ───────────────────────                         ────────────────────────────────────────────────
 Carrier.capture(): the registered variables     call_in_context(entries, fn): set each variable,
   that have a value, as (variable, value)  ──▶    call fn (and await what it returns), reset them
   — pickled once per call for a worker
```

A `ContextVar` does not pickle. A worker finds one where the server does: the module and attribute
name of a global holding it (found once by looking through `sys.modules`), and imports that module.
For a worker, `capture` pickles the call's entries once, as (module, attribute, value) triples, and
each task carries those bytes: pickling a task then costs one more small object, not one per
variable. Our picklers also send a `ContextVar` met anywhere else by its place (`reduce_variable`):
a lambda of an app module that reads a global variable (cloudpickle sends its globals by value).

`call_in_context` and `find_variable` are defined outside any importable module, so that cloudpickle
sends them by value (the pool's function cache: once per worker): a worker runs them without
importing this package, which would pull in Starlette and anyio.
"""

from __future__ import annotations

import functools
import pickle
import sys
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from ._exceptions import ConfigurationError, SerializationError

__all__ = ["Carried", "Carrier", "Entries", "call_in_context", "reduce_variable", "with_context"]

Entries = tuple[tuple[ContextVar[Any], Any], ...]
Carried = Entries | bytes  # what a task carries: the entries, or (for a worker) their pickled places and values

_SOURCE = '''
def call_in_context(entries, fn):
    """Call `fn` with the context variables of `entries` set; await what it returns with them set too.

    `entries`: (variable, value) pairs, or the bytes `Carrier.capture` pickled them into for a worker.
    """
    if entries.__class__ is bytes:
        import importlib
        import pickle

        entries = [
            (getattr(importlib.import_module(module), attribute), value)
            for module, attribute, value in pickle.loads(entries)
        ]
    tokens = [(variable, variable.set(value)) for variable, value in entries]
    try:
        result = fn()
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)
    if not hasattr(result, "__await__"):
        return result

    async def awaited():  # nested, not a global: one function for the function cache to send, not two
        tokens = [(variable, variable.set(value)) for variable, value in entries]
        try:
            return await result
        finally:
            for variable, token in reversed(tokens):
                variable.reset(token)

    return awaited()


def find_variable(module, attribute):
    """The context variable a server sent by its place."""
    import importlib

    return getattr(importlib.import_module(module), attribute)
'''
_namespace: dict[str, Any] = {"__name__": "starlette_concurrency (context carried into tasks)"}
exec(compile(_SOURCE, "<starlette_concurrency context>", "exec"), _namespace)
call_in_context: Callable[[Carried, Callable[[], Any]], Any] = _namespace["call_in_context"]
_find_variable: Callable[[str, str], ContextVar[Any]] = _namespace["find_variable"]

_PLACES: dict[ContextVar[Any], tuple[str, str]] = {}  # where each variable pickled so far was found


def place_of(variable: ContextVar[Any]) -> tuple[str, str]:
    """The module and attribute a worker imports to find `variable`: the first importable module holding it.

    Raises:
        ConfigurationError: no importable module holds it.
    """
    place = _PLACES.get(variable)
    if place is not None:
        return place
    for name, module in list(sys.modules.items()):
        if name == "__main__" or module is None:
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, value in list(namespace.items()):
            if value is variable:
                _PLACES[variable] = name, attribute
                return name, attribute
    raise ConfigurationError(
        f"context variable {variable.name!r} is not a global of an importable module, so a worker cannot find it "
        "(a variable of the script run as __main__, or one made inside a function); define it at the top of a "
        "module of your app and import it from there"
    )


def reduce_variable(variable: ContextVar[Any]) -> tuple[Any, ...]:
    """Pickle a context variable as where a worker finds it (a pickler's reducer).

    Raises:
        pickle.PicklingError: no importable module holds it.
    """
    try:
        return _find_variable, place_of(variable)
    except ConfigurationError as exc:
        raise pickle.PicklingError(str(exc)) from None


_MISSING = object()


class Carrier:
    """The context variables a facade carries into its tasks (``Concurrency(context=[...])``).

    Raises:
        TypeError: an entry of `variables` is not a `contextvars.ContextVar`.
    """

    def __init__(self, variables: Iterable[ContextVar[Any]]) -> None:
        self.variables = list(variables)
        for index, variable in enumerate(self.variables):
            if not isinstance(variable, ContextVar):
                raise TypeError(f"context[{index}] must be a contextvars.ContextVar, not {type(variable).__name__}")

    def __bool__(self) -> bool:
        return bool(self.variables)

    def capture(self, pickles: bool) -> Carried:
        """Take the values the registered variables have here (those without one are left out).

        `pickles`: the tasks go to another interpreter: pickle the entries here, once for the call's
        tasks, as the places a worker finds the variables and their values; so the call fails here,
        with the variable's name, when one cannot travel.

        Returns:
            The entries, or (`pickles`) their pickle; empty when no variable has a value.

        Raises:
            ConfigurationError: a variable is not a global of an importable module (a worker could not find it).
            SerializationError: a value cannot be pickled; the message names the variable.
        """
        entries = tuple(
            (variable, value) for variable in self.variables if (value := variable.get(_MISSING)) is not _MISSING
        )
        if not pickles or not entries:
            return entries
        placed = tuple((*place_of(variable), value) for variable, value in entries)
        try:
            return pickle.dumps(placed)  # ids and strings: the common case, in a microsecond
        except Exception:
            pass
        for variable, value in entries:  # which one? (and with cloudpickle, which pickles more)
            try:
                cloudpickle.dumps(value)
            except Exception as exc:
                raise SerializationError(
                    f"context variable {variable.name!r} holds a {type(value).__name__} that cannot be pickled "
                    f"for a worker ({exc}); carry a plain value (an id, a string) in it instead"
                ) from exc
        data: bytes = cloudpickle.dumps(placed)
        return data


def with_context(fn: Callable[[], Any], entries: Carried) -> Callable[[], Any]:
    """`fn`, to be called with the variables of `entries` set (`fn` itself when there are none)."""
    return functools.partial(call_in_context, entries, fn) if entries else fn
