"""CPU time of a server process and of its children (its pools' workers), read from /proc (Linux only).

A `snapshot` holds the server's utime + stime, its cutime + cstime (children that exited and were
reaped: a worker killed and replaced still counts) and each live child's utime + stime; `spent`
turns two snapshots into the CPU seconds the server and its children used between them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Snapshot:
    server: float  # seconds of CPU the server process used so far, all its threads
    reaped: float  # the same, of its children that have exited and been waited for
    children: dict[int, float]  # the same, of each live child


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat from the third (state) on, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            data = file.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses


# Indexes into `_stat`'s list (field n of proc(5) is index n - 3).
_PPID, _UTIME, _STIME, _CUTIME, _CSTIME = 1, 11, 12, 13, 14


def available(pid: int) -> bool:
    """Whether /proc can tell the CPU time of this process."""
    return _stat(pid) is not None


def snapshot(pid: int) -> Snapshot:
    """The CPU seconds used so far by `pid` and by its children, live and reaped."""
    fields = _stat(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    children: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (child := _stat(int(entry))) is not None and int(child[_PPID]) == pid:
            children[int(entry)] = (int(child[_UTIME]) + int(child[_STIME])) / TICK
    return Snapshot(
        server=(int(fields[_UTIME]) + int(fields[_STIME])) / TICK,
        reaped=(int(fields[_CUTIME]) + int(fields[_CSTIME])) / TICK,
        children=children,
    )


def spent(before: Snapshot, after: Snapshot) -> tuple[float, float]:
    """CPU seconds of the server, and of its children, between two snapshots."""
    # A child that exited in between moved its whole lifetime into `reaped`: take off what it had
    # used before the first snapshot. A child that started in between counts from zero.
    children = after.reaped - before.reaped
    children += sum(cpu - before.children.get(pid, 0.0) for pid, cpu in after.children.items())
    children -= sum(cpu for pid, cpu in before.children.items() if pid not in after.children)
    return after.server - before.server, children
