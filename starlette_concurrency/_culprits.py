"""Which part of a task would not pickle: the captured variable, global, default or attribute, and its type.

cloudpickle's own error says what kind of object failed (``cannot pickle '_thread.lock' object``), not
where it is. When a task will not pickle, `find_culprit` takes the callable apart as cloudpickle does
(a function's closure cells, defaults, the globals its code reads, its attributes; a partial's function
and arguments; a bound method's object; an object's attributes; a container's items), pickles each
part on its own, and goes down into the first that fails, so that the message can say
``captured variable 'svc' (app.Service), attribute 'conn' (socket.socket)``.

It runs only after a dump failed, so it may cost what it costs: each part is pickled again.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from typing import Any

from cloudpickle import cloudpickle as _cp  # type: ignore[import-untyped]

from ._locations import dumps

__all__ = ["find_culprit"]

MAX_DEPTH = 6  # parts within parts: deeper than this, the last part that failed is named


def find_culprit(obj: Any) -> str | None:
    """Name the part of `obj` that would not pickle, as a path of parts with their types.

    Returns:
        e.g. ``captured variable 'conn' (socket.socket)``; None when no single part fails on its own
        (the object itself refuses, or only the parts together do). Never raises.
    """
    try:
        steps = _descend(obj, 0, set())
    except Exception:  # a part's attributes raised while being read: say nothing rather than hide the error
        return None
    return ", ".join(steps) or None


def _descend(obj: Any, depth: int, seen: set[int]) -> list[str]:
    if depth >= MAX_DEPTH or id(obj) in seen:
        return []
    seen.add(id(obj))
    for label, part in _parts(obj):
        if id(part) not in seen and not _pickles(part):  # (an object in itself is not its own culprit)
            return [f"{label} ({type_name(part)})", *_descend(part, depth + 1, seen)]
    return []


def _pickles(obj: Any) -> bool:
    try:
        dumps(obj)
    except Exception:
        return False
    return True


def type_name(obj: Any) -> str:
    """``socket.socket``, ``_thread.lock``, ``app.Service``; a builtin type by its name alone."""
    kind = type(obj)
    module = getattr(kind, "__module__", None)
    return kind.__qualname__ if module in (None, "builtins") else f"{module}.{kind.__qualname__}"


def _parts(obj: Any) -> Iterator[tuple[str, Any]]:
    kind = type(obj)
    if kind is types.FunctionType:
        yield from _function_parts(obj)
    elif kind is functools.partial:
        yield "the partial's function", obj.func
        for index, value in enumerate(obj.args):
            yield f"argument {index} of the partial", value
        for name, value in obj.keywords.items():
            yield f"keyword argument {name!r} of the partial", value
    elif kind is types.MethodType:
        yield f"the object bound to method {obj.__func__.__name__!r}", obj.__self__
        yield "the method's function", obj.__func__
    elif kind in (list, tuple, set, frozenset):
        for index, value in enumerate(obj):
            yield f"item {index}", value
    elif kind is dict:
        for key, value in obj.items():
            yield f"the value of key {key!r}", value
    elif _pickled_by_attributes(kind):
        for name, value in getattr(obj, "__dict__", {}).items():
            yield f"attribute {name!r}", value


def _function_parts(func: types.FunctionType) -> Iterator[tuple[str, Any]]:
    code = func.__code__
    for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # not bound yet
            continue
        yield f"captured variable {name!r}", value
    if func.__defaults__:
        positional = code.co_varnames[: code.co_argcount]  # positional-only ones included
        for name, value in zip(positional[-len(func.__defaults__) :], func.__defaults__, strict=False):
            yield f"default of parameter {name!r}", value
    for name, value in (func.__kwdefaults__ or {}).items():
        yield f"default of parameter {name!r}", value
    g = func.__globals__
    for name in _cp._extract_code_globals(code):  # the names cloudpickle sends
        if name in g:
            yield f"global {name!r}", g[name]
    for name, value in func.__dict__.items():
        yield f"function attribute {name!r}", value


def _pickled_by_attributes(kind: type) -> bool:
    """Whether pickle saves instances of `kind` as their `__dict__` (no reducer or state of their own)."""
    own = ("__reduce_ex__", "__reduce__", "__getstate__")
    return all(getattr(kind, name, None) is getattr(object, name, None) for name in own) and not hasattr(
        kind, "__slots__"
    )
