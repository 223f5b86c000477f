"""The pool's handle on one worker process: its pipes' reads and writes, on asyncio or trio.

A `Worker` is a `Child` (`_child.py`) with what the pool's I/O needs on top: a write buffer drained
when the pipe has room, the read side that hands each read's frames to the pool, and the one call
that says the worker is gone (EOF, or its exit event). What the worker holds in flight is the state
machine's (`_machine.Slot`), not the handle's. `launch` starts a task of the current event loop that
no caller waits for: a trio reader, a spawn, the burial of a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import struct
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import sniffio

from ..._closures import WorkerMirror
from .._child import Child

__all__ = ["Worker", "launch"]

logger = logging.getLogger("starlette_concurrency")


def launch(tasks: set[Any], fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run `fn(*args)` as a task of the current event loop that no caller waits for.

    trio: a system task; asyncio: a task kept alive by `tasks`. Either ends with its loop, and an
    exception it raises is logged, never raised into the loop (trio would end the run for it).
    """
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:  # in an asyncio selector callback: no current task
        library = "asyncio"
    if library == "trio":
        import trio

        trio.lowlevel.spawn_system_task(_guarded, fn, *args)
    else:
        import asyncio

        task = asyncio.get_running_loop().create_task(_guarded(fn, *args), context=contextvars.Context())
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _guarded(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    try:
        await fn(*args)
    except Exception:
        logger.exception("a background task of the process pool failed")


class Worker(Child):
    """A pool worker: its process, what it holds in flight, and its reader."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot: Any = None  # the state machine's Slot for this process
        self.ready = False
        self.broken = False  # it wrote what it could not have written: its pipe is not read any more
        self.protocol_error = ""
        self.gone = False  # its pipe closed or it exited: the pool was told (once)
        # Per TASKS frame in flight: its size, and the size of the SKIP frames written after it (Pool._unread)
        self.frame_bytes: deque[list[int]] = deque()
        self.hung = False  # it closed its pipe but did not exit: it was killed for that
        # asyncio: the loop whose selector calls this worker's callbacks (see attach)
        self.selector_loop: asyncio.AbstractEventLoop | None = None
        self._on_frames: Callable[[Worker], None] | None = None
        self._on_gone: Callable[[Worker], None] | None = None
        self.mirror = WorkerMirror()  # the function skeletons this process was sent: none yet
        self.levels_version = -1  # the version of the server's logger levels it was sent (-1: none yet)
        self.outbox = bytearray()
        self.wake_writer: anyio.Event | None = None
        self.loop: object = None  # the event loop its reader runs in
        self.scope: anyio.CancelScope | None = None
        _live_workers.add(self)

    def send(self, data: bytes) -> bool:
        """Write a frame: at once what the pipe takes, the rest through the writer task, in order.

        Returns False when the pipe refused the frame's first byte (EPIPE: the worker is dead and never
        read any of it); True otherwise.
        """
        if not self.outbox and self.to_child is not None:
            try:
                written = os.write(self.to_child, data)
            except BlockingIOError:
                written = 0
            except OSError:
                return False  # it died: its reader sees it
            data = data[written:]
        if data:
            self.outbox += data
            if self.wake_writer is not None:
                self.wake_writer.set()
            if self.selector_loop is not None and self.to_child is not None:
                self.selector_loop.add_writer(self.to_child, self._writable)
        return True

    # asyncio: callbacks straight from the selector, no task per worker ---------------------------
    # A reader task would cost each answer one more trip through the event loop before it reaches
    # its caller; a selector callback reads and delivers it at once. (trio has no such callbacks:
    # there, `read_loop` and `write_loop` run as a system task.)

    def attach(
        self, loop: asyncio.AbstractEventLoop, on_frames: Callable[[Worker], None], on_gone: Callable[[Worker], None]
    ) -> None:
        """Have `loop` call `on_frames` after each read (it takes the complete frames from `frames`),
        then `on_gone` once when the worker's pipe closes or it exits."""
        self.selector_loop, self._on_frames, self._on_gone = loop, on_frames, on_gone
        if not self.broken:
            loop.add_reader(self.from_child, self._readable)
        if self.pidfd is not None:
            loop.add_reader(self.pidfd, self._exited)
        if self.outbox and self.to_child is not None:
            loop.add_writer(self.to_child, self._writable)

    def detach(self) -> None:
        """Stop the selector callbacks (before the fds close, or when another loop takes over)."""
        loop, self.selector_loop = self.selector_loop, None
        if loop is None or loop.is_closed():
            return
        for fd in (self.from_child, self.pidfd):
            if fd is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(fd)
        if self.to_child is not None:
            with contextlib.suppress(Exception):
                loop.remove_writer(self.to_child)

    def _readable(self) -> None:
        assert self._on_frames is not None
        if not self.read_available():
            self._gone()
            return
        self._on_frames(self)
        if self.broken and self.selector_loop is not None:  # its exit event remains: it is being killed
            with contextlib.suppress(Exception):
                self.selector_loop.remove_reader(self.from_child)

    def _exited(self) -> None:
        self._gone()

    def _gone(self) -> None:
        self.detach()
        if self._on_gone is not None:
            on_gone, self._on_gone = self._on_gone, None
            on_gone(self)

    def _writable(self) -> None:
        if self.to_child is None or self.closed:
            return
        try:
            written = os.write(self.to_child, self.outbox)
        except BlockingIOError:
            return
        except OSError:  # it died: the reader side sees it
            written = len(self.outbox)
        del self.outbox[:written]
        if not self.outbox and self.selector_loop is not None:
            self.selector_loop.remove_writer(self.to_child)

    async def write_loop(self) -> None:
        """Drain the write buffer whenever the pipe has room (a frame larger than the pipe, say)."""
        while not self.closed and self.to_child is not None:
            if not self.outbox:
                self.wake_writer = anyio.Event()
                await self.wake_writer.wait()
                continue
            try:
                await anyio.wait_writable(self.to_child)
                written = os.write(self.to_child, self.outbox)
            except BlockingIOError:
                continue
            except (OSError, anyio.ClosedResourceError):
                return  # it died: the reader sees it
            del self.outbox[:written]

    async def read_loop(self, handle: Callable[[Worker], None]) -> None:
        """After each read, have `handle` take the complete frames; return at EOF or once it is broken."""
        while True:
            handle(self)
            if self.broken:
                return
            try:
                await anyio.wait_readable(self.from_child)
            except (anyio.ClosedResourceError, OSError):
                return
            if not self.read_available():
                return

    def unread_bytes(self) -> int:
        """How many bytes written for the worker it has not read: in its task pipe, and not yet written."""
        return len(self.outbox) + (_in_pipe(self.to_child) if self.to_child is not None else 0)

    def answers_waiting(self) -> bool:
        """Whether the worker wrote what the pool has not read yet (its answer pipe holds bytes)."""
        return _in_pipe(self.from_child) > 0

    def close_input(self) -> None:
        """Close the worker's task pipe: it exits once it has answered what it holds (a stop, not a kill)."""
        fd, self.to_child = self.to_child, None
        if fd is None:
            return
        self.outbox.clear()
        if self.selector_loop is not None:
            with contextlib.suppress(Exception):
                self.selector_loop.remove_writer(fd)
        if self.wake_writer is not None:
            self.wake_writer.set()
        with contextlib.suppress(Exception):  # in an asyncio selector callback there is no task to tell
            anyio.notify_closing(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


# Every live worker of every pool, so that a child forked from the server (the fork driver's, a
# multiprocessing one) lets go of their pipes: holding them, it would keep the workers alive after the
# server died, and could corrupt their protocol by using them.
_live_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


def _forget_workers_in_forked_child() -> None:
    for worker in list(_live_workers):
        worker.close_quietly()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_workers_in_forked_child)


def _in_pipe(fd: int) -> int:
    """How many bytes a pipe holds (FIONREAD; 0 where that cannot be known)."""
    try:
        import fcntl
        import termios

        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except (ImportError, OSError):  # pragma: no cover - not Linux
        return 0
