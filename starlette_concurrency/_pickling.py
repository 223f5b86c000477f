"""Pickling on the caller's side: tasks out, outcomes in, errors translated at the boundary."""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

from . import _worker
from ._exceptions import RemoteError, RemoteTraceback, SerializationError
from ._tasks import Outcome, Task

__all__ = ["decode_outcome", "dumps", "dumps_task", "remote_exception"]


def dumps(obj: Any) -> bytes:
    """Pickle with cloudpickle, which also sends lambdas, closures and `__main__` functions by value."""
    data: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return data


def dumps_task(task: Task) -> bytes:
    """Pickle a task's callable.

    Raises:
        SerializationError: it cannot be pickled (it captures a lock, a socket, an open file...).
    """
    try:
        return dumps(task.fn)
    except Exception as exc:
        raise SerializationError(
            f"{task.label} cannot be pickled, so it cannot be sent to a worker process: {exc!r}. "
            "Capture plain data instead, or use the 'fork' or 'sync' driver."
        ) from exc


def remote_exception(error: BaseException, traceback: str) -> BaseException:
    """Attach a worker's formatted traceback to a task's exception, as its ``__cause__``."""
    error.__cause__ = RemoteTraceback(traceback)
    return error


def decode_outcome(tag: bytes, body: bytes | memoryview, task: Task) -> Outcome:
    """Turn a worker's RESULT frame into an `Outcome`; never raises for the task's own problems."""
    try:
        if tag == _worker.OK:
            return Outcome(value=pickle.loads(body))
        if tag == _worker.ERROR:
            error, traceback = pickle.loads(body)
            return Outcome(error=remote_exception(error, traceback))
    except Exception as exc:
        return Outcome(error=SerializationError(f"the result of {task.label} could not be unpickled: {exc!r}"))
    type_name, message, traceback = pickle.loads(body)
    if tag == _worker.REMOTE:
        stand_in: BaseException = RemoteError(type_name, message, traceback)
    elif tag == _worker.UNPICKLABLE:
        stand_in = SerializationError(f"the result of {task.label} cannot be pickled: {type_name}: {message}")
    else:
        stand_in = SerializationError(f"{task.label} could not be unpickled in the worker: {type_name}: {message}")
    return Outcome(error=remote_exception(stand_in, traceback))
