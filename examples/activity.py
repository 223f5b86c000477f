"""What each worker is doing, for the live dashboard: a note per worker, written when it starts and by `traced` tasks.

Stdlib only: workers import this module by name to run the tasks. A note is a small JSON file per
worker pid in a directory the app chooses; the app reads them on each poll. (The package's own
`stats()` counts workers and tasks; which task a given worker holds is the app's business.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# What a task logs here reaches the server's logging (the process and fork drivers forward it), where
# the dashboard's task log shows it with the request and the worker.
log = logging.getLogger("examples.activity")


def _write(directory: str, note: dict[str, Any]) -> None:
    path = Path(directory) / f"{os.getpid()}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(note))
    os.replace(temporary, path)  # atomic: the app never reads half a note


def note_start(directory: str) -> None:
    """Note in `directory` that this worker has started: the pool's initializer, so that every worker shows.

    A worker that replaces a crashed one is listed at once, before it runs any task. Never raises: a
    worker must start even where the notes cannot be written.
    """
    with contextlib.suppress(OSError):
        Path(directory).mkdir(parents=True, exist_ok=True)
        _write(directory, {"pid": os.getpid(), "started": time.time(), "task": None, "since": time.time(), "done": 0})


def traced(directory: str, label: str, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)``, noting in `directory` that this worker runs `label`, then how long it took."""
    path = Path(directory) / f"{os.getpid()}.json"
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        before = {}
    done, began = before.get("done", 0), before.get("started")
    started = time.time()
    _write(directory, {"pid": os.getpid(), "started": began, "task": label, "since": started, "done": done})
    outcome = "failed"
    log.info("%s started", label)
    try:
        result = fn(*args)
        outcome = "completed"
        log.info("%s completed in %.0f ms", label, (time.time() - started) * 1000)
        return result
    except Exception:
        log.exception("%s failed", label)
        raise
    finally:
        _write(
            directory,
            {"pid": os.getpid(), "started": began, "task": None, "since": time.time(), "done": done + 1,
             "last": label, "last_seconds": time.time() - started, "last_outcome": outcome},
        )  # fmt: skip


def read_notes(directory: Path) -> list[dict[str, Any]]:
    """Return the notes of the workers still alive, by pid; forget the ones of workers that are gone."""
    notes = []
    for path in sorted(directory.glob("*.json")):
        try:
            note: dict[str, Any] = json.loads(path.read_text())
            os.kill(note["pid"], 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)  # the worker exited (recycled, crashed, stopped)
            continue
        except (OSError, ValueError, KeyError):
            continue
        notes.append(note)
    return notes


def nap(seconds: float) -> float:
    """Wait like an I/O-bound task does (a query, an HTTP call)."""
    time.sleep(seconds)
    return seconds


def fail(message: str) -> None:
    """Raise, as a buggy task does."""
    raise RuntimeError(message)


def crash() -> None:
    """Kill the worker running this, as a segfault or an OOM kill would."""
    log.warning("about to end this worker (pid %d) the hard way", os.getpid())  # it still reaches the log
    os._exit(70)
