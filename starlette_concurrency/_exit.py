"""The process's end: SIGTERM and interpreter exit, for every facade of the process.

Every SIGTERM drains or logs, whatever the server, and no signal handler ever blocks:

- A lifespan hosts the facade (uvicorn, hypercorn, gunicorn's UvicornWorker): the server's own
  handler runs at once; the server stops accepting, then its lifespan shutdown drains.
- Nothing hosts it that way (``--lifespan off``, daphne, Django ASGI, WSGI servers, scripts): the
  deferred work is drained first, on the facade's host loop or thread, while the middlewares answer
  new requests 503 (`Concurrency.shutting_down`); then the signal goes on to the server's handler,
  or, where there is none (waitress, a script), the main thread exits with ``SystemExit(143)`` so that
  interpreter exit stops the workers. A second SIGTERM goes on at once.
- At interpreter exit a host that still serves drains and stops; deferred work that can no longer
  run is logged by name.

The handler is installed from the main thread only, over a handler that is a function or the
default one (never over an ignored signal), when a facade first starts or a middleware is made.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
import weakref
from types import FrameType

from ._runtime import Runtime, runtimes

__all__ = ["graceful_timeout", "watch"]

logger = logging.getLogger("starlette_concurrency")

_lock = threading.Lock()
_atexit = False
_warned: weakref.WeakSet[Runtime] = weakref.WeakSet()

Handler = signal.Handlers | int | None | object


class _Chained:
    """Our SIGTERM handler: drain what no lifespan will, then hand the signal on."""

    def __init__(self, previous: Handler) -> None:
        self.previous = previous
        self.begun = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.begun:  # a second signal, or the hand-over after the drain
            self.pass_on(signum, frame)
            return
        self.begun = True
        waiting = 1
        count = threading.Lock()

        def then() -> None:
            nonlocal waiting
            with count:
                waiting -= 1
                last = waiting == 0
            if last:  # only ever after this handler returned: hand over where handlers run, the main thread
                main = threading.main_thread().ident
                if main is not None:
                    signal.pthread_kill(main, signum)  # there, it also interrupts a blocking call

        for runtime in runtimes():
            with count:
                waiting += 1
            if not runtime.begin_exit(then):
                with count:
                    waiting -= 1
        with count:
            waiting -= 1
            last = waiting == 0
        if last:
            self.pass_on(signum, frame)

    def pass_on(self, signum: int, frame: FrameType | None) -> None:
        previous = self.previous
        if callable(previous):
            previous(signum, frame)
            return
        # The default action would kill the process at once: exit through the interpreter instead when
        # a facade still has workers or work, so that interpreter exit stops them (or logs what is lost).
        if any(runtime.has_work() for runtime in runtimes()):
            raise SystemExit(128 + signum)
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def watch(runtime: Runtime) -> None:
    """Make sure the process's end drains `runtime`: the atexit hook, and SIGTERM from the main thread."""
    global _atexit
    with _lock:
        if not _atexit:
            _atexit = True
            atexit.register(_at_exit)
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if not isinstance(current, _Chained) and current is not signal.SIG_IGN and current is not None:
        try:
            signal.signal(signal.SIGTERM, _Chained(current))
        except ValueError:  # pragma: no cover - not the main interpreter
            return
    _warn_if_the_server_kills_first(runtime, current)


def graceful_timeout(handler: Handler) -> tuple[str, float] | None:
    """Find the server's graceful timeout behind its signal handlers, where the server exposes it.

    gunicorn's workers handle signals with methods of the worker (its ``cfg`` has ``graceful_timeout``;
    gunicorn's UvicornWorker keeps SIGUSR1 and SIGABRT while uvicorn takes SIGTERM); uvicorn's handler
    is a method of its server (``config.timeout_graceful_shutdown``). hypercorn's and others' are not
    reachable.

    Returns:
        The setting's name and value, or ``None`` when no handler says.
    """
    while isinstance(handler, _Chained):
        handler = handler.previous
    handlers = [handler]
    for name in ("SIGUSR1", "SIGABRT", "SIGQUIT"):
        number = getattr(signal, name, None)
        if number is not None:
            handlers.append(signal.getsignal(number))
    for candidate in handlers:
        owner = getattr(candidate, "__self__", None)
        found: list[tuple[str, object]] = [
            ("gunicorn's graceful_timeout", getattr(getattr(owner, "cfg", None), "graceful_timeout", None)),
            (
                "uvicorn's timeout_graceful_shutdown",
                getattr(getattr(owner, "config", None), "timeout_graceful_shutdown", None),
            ),
        ]
        for setting, value in found:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return setting, float(value)
    return None


def _warn_if_the_server_kills_first(runtime: Runtime, handler: Handler) -> None:
    found = graceful_timeout(handler)
    if found is None or runtime in _warned:
        return
    name, value = found
    drain = runtime.settings.drain_timeout
    if value < drain:
        _warned.add(runtime)
        logger.warning(
            "the server's graceful timeout (%s = %s s) is below drain_timeout (%s s): deferred work still "
            "running when the server kills this process at shutdown is lost; raise the server's timeout "
            "above drain_timeout, or lower drain_timeout",
            name,
            value,
            drain,
            extra={"graceful_timeout": value, "drain_timeout": drain},
        )


def _at_exit() -> None:
    for runtime in runtimes():
        runtime.stop_at_exit()
