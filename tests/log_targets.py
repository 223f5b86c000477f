"""Tasks that log, for tests/test_logs.py: importable, so that a worker finds them by name."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("tests.log_targets")


def warn_and_fail(n: int) -> int:
    log.debug("a debug line of %s", n)
    log.warning("hello from task %s", n, extra={"order": n, "unpicklable": threading.Lock()})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("task %s caught", n)
    return os.getpid()


def enabled(level: int) -> bool:
    """Whether the worker's logger would emit at `level`: it mirrors the server's levels."""
    return log.isEnabledFor(level)


def log_then_die(marker: str) -> None:
    log.warning("last words %s", marker)
    os.kill(os.getpid(), signal.SIGKILL)


def log_from_threads(threads: int, records: int) -> int:
    def chatter(index: int) -> None:
        for n in range(records):
            log.warning("thread %d record %d %s", index, n, "x" * (n % 7000))  # some above PIPE_BUF

    workers = [threading.Thread(target=chatter, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return threads * records


def log_at_start() -> None:
    """A worker initializer that logs."""
    log.warning("initializer of worker %d", os.getpid())
