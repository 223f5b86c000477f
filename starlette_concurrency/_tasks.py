"""What a call hands to a driver (`Task`), what comes back (`Outcome`), and the shaping in between.

`run()` accepts one callable, a sequence of callables or a mapping of key → callable. `Batch`
validates that input once, turns it into a flat list of `Task`s for the driver, and turns the
driver's `Outcome`s back into the shape the caller gave.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterable, Mapping, Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["NOT_STARTED", "Batch", "Outcome", "Task"]

# What `run()` and `defer()` accept; Any because each callable may return something different.
Tasks = Callable[[], Any] | Iterable[Callable[[], Any]] | Mapping[Any, Callable[[], Any]]


@dataclass(frozen=True, slots=True)
class Task:
    """One zero-argument callable of a call, with the key it was given.

    Attributes:
        key: the index in the input sequence, or the key in the input mapping.
        fn: the callable to run.
        prepared: what the driver's `prepare()` made of it when `defer()` accepted it (the process
            driver: its pickled callable), or None.
        call: which `defer()` call of its request it came from, counted from 2 on (0 otherwise): two
            calls each have a ``task 0``, and the logs must tell them apart.
        context: the context variables captured for it (``Concurrency(context=[...])``), pickled when
            they go to a worker; see `target`.
        origin: the method and path of the request that made the call, if any (for log records).
        trace: its OpenTelemetry span and trace context (a `_tracing.TaskTrace`), if a span was active
            where the call was made; see `target`.
    """

    key: Hashable
    fn: Callable[[], Any]
    prepared: Any = field(default=None, compare=False, repr=False)
    call: int = 0
    context: tuple[Any, ...] | bytes = field(default=(), compare=False, repr=False)
    origin: tuple[str | None, str | None] | None = field(default=None, compare=False, repr=False)
    trace: Any = field(default=None, compare=False, repr=False)

    @property
    def target(self) -> Callable[[], Any]:
        """What a driver calls (or pickles) to run the task: `fn`, with its captured context variables set
        and its trace context current."""
        fn = self.fn
        if self.context:
            from ._context import with_context  # _context needs this module: imported on first use

            fn = with_context(fn, self.context)
        if self.trace is not None:
            fn = self.trace.wrap(fn)
        return fn

    def with_trace(self, trace: Any) -> Task:
        """The same task, with its span (`_tracing.TaskTrace`)."""
        return Task(self.key, self.fn, self.prepared, self.call, self.context, self.origin, trace)

    @property
    def label(self) -> str:
        """Name the task the way error messages and logs do: ``task 0 (count_rows)``, ``task 'users' (<lambda>)``,
        ``task 0 (<lambda>) of defer() #2`` (the second `defer()` call of a request).

        Never raises, whatever the key's `repr` or the callable's attributes do: a label is built while
        reporting another error, which it must not hide.
        """
        label = f"task {_short_repr(self.key)} ({function_name(self.fn)})"
        return f"{label} of defer() #{self.call}" if self.call else label


def function_name(fn: object) -> str:
    """Name a callable briefly: ``count_rows``, ``Counter.next``, ``<lambda>``, ``partial(fail)``; never raises."""
    try:
        if isinstance(fn, functools.partial):
            return f"partial({function_name(fn.func)})"
        name = getattr(fn, "__qualname__", None)
        if not isinstance(name, str):
            name = type(fn).__qualname__  # a callable instance: its class
        # `dashboard.<locals>.<lambda>` says less than it costs; the innermost part names the function.
        return name.rpartition("<locals>.")[2]
    except Exception:
        return "?"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one task ended: a returned `value`, or the `error` it raised.

    Attributes:
        value: the task's return value (``None`` when it failed).
        error: the exception the task raised, or ``None`` when it returned.
    """

    value: Any = None
    error: BaseException | None = None


#: What a driver may store, when a deferred batch is cancelled (shutdown's drain ran out, its timeout),
#: for a task it provably never began: the log then calls it "never started" (safe to run again), where
#: a task left without an outcome is "stopped unfinished" (it may have done some of its work). Compared
#: by identity.
NOT_STARTED: Final = Outcome()


