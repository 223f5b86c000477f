"""Log records of tasks, forwarded from the workers to the server's own logging.

```
 server (this module)                                   worker (_wire/worker.py's LogForwarder)
 ────────────────────                                   ──────────────────────────────────
 Levels.frame(): the levels the server's loggers   ──▶  LEVELS: set the same levels there, so that
   are set to (again when they change, ≤ 1/s)             a record the server would drop is never sent
 handle(fields, extra): the record rebuilt,        ◀──  LOG: task id | the record's fields, its message
   passed to the logger of its name, with the             formatted and its exception as text (a
   task's label, key, worker pid, request's                record's args and exc_info need not pickle)
   method and path as attributes
```

The records travel on the worker's answer pipe, each written as it is emitted, so a record written
before its task answered is handled before `run()` returns, and one written before the worker died
is not lost. The server's formatters, filters and handlers (JSON, Sentry, OpenTelemetry, a file) see
them as records of their own, `record.process` saying which worker wrote it.
"""

from __future__ import annotations

import logging
import pickle
import time
from typing import Any

from ._tasks import Task
from ._wire.protocol import ID_SIZE, LEVELS, ProtocolError, frame

__all__ = ["Levels", "handle", "load", "task_extra"]

logger = logging.getLogger("starlette_concurrency")

_CHECK_EVERY = 1.0  # seconds between two looks at the server's logger levels


def _levels() -> dict[str, int]:
    """The levels set on the server's loggers: the root's, and each logger's that has one of its own."""
    levels = {"": logging.root.level}
    for name, node in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(node, logging.Logger):
            if node.disabled:  # logging.config.dictConfig's disable_existing_loggers
                levels[name] = logging.CRITICAL + 1
            elif node.level != logging.NOTSET:
                levels[name] = node.level
    return levels


class Levels:
    """The server's logger levels as a LEVELS frame, looked at again at most once a second.

    `version` changes when the levels do: a worker that was sent an older one gets the new frame
    before its next tasks.
    """

    def __init__(self) -> None:
        self.version = 0
        self._levels = _levels()
        self._frame = frame(LEVELS, pickle.dumps(self._levels))
        self._checked = time.monotonic()

    def current(self) -> dict[str, int]:
        """The levels now (for a worker's INIT frame, which serves what its initializer logs)."""
        self._look(time.monotonic())
        return self._levels

    def frame(self, now: float) -> bytes:
        """The LEVELS frame of the levels now (looked at again if the last look is a second old)."""
        if now - self._checked >= _CHECK_EVERY:
            self._look(now)
        return self._frame

    def _look(self, now: float) -> None:
        self._checked = now
        levels = _levels()
        if levels != self._levels:
            self._levels, self.version = levels, self.version + 1
            self._frame = frame(LEVELS, pickle.dumps(levels))


def load(body: bytes) -> dict[str, Any]:
    """The fields of a LOG frame's record (after the task id).

    Raises:
        ProtocolError: they do not load, or name no logger and level.
    """
    try:
        fields = pickle.loads(memoryview(body)[ID_SIZE:])
    except Exception as exc:
        raise ProtocolError(f"a log record that does not load ({exc!r})") from exc
    name, level = (fields.get("name"), fields.get("levelno")) if isinstance(fields, dict) else (None, None)
    if not isinstance(name, str) or type(level) is not int:
        raise ProtocolError("a log record without a logger name and level")
    record: dict[str, Any] = fields
    return record


def task_extra(driver: str, pid: int, task: Task | None) -> dict[str, Any]:
    """The attributes a forwarded record gets: the same names as the pool's own log lines use."""
    extra: dict[str, Any] = {"driver": driver, "worker_pid": pid}
    if task is not None:  # None: logged between tasks (by a thread of a task that ended, say)
        extra.update(task=task.label, task_key=task.key)
        if task.origin is not None:
            extra["method"], extra["path"] = task.origin
    return extra


def handle(fields: dict[str, Any], extra: dict[str, Any]) -> None:
    """Hand a worker's record to the server's logger of the same name, with `extra` as attributes.

    The level is checked again here: the worker's copy of the levels may be up to a second old. What
    a handler or filter of the app raises is logging's to report (`Handler.handleError`), never the
    pool's: a record that cannot be handled is reported once here and dropped.
    """
    target = logging.getLogger(fields["name"])
    if not target.isEnabledFor(fields["levelno"]):
        return
    record = logging.makeLogRecord(fields)
    record.__dict__.update(extra)
    try:
        target.handle(record)
    except Exception:
        logger.exception("a log record of task %s could not be handled", extra.get("task", "?"))
