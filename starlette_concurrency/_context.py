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

The running deferred task's `Deferral` (`current_deferral()`) travels the same way, as one more entry
(`_wire.context.DEFERRAL`). It is set per attempt, around the pickled form `defer()` made once:
`carry_deferral` wraps a stored payload without loading it (a payload that will not load still fails
as it loads).

`call_in_context` and `find_variable` live in `_wire/context.py`, which a worker imports without the
package root (Starlette and anyio); they travel by reference.
"""

from __future__ import annotations

import functools
import pickle
import sys
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import cloudpickle  # type: ignore[import-untyped]

from ._exceptions import ConfigurationError, SerializationError
from ._wire.context import DEFERRAL, DEFERRAL_PLACE, CalledOnLoad, call_in_context, find_variable

if TYPE_CHECKING:
    from ._tasks import Task

__all__ = [
    "Carried",
    "Carrier",
    "Deferral",
    "Entries",
    "call_in_context",
    "carry_deferral",
    "current_deferral",
    "reduce_variable",
    "with_context",
]

Entries = tuple[tuple[ContextVar[Any], Any], ...]
Carried = Entries | bytes  # what a task carries: the entries, or (for a worker) their pickled places and values


# Where each variable pickled so far was found (the deferral's: where a worker imports no more than it).
_PLACES: dict[ContextVar[Any], tuple[str, str]] = {DEFERRAL: DEFERRAL_PLACE}


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
        return find_variable, place_of(variable)
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


@dataclass(frozen=True, slots=True)
class Deferral:
    """What a running deferred task is: read it with `current_deferral()`.

    Attributes:
        key: the `defer(..., key=...)` it was given, or ``None``.
        attempt: which start of the task this is, from 1: a retry after it raised, and a run again after
            its worker (or the server) died under it, each add one. More than 1: it may have done some of
            its work before.
        retries: how many retries `defer(..., retries=...)` allowed it.
        entry_id: its entry in the journal (``Concurrency(journal=...)``), the same in every process that
            runs it, or ``None`` without a journal.
    """

    key: str | None
    attempt: int
    retries: int
    entry_id: int | None


def current_deferral() -> Deferral | None:
    """Return the running deferred task's key, attempt and journal entry; ``None`` outside a deferred task.

    Call it from inside a task given to `Concurrency.defer()`, on any driver (in the worker process for
    ``process`` and ``dask``): an idempotent task keys its side effects with it, e.g. an email sent once
    per ``deferral.key``, or an upsert that names ``deferral.entry_id``.

    Returns:
        The `Deferral`, or ``None`` (a `run()` task, or code that is not a task).
    """
    value = DEFERRAL.get()
    return None if value is None else Deferral(*value)


def carry_deferral(task: Task, value: tuple[str | None, int, int, int | None]) -> Task:
    """The task, to run with `value` as its `Deferral` (see `current_deferral`).

    A stored pickled form (``Task.prepared``: the process driver's payload, the dask driver's bytes) is
    wrapped as it is, in a pickle of ``call_in_context(<the deferral>, <the stored pickle, loaded>)``
    (a payload that does not load fails as the wrapper loads, as before); otherwise the deferral joins
    the task's context entries.
    """
    from ._closures import Payload  # _closures needs what needs this module: imported on first use

    prepared = task.prepared
    if isinstance(prepared, bytes) or (isinstance(prepared, Payload) and not prepared.skeletons):
        data = prepared if isinstance(prepared, bytes) else prepared.data
        entries = pickle.dumps(((*DEFERRAL_PLACE, value),))
        task_fn = cast("Callable[[], Any]", CalledOnLoad(pickle.loads, data))  # loaded only where it runs
        wrapped = pickle.dumps(functools.partial(call_in_context, entries, task_fn))
        return replace(task, prepared=wrapped if isinstance(prepared, bytes) else Payload(wrapped, ()))
    context = task.context
    if isinstance(context, bytes):  # pickled for a worker: their places and values
        return replace(task, context=pickle.dumps((*pickle.loads(context), (*DEFERRAL_PLACE, value))))
    return replace(task, context=(*context, (DEFERRAL, value)))