@dataclass(frozen=True, slots=True)
class Batch:
    """A validated `run()` / `defer()` input: its tasks and the shape to give results back in."""

    tasks: list[Task]
    shape: type[object]  # `object` for a single callable, `list` or `dict` otherwise

    def carrying(self, context: tuple[Any, ...] | bytes, origin: tuple[str | None, str | None] | None) -> Batch:
        """The same batch, its tasks to run with the context variables `context` captured, made by the
        request `origin` (method, path)."""
        tasks = [Task(task.key, task.fn, task.prepared, task.call, context, origin) for task in self.tasks]
        return Batch(tasks, self.shape)

    @classmethod
    def of(cls, tasks: object, argument: str = "tasks") -> Batch:
        """Validate what a caller passed.

        Raises:
            TypeError: `tasks` is not a callable, an ordered iterable (not a set) or a mapping of
                callables; the message names the offending index or key and its type.
        """
        # In the order of run()'s typed overloads: a mapping, then any callable (a class too:
        # `run(SomeClass)` builds one, and on Python 3.13 `threading.Lock` is a class), then an iterable.
        if isinstance(tasks, Mapping):
            items = list(tasks.items())
            shape: type[object] = dict
        elif callable(tasks):
            return cls([Task(0, tasks)], object)
        elif isinstance(tasks, AbstractSet):
            # Results come back in input order: a set has none to give (a dict's keys and items views are sets too).
            raise TypeError(
                f"{argument} must be ordered, not a {type(tasks).__name__} (its order is arbitrary, and results "
                "come back in input order); pass a list, e.g. list(...) or sorted(..., key=...), or a dict"
            )
        elif isinstance(tasks, Iterable) and not isinstance(tasks, str | bytes | bytearray | memoryview):
            items = list(enumerate(tasks))
            shape = list
        else:
            raise TypeError(
                f"{argument} must be a callable, a sequence of callables or a mapping of callables, "
                f"not {type(tasks).__name__}"
            )
        for key, fn in items:
            if not callable(fn):
                raise TypeError(
                    f"{argument}[{_short_repr(key)}] is not callable: got {type(fn).__name__} {_short_repr(fn)}; "
                    "wrap the work in a function or a lambda"
                )
        if shape is dict:
            _check_keys(argument, [key for key, _ in items])
        return cls([Task(key, fn) for key, fn in items], shape)

    def results(self, outcomes: list[Outcome], *, return_exceptions: bool) -> Any:
        """Shape the outcomes like the input; raise the first failure by position unless told not to."""
        failures = [
            (task, outcome.error)
            for task, outcome in zip(self.tasks, outcomes, strict=True)
            if outcome.error is not None
        ]
        if failures and not return_exceptions:
            task, first = failures[0]
            first.add_note(f"(raised by {task.label})")
            for other, error in failures[1:]:
                first.add_note(f"({other.label} also failed: {type(error).__qualname__}: {error})")
            raise first
        for task, error in failures:
            error.add_note(f"(raised by {task.label})")
        values = [outcome.value if outcome.error is None else outcome.error for outcome in outcomes]
        if self.shape is dict:
            return {task.key: value for task, value in zip(self.tasks, values, strict=True)}
        if self.shape is list:
            return values
        return values[0]


def _check_keys(argument: str, keys: list[Any]) -> None:
    """Refuse, before anything runs, keys that could not key the result `dict`."""
    # The results are built after the tasks ran; a key that cannot go in a dict would fail only then.
    try:
        distinct = dict.fromkeys(keys)
    except Exception as exc:
        raise TypeError(
            f"{argument} has a key that cannot key the results: {type(exc).__name__}: {exc}; "
            "use hashable keys (strings, numbers, tuples)"
        ) from exc
    if len(distinct) != len(keys):  # only a custom Mapping can do that; a dict would lose results silently
        raise TypeError(f"{argument} has {len(keys) - len(distinct)} duplicate key(s); each key must be unique")


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a key's or a value's repr may be broken; the message must still be built
        return f"<{type(value).__name__} whose repr raised {type(exc).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."
