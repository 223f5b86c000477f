"""The parent's handle on one child process, shared by the `process` and `fork` drivers.

A `Child` owns the parent's ends of the child's pipes, the buffer that cuts what it writes into
frames (`_wire.protocol.FrameBuffer`), its exit event and its process group:

- **Exit event.** On Linux a pidfd (`os.pidfd_open`) becomes readable when the child exits, and is
  waited on with `anyio.wait_readable` beside the result pipe: a death is seen at once, even when a
  grandchild (a task's `fork()` through libc, bypassing Python's fork hooks) keeps the result pipe
  open, so that no EOF ever comes. Where there is no pidfd, the liveness of a silent child is polled.
- **Process group.** Each worker and each forked child leads a process group of its own, so that
  `kill()` stops what a task started (a `sleep 60` subprocess, a forked helper) with it: on a
  timeout, a cancellation, a crash and at shutdown. Nothing a task started outlives its worker's end.
- **Parent death.** Workers and forked children ask the kernel for SIGKILL when the server dies
  (`PR_SET_PDEATHSIG`, see `_wire.worker.die_with_parent`); the pipe watcher thread of `_wire/worker.py`
  remains where the platform has no such signal. The request is tied to the *thread* that started
  the child, so workers are spawned by one long-lived thread (`spawn_thread`), never by a short-lived
  thread of a pool.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from .._wire.protocol import FrameBuffer, grow_pipe
from ._descendants import kill_tree

__all__ = ["Child", "run_in_spawn_thread"]

T = TypeVar("T")

# A read allocates its whole size first: 1 MiB costs ~15 us (the allocator maps and unmaps it), 64 KiB
# ~1 us, and nearly every read brings a few small answers. A read that fills its buffer is followed by
# large ones.
_READ_SIZE, _BULK_READ_SIZE = 1 << 16, 1 << 20
_POLL_INTERVAL = 0.5  # seconds between liveness checks of a silent child where there is no pidfd


class _SpawnThread:
    """One daemon thread that runs spawns in turn, for the life of the process.

    Not a `ThreadPoolExecutor`: the interpreter shuts those down (and their threads exit) before the
    `atexit` handlers run, and the drain at exit (a WSGI server's worker, a server without lifespan)
    still needs the workers, which that thread's exit would kill through their parent-death signal.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="concurrency-spawn", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, future = self.jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, whatever it is
                    future.set_exception(exc)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.jobs.put((fn, future))
        return future


_spawner: _SpawnThread | None = None


async def run_in_spawn_thread(fn: Callable[[], T]) -> T:
    """Run `fn` (a spawn) in the process's one long-lived spawn thread, off the event loop.

    Not a worker thread of anyio's pool: those exit when idle, and a child's parent-death signal is
    sent when the thread that started it exits, not the process.
    """
    global _spawner
    if _spawner is None or _spawner.pid != os.getpid():  # none yet, or the one of the process we were forked from
        _spawner = _SpawnThread()
    future = _spawner.submit(fn)
    return await anyio.to_thread.run_sync(future.result)


class Child:
    """One child process: its pid, the parent's pipe ends, its frames, its exit event and its group."""

    def __init__(
        self, pid: int, from_child: int, to_child: int | None = None, *, popen: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.pid = pid
        self.from_child = from_child
        self.to_child = to_child
        self.popen = popen
        self.frames = FrameBuffer()
        self.returncode: int | None = None
        self.reaped = False
        self.closed = False
        self.pidfd: int | None = None
        with contextlib.suppress(AttributeError, OSError):  # no pidfd before Linux 5.3, nor elsewhere
            self.pidfd = os.pidfd_open(pid)
        grow_pipe(from_child)
        os.set_blocking(from_child, False)
        if to_child is not None:
            os.set_blocking(to_child, False)

    def poll(self) -> bool:
        """Reap the child if it has exited, without waiting; return whether it has been reaped."""
        if self.reaped:
            return True
        if self.popen is not None:
            self.returncode = self.popen.poll()
            self.reaped = self.returncode is not None
            return self.reaped
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # somebody else reaped it (SIGCHLD ignored, a waitpid(-1) elsewhere)
            self.reaped = True
        else:
            if pid:
                self.reaped = True
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.reaped

    async def wait_exit(self) -> None:
        """Wait until the child has exited, and reap it."""
        while not self.poll():
            if self.pidfd is not None and not self.closed:
                try:
                    await anyio.wait_readable(self.pidfd)
                except anyio.BusyResourceError:  # another task waits on it (a reader being cancelled): poll
                    await anyio.sleep(0.005)
                except (anyio.ClosedResourceError, OSError):
                    await anyio.sleep(0.005)  # closed under us: poll
            else:
                await anyio.sleep(0.005)

    async def wait_exit_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for the child to exit; return whether it did (and was reaped)."""
        with anyio.move_on_after(seconds):
            await self.wait_exit()
        return self.poll()

    def kill(self) -> None:
        """SIGKILL the child's whole process group (what its task started too), then the child itself.

        A child not reaped yet is frozen at once and killed a moment later from a thread, after its
        descendants that left its group (`_descendants.kill_tree`); wait for its exit as before.
        """
        if not self.poll():
            kill_tree(self.pid)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # reaped: the group outlives its leader while a member lives

    def read_available(self) -> bool:
        """Read what the result pipe holds into `frames` without waiting; return False at EOF."""
        if self.closed:
            return False
        size = _READ_SIZE
        while True:
            try:
                data = os.read(self.from_child, size)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self.frames.feed(data)
            if len(data) < size:
                return True
            size = _BULK_READ_SIZE  # more is coming: a large result, say

    async def receive(self) -> tuple[bytes, bytes] | None:
        """Return the next frame as (tag, body), or None once the child has exited or closed its pipe.

        Waits on the result pipe and on the exit event together, so that a grandchild holding the
        pipe cannot hide the child's death. Frames written before the death are still returned.

        Raises:
            ProtocolError: the pipe carries bytes that are not a frame.
        """
        while (message := self.frames.next()) is None:
            if not self.read_available():
                return None
            if (message := self.frames.next()) is not None:
                return message
            if self.poll():  # it exited: whatever it wrote is in the pipe already
                self.read_available()
                return self.frames.next()
            await self.wait_readable_or_exit()
        return message

    async def wait_readable_or_exit(self) -> None:
        """Wait until the result pipe has bytes (or EOF) or the child has exited."""
        if self.pidfd is None:  # pragma: no cover - no pidfd on this platform: poll the liveness now and then
            with anyio.move_on_after(_POLL_INTERVAL):
                await anyio.wait_readable(self.from_child)
            return
        async with anyio.create_task_group() as tg:

            async def exited() -> None:
                await anyio.wait_readable(self.pidfd)  # type: ignore[arg-type]
                tg.cancel_scope.cancel()

            tg.start_soon(exited)
            await anyio.wait_readable(self.from_child)
            tg.cancel_scope.cancel()

    def close(self) -> None:
        """Close the parent's pipe ends and the pidfd (telling anything waiting on them first)."""
        if self.closed:
            return
        self.closed = True
        for fd in (self.to_child, self.from_child, self.pidfd):
            if fd is not None:
                anyio.notify_closing(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def close_quietly(self) -> None:
        """Close the fds without telling the event loop (in a forked child, whose loop is not ours)."""
        if not self.closed:
            self.closed = True
            for fd in (self.to_child, self.from_child, self.pidfd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
