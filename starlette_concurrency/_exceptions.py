"""The exceptions raised by starlette-concurrency.

```
ConcurrencyError
├── ConfigurationError      bad driver name / option (raised at construction)
├── SerializationError      closure, result or exception would not (un)pickle; names the task
├── WorkerCrashed           the worker holding a task died; exit code / signal
├── WorkerStartFailed       a worker process could not start (initializer, preload, spawn)
├── TaskTimeout             also a TimeoutError
├── RemoteError             a task's exception that could not travel as itself
├── DeferralRejected        defer() would go past the bound on pending deferred tasks
├── ClientDisconnected      run() in a request whose client went away; its tasks were stopped
├── DriverError             a driver broke its contract (left a task without an outcome)
├── WrongContext            a call from where it cannot be served (run_blocking() on an event loop)
└── ConcurrencyClosed       use after aclose(); also a RuntimeError
```

An exception raised *by a task* reaches the caller as itself (same type, same arguments), with the
worker's formatted traceback attached as its ``__cause__`` (a `RemoteTraceback`).
"""

from __future__ import annotations

import signal

__all__ = [
    "ClientDisconnected",
    "ConcurrencyClosed",
    "ConcurrencyError",
    "ConfigurationError",
    "DeferralRejected",
    "DriverError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerStartFailed",
    "WrongContext",
]


class ConcurrencyError(Exception):
    """Base class of every error this package raises itself."""


class ConfigurationError(ConcurrencyError, ValueError):
    """Raised when a driver name, an option or a `CONCURRENCY_*` variable is invalid."""


class SerializationError(ConcurrencyError):
    """Raised when a task, its result or its exception cannot be pickled or unpickled.

    The message names the task. When the closure itself cannot be pickled, nothing of the call runs.
    """


class WorkerCrashed(ConcurrencyError):
    """Raised for a task whose worker died while holding it (segfault, `os._exit`, OOM kill, SIGKILL).

    Attributes:
        exitcode: the worker's exit status when it exited, ``None`` when a signal killed it.
        signal: the number of the signal that killed the worker, or ``None``.
    """

    def __init__(self, message: str, *, exitcode: int | None = None, signal: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuild_worker_crashed, (str(self), self.exitcode, self.signal)

    @classmethod
    def from_returncode(cls, returncode: int | None, what: str) -> WorkerCrashed:
        """Build the error for a process that ended with `returncode` (negative: killed by a signal)."""
        if returncode is None:
            return cls(f"{what} closed its pipe without exiting")
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            return cls(f"{what} was killed by {name}", signal=-returncode)
        return cls(f"{what} exited with code {returncode}", exitcode=returncode)


def _rebuild_worker_crashed(message: str, exitcode: int | None, signal: int | None) -> WorkerCrashed:
    return WorkerCrashed(message, exitcode=exitcode, signal=signal)


class WorkerStartFailed(ConcurrencyError):
    """Raised when a worker process could not start: its initializer raised, a preload failed to import,
    or the process could not be spawned or died before it was ready. No task of the call ran on it.
    """

    @classmethod
    def from_returncode(cls, returncode: int | None, what: str) -> WorkerStartFailed:
        """Build the error for a worker that ended with `returncode` before it was ready."""
        crashed = WorkerCrashed.from_returncode(returncode, what)
        return cls(str(crashed))


class TaskTimeout(ConcurrencyError, TimeoutError):
    """Raised when a `run()` call did not finish within its timeout; its unfinished tasks were stopped."""


class RemoteError(ConcurrencyError):
    """Stands in for a task's exception that could not be pickled or unpickled.

    Attributes:
        type_name: the qualified name of the original exception's type.
        message: ``str()`` of the original exception.
        traceback: the worker's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[object, ...]:
        return RemoteError, (self.type_name, self.message, self.traceback)


class DeferralRejected(ConcurrencyError):
    """Raised by `defer()` when accepting the tasks would exceed `max_pending_deferred`.

    Nothing of the rejected call is kept: the caller decides whether to run the work inline, retry
    later, or answer 503.
    """


class ConcurrencyClosed(ConcurrencyError, RuntimeError):
    """Raised when a `Concurrency` (or a driver) is used after `aclose()`."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as the ``__cause__`` of a task's exception."""

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return f'\n"""\n{self.traceback.rstrip()}\n"""'


class ClientDisconnected(ConcurrencyError):
    """Raised by `run()` inside a request when its client went away while the call ran.

    The call's tasks were stopped, as on any cancellation. `ConcurrencyMiddleware` swallows it when
    it escapes the app (there is nobody to answer); pass ``cancel_on_disconnect=False`` to the
    middleware to let calls finish regardless.
    """


class DriverError(ConcurrencyError):
    """Raised when a driver breaks its contract, e.g. returns from `execute()` leaving a task without an outcome."""


class WrongContext(ConcurrencyError, RuntimeError):
    """Raised when a call is made from where it cannot be served without blocking or hanging.

    For example `run_blocking()` on a thread that runs an event loop: use ``await run()`` there.
    """
