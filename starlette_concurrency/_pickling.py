"""Pickling on the caller's side: tasks out, outcomes in, errors translated at the boundary.

`pickle_task` pickles one task's callable at call time, before anything is dispatched, through the
pool's function cache (the worker loads it with `_wire.worker.load_task`); `pickle_group` pickles the
callables of several tasks in one dump (what they share is pickled once), and falls back to one dump
per task only to name the task that will not pickle; `dumps_task` is plain cloudpickle, for the dask
driver. `decode_outcome` turns an answer into an `Outcome` and never
raises anything but the task's own failure, as an outcome: a result that unpickles into `SystemExit`
or any other `BaseException` cannot escape `run()`.
"""

from __future__ import annotations

import io
import pickle
import threading
from collections.abc import Sequence
from typing import Any

from ._closures import ClosureCache, Payload
from ._culprits import find_culprit
from ._exceptions import RemoteError, RemoteTraceback, SerializationError, WorkerStartFailed
from ._locations import dumps as located_dumps, located_pickler
from ._tasks import Outcome, Task
from ._wire import protocol
from ._wire.outcome import exception_str, exception_type_name

__all__ = [
    "TaskLoadFailed",
    "decode_outcome",
    "describe_failure",
    "dumps",
    "dumps_task",
    "pickle_group",
    "pickle_task",
    "remote_exception",
]


class TaskLoadFailed(SerializationError):
    """Raised for a task whose callable would not unpickle in the worker (its function was renamed or removed)."""


def dumps(obj: Any) -> bytes:
    """Pickle with cloudpickle, which also sends lambdas, closures and `__main__` functions by value."""
    return located_dumps(obj)


def dumps_task(task: Task) -> bytes:
    """Pickle a task's callable.

    Raises:
        SerializationError: it cannot be pickled (it captures a lock, a socket, an open file...).
    """
    try:
        return _task_pickler().dumps(task.target)
    except Exception as exc:
        raise _unpicklable(task, exc) from exc


def pickle_task(task: Task, cache: ClosureCache) -> Payload:
    """Pickle a task's callable for a pool's workers, its lambdas and closures through the function cache.

    Args:
        task: the task.
        cache: the pool's `ClosureCache`.

    Returns:
        The payload, and the skeletons a worker must hold to load it (see `WorkerMirror.prepare`).

    Raises:
        SerializationError: it cannot be pickled (it captures a lock, a socket, an open file...).
    """
    try:
        return cache.dumps(task.target)
    except Exception as exc:
        raise _unpicklable(task, exc) from exc


def pickle_group(tasks: Sequence[Task], cache: ClosureCache) -> Payload | None:
    """Pickle the callables of several tasks in one dump, as a list, for a pool's workers.

    One dump costs a third of one per task for small tasks: what they share (the `partial` class, a
    module function, a common argument) is pickled once, and the pickler is set up once. Objects that
    tasks share are shared in the worker too, as they are in the parent.

    Args:
        tasks: the tasks, in order.
        cache: the pool's `ClosureCache`.

    Returns:
        The payload (a pickled list of callables), or None when the list would not pickle as a whole
        although each task does on its own: pickle them one by one then.

    Raises:
        SerializationError: a task cannot be pickled; it names the first such task.
    """
    try:
        return cache.dumps([task.target for task in tasks])
    except Exception:
        pass
    for task in tasks:  # which one? (the error of the group's dump would not say)
        pickle_task(task, cache)
    return None


def _unpicklable(task: Task, exc: Exception) -> SerializationError:
    culprit = find_culprit(task.fn)  # which captured variable, global, default or attribute
    reason = f"{culprit} cannot be pickled ({exc!r})" if culprit else repr(exc)
    return SerializationError(
        f"{task.label} cannot be pickled, so it cannot be sent to a worker process: {reason}. "
        "Capture plain data instead, or use the 'fork' or 'sync' driver."
    )


class _ReusedPickler:
    """One cloudpickle pickler per thread, reused: creating one per task costs more than pickling a partial."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.pickler = located_pickler(self.buffer)  # code objects keep their file name (see _locations)

    def dumps(self, obj: Any) -> bytes:
        self.buffer.seek(0)
        self.buffer.truncate()
        self.pickler.clear_memo()  # nothing of one task may refer to another's objects
        self.pickler.globals_ref.clear()  # cloudpickle's map of globals dicts by id(): valid for one dump only
        try:
            self.pickler.dump(obj)
        except BaseException:
            _local.__dict__.pop("pickler", None)  # a failed dump may leave it in any state: start afresh
            raise
        return self.buffer.getvalue()


_local = threading.local()


def _task_pickler() -> _ReusedPickler:
    pickler: _ReusedPickler | None = getattr(_local, "pickler", None)
    if pickler is None:
        pickler = _local.pickler = _ReusedPickler()
    return pickler


def remote_exception(error: BaseException, traceback: str) -> BaseException:
    """Attach a worker's formatted traceback to a task's exception, as its ``__cause__``."""
    error.__cause__ = RemoteTraceback(traceback)
    return error


def decode_outcome(tag: bytes, body: bytes | memoryview, task: Task) -> Outcome:
    """Turn a worker's answer into an `Outcome`; never raises for the task's own problems.

    Unpickling runs code of the task's classes; whatever it raises (`SystemExit` included) becomes the
    task's `SerializationError`, and an exception that is not an `Exception` (a `SystemExit` the task
    raised, or returned in an ERROR frame) travels as a `RemoteError`, so that it cannot stop the server.
    """
    try:
        if tag == protocol.OK:
            return Outcome(value=pickle.loads(body))
        if tag == protocol.ERROR:
            error, traceback = pickle.loads(body)
            if not isinstance(error, Exception):
                name, message = exception_type_name(error), exception_str(error)
                substitute = RemoteError(name, message, traceback)
                return Outcome(error=remote_exception(substitute, traceback))
            return Outcome(error=remote_exception(error, traceback))
        type_name, message, traceback = pickle.loads(body)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        error = SerializationError(f"the result of {task.label} could not be unpickled: {exc!r}")
        return Outcome(error=error)
    stand_in: Exception
    if tag == protocol.REMOTE:
        stand_in = RemoteError(type_name, message, traceback)
    elif tag == protocol.UNPICKLABLE:
        stand_in = SerializationError(f"the result of {task.label} cannot be pickled: {type_name}: {message}")
    else:
        stand_in = TaskLoadFailed(f"{task.label} could not be unpickled in the worker: {type_name}: {message}")
    return Outcome(error=remote_exception(stand_in, traceback))


def describe_failure(body: bytes, what: str) -> WorkerStartFailed:
    """Build the error for a worker's START_FAILED frame: why `what` (a worker) could not start."""
    try:
        type_name, message, traceback = pickle.loads(body)
    except Exception as exc:
        return WorkerStartFailed(f"{what}, and its reason could not be read: {exc!r}")
    error = WorkerStartFailed(f"{what}: {type_name}: {message}")
    error.__cause__ = RemoteTraceback(traceback)
    return error
