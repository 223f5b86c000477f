"""Tasks that start processes outside their worker's process group (tests/test_descendants.py imports them by name)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SLEEPER = "import time; time.sleep(600)"


def _note(path: Path, pids: list[int]) -> None:
    partial = path.with_suffix(".tmp")
    partial.write_text(" ".join(map(str, pids)))
    partial.rename(path)


def start_escapees(path: Path) -> list[int]:
    """Start a process in a session of its own, one that calls setsid() itself, and a grandchild under the latter."""
    in_session = subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=True)
    # It calls setsid() itself, then starts a grandchild of its own, which stays in its new session.
    script = (
        "import os, subprocess, sys, time; os.setsid(); "
        f"child = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); "
        f"open({str(path) + '.grandchild'!r}, 'w').write(str(child.pid)); time.sleep(600)"
    )
    own_setsid = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    grandchild = Path(str(path) + ".grandchild")
    while not grandchild.exists() or not grandchild.read_text():
        assert time.monotonic() < deadline, "the setsid() child never started its own child"
        time.sleep(0.01)
    pids = [in_session.pid, own_setsid.pid, int(grandchild.read_text())]
    _note(path, pids)
    return pids


def start_escapees_then_hang(path: Path) -> None:
    start_escapees(path)
    time.sleep(600)


def start_a_daemon(path: Path) -> int:
    """Fork twice with a setsid() between, as a daemon does: the middle process exits at once."""
    reader, writer = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            os.close(reader)
            os.write(writer, str(os.getpid()).encode())
            os.close(writer)
            os.execv(sys.executable, [sys.executable, "-c", SLEEPER])
        os._exit(0)
    os.close(writer)
    os.waitpid(middle, 0)
    daemon = int(os.read(reader, 32))
    os.close(reader)
    _note(path, [daemon])
    return daemon
