"""What the shutdown matrix's apps share (tests/test_deployments.py; the apps: deployment_asgi.py, deployment_wsgi.py).

Every deferred task has an id. Files under `DEPLOY_DIR` tell the story of each id, one line per event,
appended with O_APPEND by whichever process saw it (so several server and worker processes can share them):

- ``attempted``: the app is about to call `defer()` for it;
- ``accepted``: `defer()` returned (``refused`` if it raised: shutdown had begun, which is allowed);
- ``ran``: the task itself ran to its end (in a worker).

The package's own log lines go to ``DEPLOY_DIR/log`` (WARNING and up, one line each, the task's label
in it), where the test reads which tasks were logged abandoned, dropped or stopped.

Requests defer from the server's request handling; ``/thread`` starts a thread that defers outside any
request, every few milliseconds, until the process ends, whether `defer()` takes them or not (a scheduler,
a metrics thread).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from starlette_concurrency import Concurrency

THREAD_FIRST_ID = 1_000_000  # ids of the background thread's tasks start here; requests' ids are below
THREAD_PAUSE = 0.01  # seconds between two deferrals of the background thread
RETRY_PAUSE = 0.001  # seconds before it tries again after a refusal (shutdown has begun): it watches the door
LATE_SECONDS = 1.0  # how long its tasks take once it has been refused
WORKER_PAUSE = 0.3  # seconds a worker holds its task in `ask_workers()`: two tasks, two workers at once
ANSWER_PAUSE = 0.3  # seconds `timed_deferral()` waits before it answers: a task started at once would have begun
HOLD_SECONDS = 60.0  # how long `held_run()`'s task takes: far longer than its client waits


def _directory() -> Path:
    return Path(os.environ["DEPLOY_DIR"])


def note(kind: str, task_id: int) -> None:
    """Append one event about a task to its file, in one write (atomic for a line this short)."""
    fd = os.open(_directory() / kind, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{task_id}\n".encode())
    finally:
        os.close(fd)


def append(task_id: int, seconds: float) -> None:
    """The deferred task: take a while, then say it ran."""
    time.sleep(seconds)
    note("ran", task_id)


def defer_one(concurrency: Concurrency, task_id: int, seconds: float) -> bool:
    """Defer one task, noting the attempt and whether `defer()` took it."""
    note("attempted", task_id)
    try:
        concurrency.defer({f"t-{task_id}": functools.partial(append, task_id, seconds)})
    except Exception:
        note("refused", task_id)
        return False
    note("accepted", task_id)
    return True


def _log_to_file() -> None:
    """Write the package's WARNING and ERROR lines to DEPLOY_DIR/log (and let them reach the server's log too)."""
    logger = logging.getLogger("starlette_concurrency")
    if any(getattr(handler, "deployment_matrix", False) for handler in logger.handlers):
        return
    handler = logging.FileHandler(_directory() / "log")
    handler.deployment_matrix = True  # type: ignore[attr-defined]
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(process)d %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class Deferrer:
    """The background thread: defers a short task every few milliseconds, outside any request."""

    def __init__(self, concurrency: Concurrency) -> None:
        self.concurrency = concurrency
        self.lock = threading.Lock()
        self.started = False

    def start(self) -> None:
        with self.lock:
            if self.started:
                return
            self.started = True
        # A daemon, like most schedulers' threads: it does not hold the process up at exit.
        threading.Thread(target=self._loop, name="deferrer", daemon=True).start()

    def _loop(self) -> None:
        # Each process its own range of ids (gunicorn may run several workers).
        task_id = THREAD_FIRST_ID + (os.getpid() % 1000) * 100_000
        refused_once = False
        while True:  # a refusal (shutdown has begun) does not stop it, as it would not stop a scheduler
            # Once shutdown has begun its tasks take a second: one accepted then must be kept for that long.
            accepted = defer_one(self.concurrency, task_id, LATE_SECONDS if refused_once else 0.01)
            refused_once = refused_once or not accepted
            task_id += 1
            time.sleep(THREAD_PAUSE if accepted else RETRY_PAUSE)


def facade() -> Concurrency:
    """The facade of the app under test (its drain timeout comes from CONCURRENCY_DRAIN_TIMEOUT); logs to the file."""
    if "DEPLOY_DIR" in os.environ:
        _log_to_file()
    return Concurrency(workers=2, env_file=None)


def worker_view(seconds: float) -> dict[str, Any]:
    """A task: which process runs it, and what the app's startup put in the environment (after a pause)."""
    time.sleep(seconds)
    return {"pid": os.getpid(), "started": os.environ.get("APP_STARTED")}


async def ask_workers(concurrency: Concurrency) -> dict[str, Any]:
    """What the frameworks' ``/startup`` answers: `run()`'s results, and what both workers see."""
    return {
        "server": os.getpid(),
        "workers": await concurrency.run([functools.partial(worker_view, WORKER_PAUSE)] * 2),
        "values": await concurrency.run(
            {"sum": functools.partial(sum, [1, 2, 3]), "max": functools.partial(max, 4, 9)}
        ),
    }


def _write(marker: str, text: str) -> None:
    partial = _directory() / f"{marker}.partial"
    partial.write_text(text)
    partial.replace(_directory() / marker)  # whole, or not there yet


def note_start(marker: str) -> None:
    """A deferred task: write when it started (wall clock, as the answer's time is) to DEPLOY_DIR/MARKER."""
    _write(marker, repr(time.time()))


def hold(marker: str) -> None:
    """A task: say which worker holds it (its pid, in DEPLOY_DIR/MARKER), then take HOLD_SECONDS."""
    _write(marker, str(os.getpid()))
    time.sleep(HOLD_SECONDS)


async def held_run(concurrency: Concurrency, marker: str) -> str:
    """What the frameworks' ``/hold`` answers, if its client waits that long: `run()` of a long task."""
    await concurrency.run(functools.partial(hold, marker))
    return "finished"


async def timed_deferral(concurrency: Concurrency, marker: str) -> dict[str, float]:
    """What the frameworks' ``/after`` answers: defer `note_start`, wait, and say when the answer left."""
    concurrency.defer(functools.partial(note_start, marker))
    await anyio.sleep(ANSWER_PAUSE)
    return {"answered": time.time()}
