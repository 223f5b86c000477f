"""How a task's end travels: the answer a worker writes for a value, an exception or a failure.

One encoder for every process that runs tasks (the `process` driver's worker, the `fork` driver's
child, the `dask` driver's worker); the server's decoder, which turns an answer back into an
`Outcome` with the server's exception types, is `_pickling.decode_outcome`.

```
 tag           body                                      decoded (server) as
 OK            pickled value                             the value
 ERROR         pickled (exception, traceback text)       the exception, the traceback as its __cause__
 REMOTE        pickled (type name, str, traceback text)  RemoteError: the exception would not round-trip
 UNPICKLABLE   pickled (type name, str, traceback text)  SerializationError: the value would not pickle
 LOAD_FAILED   pickled (type name, str, traceback text)  TaskLoadFailed: the task would not unpickle here
```

An exception is sent only once it is known to load again (`_encode_error`), so that a worker never
sends what the server would fail to read; a `BaseException` that is not an `Exception` (`SystemExit`,
`KeyboardInterrupt`) always travels as a description, so that it cannot stop the server.
"""

from __future__ import annotations

import copyreg
import pickle
import traceback
from collections.abc import Callable
from typing import Any

from .protocol import ERROR, OK, REMOTE, UNPICKLABLE, frame

__all__ = ["describe", "encode", "exception_str", "exception_type_name", "result_frame"]


def result_frame(fn: Callable[[], Any], dumps: Callable[[Any], bytes]) -> bytes:
    """Call `fn` and frame how it ended, without a task id (a forked child's single answer)."""
    return frame(*encode(fn, dumps))


def encode(fn: Callable[[], Any], dumps: Callable[[Any], bytes]) -> tuple[bytes, bytes]:
    """Call `fn` (running a coroutine it returns to completion) and return (tag, body) of how it ended.

    Never raises: a failure, or a result that will not pickle, is described too. `dumps` is the
    fallback for results and exceptions that plain pickle refuses (cloudpickle's, in a worker).
    """
    try:
        value = fn()
        if hasattr(value, "__await__"):
            value = _await(value)
    except BaseException as exc:
        return _encode_error(exc, dumps)
    try:
        return OK, pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    try:
        # cloudpickle is slower than pickle but also handles lambdas, local classes and __main__ objects.
        return OK, dumps(value)
    except BaseException as exc:
        return UNPICKLABLE, describe(exc)


def _await(awaitable: Any) -> Any:
    import asyncio

    async def wrapper() -> Any:
        return await awaitable

    return asyncio.run(wrapper())


def _encode_error(exc: BaseException, dumps: Callable[[Any], bytes]) -> tuple[bytes, bytes]:
    text = "".join(traceback.format_exception(exc))
    if isinstance(exc, Exception):  # SystemExit, KeyboardInterrupt... raised in the server would stop it
        # An exception pickles as (type, args); one whose __init__ wants other arguments than it
        # passed to Exception.__init__ pickles fine and then fails to load, so try it here, then try
        # rebuilding it without calling __init__. What still fails travels as a RemoteError.
        cls = type(exc)  # a class with a __reduce__ of its own said how it pickles: respect that
        by_default = cls.__reduce__ in _BUILTIN_REDUCE and cls.__reduce_ex__ is object.__reduce_ex__
        for candidate in (exc, _ByState(exc)) if by_default else (exc,):
            try:
                body = dumps((candidate, text))
                pickle.loads(body)
            except BaseException:
                continue
            return ERROR, body
    return REMOTE, describe(exc, text)


_BUILTIN_REDUCE = (BaseException.__reduce__, OSError.__reduce__)


class _ByState:
    """Pickles as the exception it wraps, rebuilt from its args and attributes without calling __init__."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        base = next(cls for cls in type(exc).__mro__ if cls.__module__ == "builtins")
        state = {**getattr(exc, "__dict__", {}), "args": exc.args}
        if isinstance(exc, OSError):
            state.update(errno=exc.errno, strerror=exc.strerror, filename=exc.filename, filename2=exc.filename2)
        return copyreg._reconstructor, (type(exc), base, None), state  # type: ignore[attr-defined]


def describe(exc: BaseException, text: str | None = None) -> bytes:
    """Pickle what a `RemoteError` is made of: the type's name, the message, the traceback's text."""
    if text is None:
        text = "".join(traceback.format_exception(exc))
    return pickle.dumps((exception_type_name(exc), exception_str(exc), text))


def exception_type_name(exc: BaseException) -> str:
    """Name an exception's type as a `RemoteError` does: ``ValueError``, ``myapp.errors.PaymentDeclined``."""
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def exception_str(exc: BaseException) -> str:
    """Return ``str(exc)``, or a placeholder when the exception's own ``__str__`` raises."""
    try:
        return str(exc)
    except BaseException:
        return "<exception str() failed>"
