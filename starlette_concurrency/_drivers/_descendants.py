"""Stop what a worker's tasks started, including processes that left its process group (Linux).

Each worker is its own process group, and stopping it kills the group. A task can take a process out of
the group: `subprocess.Popen(..., start_new_session=True)`, `os.setsid()` in a child, `setsid CMD`.
Such a process is still a descendant of the worker while the worker lives, so before the group is
killed the worker's whole tree is found through ``/proc`` and stopped:

```
 on the event loop:   SIGSTOP the worker           it starts nothing more, at once
 on a thread of its own (reading /proc is file I/O, which has no place on an event loop):
   loop: read the tree          /proc/PID/task/*/children, recursively (a /proc/*/stat scan without it)
         SIGSTOP each new pid   a stopped process forks no more; what it forked before shows next round
   until nothing new
   SIGKILL every pid found      all at once: none is orphaned before it is signalled
   SIGKILL the worker and its process group
```

A frozen worker cannot exit, so it cannot be reaped (and its pid reused) before that thread kills it.
What this cannot reach: a process orphaned *before*
the stop (a daemon that forked twice and whose middle process exited), which the kernel hands to
init, and anything left when the worker itself is SIGKILLed from outside (the server killed with
SIGKILL: the workers die at the kernel's word, their trees are not walked).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

__all__ = ["descendants", "kill_tree", "stop_descendants"]

MAX_ROUNDS = 100  # a tree that still grows after this many rounds of stopping is killed as far as seen


def kill_tree(pid: int) -> None:
    """Freeze `pid` now; then, on a thread, kill its descendants, its process group and `pid` itself.

    Args:
        pid: a child of the caller that the caller has not reaped (so that its pid is still its own).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGSTOP)
    threading.Thread(target=_kill_tree, args=(pid,), name=f"kill-tree-{pid}", daemon=True).start()


def _kill_tree(pid: int) -> None:
    try:
        stop_descendants(pid, freeze_root=False)
    finally:
        for kill in (os.kill, os.killpg):  # the worker, then its group (which outlives it while a member lives)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)


def stop_descendants(pid: int, *, freeze_root: bool = True) -> list[int]:
    """Freeze, then SIGKILL, every descendant of `pid` (not `pid` itself); return their pids.

    Args:
        pid: the worker; the caller must be sure it is not reaped yet (so its pid cannot be another's).
        freeze_root: SIGSTOP `pid` first, so that it starts nothing more (``False`` when `pid` is the caller).
    """
    if not sys.platform.startswith("linux"):  # pragma: no cover - /proc is Linux's
        return []
    if freeze_root:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGSTOP)
    frozen: list[int] = []
    seen: set[int] = set()
    for _ in range(MAX_ROUNDS):
        new = [child for child in descendants(pid) if child not in seen]
        if not new:
            break
        for child in new:
            seen.add(child)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGSTOP)
                frozen.append(child)
    for child in frozen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    return frozen


def descendants(pid: int) -> list[int]:
    """Return the pids of `pid`'s children, their children, and so on, as /proc shows them now."""
    found: list[int] = []
    queue = [pid]
    while queue:
        children = _children(queue.pop())
        found += children
        queue += children
    return found


def _children(pid: int) -> list[int]:
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:  # gone
        return []
    children: list[int] = []
    for thread in threads:  # a child belongs to the thread that forked it
        try:
            with open(f"/proc/{pid}/task/{thread}/children") as file:
                children += (int(child) for child in file.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{thread}"):
                continue  # that thread ended meanwhile
            return _children_by_scan(pid)  # pragma: no cover - a kernel without CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return children


def _children_by_scan(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(entry))
    return children
