"""The `process` driver: a warm pool of fresh interpreters, each behind a private pair of pipes.

```
 run([t0 … tn])                               ProcessDriver                          workers
 ──────────────                               ─────────────                          ───────
 cut the indices into chunks ──▶ deque[range]
 pickle each chunk in one go (nothing runs if a task will not pickle)
 short call, an idle worker per chunk: send every chunk, then read the answers in turn
 otherwise one lane per worker it may use:
    lane: acquire a worker (FIFO among calls) ─────────────────────────────────────▶ idle worker
          send up to two chunks ahead        ── TASKS [f_i, …]  ──────────────────▶ runs them in order
          read RESULT frames                 ◀─ RESULT (one per task, in order) ──
          outcome[i] = decode(frame)
          worker died → the first unanswered task gets WorkerCrashed, the rest of its
                        chunks go back to the deque, a fresh worker takes its place
          chunk would not unpickle there → its tasks go back one by one; only culprits fail
          cancelled   → a worker holding unanswered tasks is killed and replaced
    release the worker (or hand it to the next waiting call)
```

The caller's own task does all the I/O, straight on the event loop with `anyio.wait_readable` /
`wait_writable`: no background task, no thread, no polling. That is also why the pool can start
lazily inside any request: nothing of it outlives the call that uses it except the processes.

How a worker dies tells the pool what happened: EOF on its result pipe (answers it wrote before dying
are still read and count), or a broken task pipe when we send. Only the first task it had not
answered fails, with `WorkerCrashed`; the rest go back to the call.

What a worker inherits, and what it does not. It is `sys.executable` running `_worker.py`, with no
interpreter flags, started with the server's environment (`os.environ`) and working directory as they
are when that worker starts, and the server's `sys.path` as it was when the pool started (sent in the
INIT frame). stdin is /dev/null; stdout and stderr are the server's, so what a task prints shows in
the server's output. No other file descriptor crosses: `Popen(close_fds=True)` passes only the
worker's two pipe ends, so a listening socket of the server never reaches a worker, even one marked
inheritable. The pipes are anonymous, private to the parent and that one worker: no listening
socket, no path in a shared directory, nothing another user or process can connect to.

Trust model. Payloads are cloudpickle, and unpickling runs code. Only the server produces the task
payloads, from its own callables, and only a worker the server started produces the results, by
running those callables; nothing else can write to these pipes. Never hand `run()` a callable built
from untrusted bytes: that is running untrusted code, pickled or not. Payloads and results are
never logged by the driver.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from .. import _worker
from .._config import Settings, positive
from .._exceptions import ConcurrencyClosed, ConfigurationError, SerializationError, WorkerCrashed
from .._frames import FrameBuffer, grow_pipe
from .._pickling import decode_outcome, dumps, dumps_task, remote_exception
from .._tasks import Outcome, Task
from .base import Driver

__all__ = ["ProcessDriver"]

_WORKER_SCRIPT = _worker.__file__
_MAX_CHUNK = 128  # tasks per TASKS frame: enough to amortise a round trip, small enough to balance
_PIPELINE = 2  # chunks in flight per worker, so that it never waits for the parent between chunks
_START_ATTEMPTS = 3  # for a task, of a worker that gets killed while it starts
_STOP_GRACE = 2.0  # seconds a closed worker gets to exit before it is killed


class _WorkerGone(Exception):
    """The worker's result pipe reached EOF, its task pipe broke, or the pool closed it.

    `untouched` means it cannot have started any task in flight: it said it left on its idle timeout,
    or it was gone before the first byte of the only frame in flight reached it.
    """

    def __init__(self, *, untouched: bool = False) -> None:
        self.untouched = untouched


# Every live worker of every pool, so that a child forked from the server (the fork driver's, a
# multiprocessing one) can let go of their pipes: holding them, it would keep the workers alive
# after the server died, and could corrupt their protocol by using them.
_live_workers: weakref.WeakSet[_Worker] = weakref.WeakSet()


def _forget_workers_in_forked_child() -> None:
    for worker in list(_live_workers):
        if not worker.closed:
            worker.closed = True
            for fd in (worker._to_worker, worker._from_worker):
                with contextlib.suppress(OSError):
                    os.close(fd)


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_workers_in_forked_child)


class _Worker:
    """One worker process and the parent's ends of its two pipes."""

    def __init__(self, init_frame: bytes) -> None:
        task_read, self._to_worker = os.pipe()
        self._from_worker, result_write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, _WORKER_SCRIPT, str(task_read), str(result_write)],
                pass_fds=(task_read, result_write),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (self._to_worker, self._from_worker):
                os.close(fd)
            raise
        finally:
            os.close(task_read)
            os.close(result_write)
        grow_pipe(self._from_worker)
        os.set_blocking(self._to_worker, False)
        os.set_blocking(self._from_worker, False)
        self.pid = self.process.pid
        self.tasks_done = 0
        self.ready = False
        self.closed = False
        self.frames = FrameBuffer()
        # Starting the interpreter takes tens of milliseconds; hand it its configuration now so that
        # it is ready by the time somebody needs it. What does not fit in the pipe goes at handshake.
        try:
            written = os.write(self._to_worker, init_frame)
        except BlockingIOError:
            written = 0
        self._unsent = init_frame[written:]
        _live_workers.add(self)

    def alive(self) -> bool:
        return not self.closed and self.process.poll() is None

    async def handshake(self) -> None:
        """Finish sending the configuration and wait for READY."""
        while self._unsent:  # trimmed as it goes: a cancelled handshake resumes where it stopped
            try:
                self._unsent = self._unsent[os.write(self._to_worker, self._unsent) :]
            except BlockingIOError:
                await _wait(anyio.wait_writable, self._to_worker)
            except BrokenPipeError:
                self._unsent = b""
        message = await self.receive()
        if message is None:
            returncode = await self.exit_status()
            raise WorkerCrashed.from_returncode(returncode, f"a worker (pid {self.pid}) failed to start and")
        tag, body = message
        if tag != _worker.READY:
            type_name, text, traceback = pickle.loads(body)
            error = WorkerCrashed(f"a worker (pid {self.pid}) failed to start: {type_name}: {text}")
            raise remote_exception(error, traceback)
        self.ready = True

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.closed:
                raise _WorkerGone
            try:
                view = view[os.write(self._to_worker, view) :]
            except BlockingIOError:
                await _wait(anyio.wait_writable, self._to_worker)
            except BrokenPipeError:
                raise _WorkerGone(untouched=len(view) == len(data)) from None

    async def receive(self) -> tuple[bytes, bytes] | None:
        """Return the next frame as (tag, body), or None once the worker is gone."""
        while True:
            message = self.frames.next()
            if message is not None:
                return message
            if self.closed:
                return None
            try:
                data = os.read(self._from_worker, 1 << 20)
            except BlockingIOError:
                try:
                    await _wait(anyio.wait_readable, self._from_worker)
                except _WorkerGone:
                    return None
                continue
            if not data:
                return None
            self.frames.feed(data)

    async def exit_status(self) -> int | None:
        """Wait (briefly) for a worker that went away to exit, collect what it wrote before, close it.

        Returns None if it closed its pipe but lives on (it is killed then).
        """
        deadline = time.monotonic() + 1.0
        # A child's exit has no event to wait on short of SIGCHLD, which belongs to the application.
        while (returncode := self.process.poll()) is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.002)
        if returncode is None:
            self.process.kill()
        # A send that failed (the worker had died) may leave answers it wrote before dying unread.
        while not self.closed:
            try:
                data = os.read(self._from_worker, 1 << 20)
            except OSError:  # BlockingIOError: something else holds the pipe open; nothing more of it
                break
            if not data:
                break
            self.frames.feed(data)
        self.close()
        return returncode

    def close(self, *, kill: bool = False) -> None:
        """Close the pipes, which makes an idle worker exit by itself; `kill` does not wait for that."""
        if not self.closed:
            self.closed = True
            for fd in (self._to_worker, self._from_worker):
                anyio.notify_closing(fd)
                os.close(fd)
        if kill and self.process.poll() is None:
            self.process.kill()


async def _wait(wait: Callable[[int], Any], fd: int) -> None:
    try:
        await wait(fd)
    except (anyio.ClosedResourceError, OSError):
        raise _WorkerGone from None


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux, or the worker just exited
        return None


@dataclass(eq=False)
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    worker: _Worker | None = None


@dataclass(eq=False)
class _Call:
    """The state one `execute()` shares between its lanes."""

    tasks: Sequence[Task]
    outcomes: list[Outcome | None]
    chunks: deque[range]
    lanes: int
    frames: dict[range, bytes] = field(default_factory=dict)  # pickled up front, by chunk
    error: Exception | None = None

    def frame(self, chunk: range) -> bytes:
        # What a crash or a split gives back is a part of a chunk that pickled: it pickles again.
        frame = self.frames.pop(chunk, None)
        return frame if frame is not None else _tasks_frame(self.tasks, chunk)


def _tasks_frame(tasks: Sequence[Task], chunk: range) -> bytes:
    """Pickle a chunk's callables in one go (shared code objects and globals are written once).

    Raises:
        SerializationError: naming the first task of the chunk that cannot be pickled.
    """
    try:
        body = dumps([tasks[index].fn for index in chunk])
    except Exception as exc:
        for index in chunk:
            dumps_task(tasks[index])  # raises, naming the culprit
        raise SerializationError(
            f"tasks {chunk.start} to {chunk.stop - 1} cannot be pickled together: {exc!r}"
        ) from exc
    return _worker.HEADER.pack(len(body)) + body


def _record(worker: _Worker, call: _Call, inflight: deque[range], tag: bytes, body: bytes) -> None:
    """Store the outcome a RESULT frame brings: it answers the first unanswered task in flight."""
    if tag == _worker.LOAD_FAILED and len(inflight[0]) > 1:
        # The worker could not unpickle the chunk (a task's module does not import there, say): none
        # of it ran. Send its tasks one by one, so that only the culprits fail, each by name.
        call.chunks.extendleft(range(index, index + 1) for index in reversed(inflight.popleft()))
        return
    index = inflight[0].start
    call.outcomes[index] = decode_outcome(tag, body, call.tasks[index])
    worker.tasks_done += 1
    inflight[0] = inflight[0][1:]
    if not inflight[0]:
        inflight.popleft()


class ProcessDriver(Driver):
    """Run tasks in a warm pool of fresh Python interpreters (`python starlette_concurrency/_worker.py`).

    Workers are started with the server's interpreter, `sys.path`, working directory and environment,
    never by forking the server, so the driver is safe in a threaded server and functions from the
    app's own modules import in them. Tasks, results and exceptions travel pickled (cloudpickle) on
    private pipes; `print()` in a task shows in the server's output and disturbs nothing.

    A worker that dies fails only the task it was running (`WorkerCrashed`) and is replaced. On a
    timeout or a cancellation the workers holding the call's unfinished tasks are killed and replaced.
    Workers exit by themselves when the server goes away, even in the middle of a task.

    Args:
        workers: how many worker processes (default: the CPU count).
        max_tasks_per_worker: replace a worker after it ran this many tasks (default: never).
        idle_timeout: seconds after which an idle worker exits; it is started again on demand.
        max_worker_memory: bytes of resident memory past which a worker is replaced after its task
            (Linux; checked between tasks, not during one).
        initializer: a zero-argument callable each worker runs once at start-up.
        preload: modules each worker imports at start-up, so that the first task does not pay for it.
    """

    name = "process"

    def __init__(
        self,
        workers: int | None = None,
        *,
        max_tasks_per_worker: int | None = None,
        idle_timeout: float | None = None,
        max_worker_memory: int | None = None,
        initializer: Callable[[], object] | None = None,
        preload: Iterable[str] = (),
    ) -> None:
        self.workers: int = positive("workers", workers, int) or os.cpu_count() or 1
        self.max_tasks_per_worker: int | None = positive("max_tasks_per_worker", max_tasks_per_worker, int)
        self.idle_timeout: float | None = positive("idle_timeout", idle_timeout, float)
        self.max_worker_memory: int | None = positive("max_worker_memory", max_worker_memory, int)
        if initializer is not None and not callable(initializer):
            raise ConfigurationError(f"initializer must be callable, not {type(initializer).__name__}")
        self._config = {
            "preload": list(preload),
            "initializer": dumps(initializer) if initializer is not None else None,
            "idle_timeout": self.idle_timeout,
        }
        self._init_frame = self._build_init_frame()
        self._pool: set[_Worker] = set()
        self._idle: list[_Worker] = []
        self._waiters: deque[_Waiter] = deque()
        self._stopping: list[tuple[subprocess.Popen[bytes], float]] = []
        self._closed = False

    def _build_init_frame(self) -> bytes:
        # sys.path as it is when the pool starts, not when the driver was built: an app may extend it
        # between the two, and cwd and the environment are the ones of the moment a worker starts too.
        body = pickle.dumps({**self._config, "sys_path": list(sys.path)})
        return _worker.HEADER.pack(len(body)) + body

    @property
    def pids(self) -> list[int]:
        """The process ids of the current workers (for tests, metrics and the curious)."""
        return sorted(worker.pid for worker in self._pool)

    async def start(self) -> None:
        """Start every worker and wait until all of them are ready; after `aclose()`, start afresh.

        Raises:
            WorkerCrashed: a worker failed to start (its initializer raised, say).
        """
        self._closed = False
        if not self._pool:
            self._init_frame = self._build_init_frame()
        fresh = [self._spawn() for _ in range(self.workers - len(self._pool))]
        errors: list[Exception] = []
        async with anyio.create_task_group() as tg:
            for worker in fresh:
                tg.start_soon(self._warm, worker, errors)
        if errors:
            raise errors[0]

    async def _warm(self, worker: _Worker, errors: list[Exception]) -> None:
        try:
            await worker.handshake()
        except WorkerCrashed as exc:
            errors.append(exc)
            self._replace(worker, kill=True)
        except BaseException:
            self._release(worker)
            raise
        else:
            self._release(worker)

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        """Run the tasks on the pool; see `Driver.execute`."""
        self._check_open()
        size = max(1, min(_MAX_CHUNK, len(tasks) // (self.workers * 4)))
        chunks = deque(range(start, min(start + size, len(tasks))) for start in range(0, len(tasks), size))
        call = _Call(tasks, outcomes, chunks, min(len(chunks), self.workers))
        for number, chunk in enumerate(chunks):  # all of it before anything is sent: nothing runs if one fails
            call.frames[chunk] = _tasks_frame(tasks, chunk)
            if number % 8 == 7:  # pickling 20,000 closures takes a while: let the server breathe
                await anyio.lowlevel.checkpoint()
        lanes = call.lanes
        if 1 < len(chunks) <= len(self._idle) and not self._waiters:
            ready = [worker for worker in self._idle[-len(chunks) :] if worker.ready and worker.alive()]
            if len(ready) == len(chunks):
                del self._idle[-len(chunks) :]
                await self._scatter(call, ready)
        if lanes == 1 or len(call.chunks) == 1:
            await self._lane(call)
        elif call.chunks:
            async with anyio.create_task_group() as tg:
                for _ in range(lanes):
                    tg.start_soon(self._guarded_lane, call, tg.cancel_scope)
            if call.error is not None:
                raise call.error

    async def _scatter(self, call: _Call, workers: list[_Worker]) -> None:
        """A short call with a ready idle worker per chunk: all chunks sent first, answers read in turn.

        What one lane per worker would do, minus the task group, which costs a two-task call about 40%
        of its time. Chunks a crash gives back are left in `call.chunks` for the lanes.
        """
        held = [(worker, deque([chunk])) for worker, chunk in zip(workers, call.chunks, strict=True)]
        call.chunks.clear()
        try:
            for worker, inflight in held:
                try:
                    await worker.send(call.frame(inflight[0]))
                except _WorkerGone:
                    call.chunks.append(inflight.popleft())  # no byte of it arrived (one frame in flight)
            while held:
                worker, inflight = held.pop(0)
                await self._finish(worker, call, inflight)
        except BaseException:
            for worker, inflight in held:
                self._give_back(worker, inflight)
            raise

    async def _guarded_lane(self, call: _Call, scope: anyio.CancelScope) -> None:
        # A lane fails only when the pool itself does (closed, or workers that cannot start); the
        # first such error is the call's, raised as itself rather than inside an ExceptionGroup.
        try:
            await self._lane(call)
        except Exception as exc:
            call.error = call.error or exc
            scope.cancel()

    async def _lane(self, call: _Call) -> None:
        """Feed the call's chunks to one worker at a time until none is left."""
        while call.chunks:
            worker = await self._acquire()
            if not call.chunks:  # other lanes finished the work while this one waited
                self._release(worker)
                return
            await self._finish(worker, call, deque())

    async def _finish(self, worker: _Worker, call: _Call, inflight: deque[range]) -> None:
        """Feed `worker` from the call and collect its answers; then release, bury or kill it."""
        try:
            await self._feed(worker, call, inflight)
        except _WorkerGone as gone:
            await self._bury(worker, call, inflight, ran=not gone.untouched)
        except BaseException:
            self._give_back(worker, inflight)
            raise
        else:
            self._release(worker)

    def _give_back(self, worker: _Worker, inflight: deque[range]) -> None:
        """Return a worker on the way out of a cancelled or failed call."""
        if inflight:  # it holds tasks of ours that must not go on running
            self._replace(worker, kill=True)
        else:
            self._release(worker)

    async def _feed(self, worker: _Worker, call: _Call, inflight: deque[range]) -> None:
        while call.chunks or inflight:
            budget = self._budget(worker, inflight)
            while call.chunks and budget and (not inflight or self._may_pipeline(call, inflight)):
                chunk = call.chunks.popleft()
                if len(chunk) > budget:
                    call.chunks.appendleft(chunk[budget:])
                    chunk = chunk[:budget]
                budget -= len(chunk)
                inflight.append(chunk)
                try:
                    await worker.send(call.frame(chunk))
                except _WorkerGone as gone:
                    if gone.untouched and len(inflight) > 1:  # but it may have been running the one before
                        raise _WorkerGone from None
                    raise
            if not inflight:
                return  # the worker is due for replacement; _release sees to it
            message = await worker.receive()
            if message is None:
                raise _WorkerGone
            tag, body = message
            if tag == _worker.IDLE_EXIT:
                raise _WorkerGone(untouched=True)
            _record(worker, call, inflight, tag, body)
            if not inflight and self._waiters:
                return  # another call is waiting: take turns

    def _may_pipeline(self, call: _Call, inflight: deque[range]) -> bool:
        # A second chunk in flight saves the worker a round trip, but only while every other lane
        # of the call still has a chunk to take and no other call is waiting for a worker.
        return len(inflight) < _PIPELINE and len(call.chunks) >= call.lanes and not self._waiters

    def _budget(self, worker: _Worker, inflight: deque[range]) -> int:
        if self.max_worker_memory is not None and worker.tasks_done and self._over_memory(worker):
            return 0  # let it finish what it holds, then _release replaces it
        if self.max_tasks_per_worker is None:
            return _MAX_CHUNK * _PIPELINE
        return max(0, self.max_tasks_per_worker - worker.tasks_done - sum(map(len, inflight)))

    async def _bury(self, worker: _Worker, call: _Call, inflight: deque[range], *, ran: bool) -> None:
        """A worker died: fail the task it was running, give the others back to the call, replace it."""
        try:
            returncode = await worker.exit_status()
        finally:  # even when cancelled meanwhile: a worker nobody releases is lost to the pool
            self._replace(worker, kill=True)
        self._check_open()
        while ran and inflight and (message := worker.frames.next()) is not None:
            if message[0] == _worker.IDLE_EXIT:  # it left on its idle timeout before our send reached it
                ran = False
            else:
                _record(worker, call, inflight, *message)  # answered before it died: these tasks did run
        if inflight and ran:
            index = inflight[0].start
            task = call.tasks[index]
            crashed = WorkerCrashed.from_returncode(returncode, f"the worker (pid {worker.pid}) running {task.label}")
            call.outcomes[index] = Outcome(error=crashed)
            inflight[0] = inflight[0][1:]
        call.chunks.extendleft(reversed([chunk for chunk in inflight if chunk]))

    async def _acquire(self) -> _Worker:
        self._check_open()
        self._reap()
        if self._idle and not self._waiters:
            worker = self._idle.pop()
        else:
            if not self._pool:
                await self.start()
                return await self._acquire()
            waiter = _Waiter()
            self._waiters.append(waiter)
            try:
                await waiter.event.wait()
            except BaseException:
                if waiter.worker is not None:
                    self._release(waiter.worker)
                else:
                    self._waiters.remove(waiter)
                raise
            self._check_open()
            assert waiter.worker is not None
            worker = waiter.worker
        for attempt in range(_START_ATTEMPTS):
            if not worker.alive():  # it left while idle: idle timeout, or killed from outside
                worker = self._replace(worker, release=False)
            if worker.ready:
                return worker
            try:
                await worker.handshake()
            except WorkerCrashed as exc:
                # Killed by a signal while starting (from outside: no task of ours ran) is worth another
                # try; failing to start by itself (an initializer that raises...) would only fail again.
                if exc.signal is None or attempt == _START_ATTEMPTS - 1:
                    self._replace(worker, kill=True)
                    raise
                worker = self._replace(worker, kill=True, release=False)
            except BaseException:
                self._release(worker)
                raise
            else:
                return worker
        raise AssertionError("unreachable")  # pragma: no cover

    def _release(self, worker: _Worker) -> None:
        if self._closed:
            self._retire(worker)
            return
        if not worker.alive() or self._due_for_replacement(worker):
            self._replace(worker)  # a dead one too (killed from outside, say): the pool keeps its size
            return
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.worker = worker
            waiter.event.set()
        else:
            self._idle.append(worker)

    def _due_for_replacement(self, worker: _Worker) -> bool:
        if self.max_tasks_per_worker is not None and worker.tasks_done >= self.max_tasks_per_worker:
            return True
        return self.max_worker_memory is not None and worker.tasks_done > 0 and self._over_memory(worker)

    def _over_memory(self, worker: _Worker) -> bool:
        rss = _rss(worker.pid)
        return rss is not None and self.max_worker_memory is not None and rss > self.max_worker_memory

    def _replace(self, worker: _Worker, *, kill: bool = False, release: bool = True) -> _Worker:
        """Retire `worker` and start a fresh one in its place; hand it on unless told not to.

        Raises:
            ConcurrencyClosed: only when `release` is false (the caller wants a worker) and the pool
                was closed; otherwise nothing is started after `aclose()`.
        """
        self._retire(worker, kill=kill)
        if self._closed and release:
            return worker
        self._check_open()
        fresh = self._spawn()
        if release:
            self._release(fresh)
        return fresh

    def _spawn(self) -> _Worker:
        worker = _Worker(self._init_frame)
        self._pool.add(worker)
        return worker

    def _retire(self, worker: _Worker, *, kill: bool = False) -> None:
        self._pool.discard(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        worker.close(kill=kill)
        self._stopping.append((worker.process, time.monotonic()))

    def _reap(self) -> None:
        """Collect the exit status of retired workers, killing those that overstay their grace period."""
        now = time.monotonic()
        still = []
        for process, retired_at in self._stopping:
            if process.poll() is None:
                if now - retired_at > _STOP_GRACE:
                    process.kill()
                still.append((process, retired_at))
        self._stopping = still

    def _check_open(self) -> None:
        if self._closed:
            raise ConcurrencyClosed("this process pool has been closed")

    async def aclose(self) -> None:
        """Stop every worker: close their pipes, give them a moment to exit, then kill what is left."""
        if self._closed:
            return
        self._closed = True
        for worker in list(self._pool):
            self._retire(worker)
        for waiter in self._waiters:
            waiter.event.set()
        self._waiters.clear()
        deadline = time.monotonic() + _STOP_GRACE
        with anyio.CancelScope(shield=True):
            while any(p.poll() is None for p, _ in self._stopping) and time.monotonic() < deadline:  # noqa: ASYNC110
                await anyio.sleep(0.005)
        for process, _ in self._stopping:
            if process.poll() is None:
                process.kill()
                process.wait()
        self._stopping.clear()


def create(settings: Settings) -> ProcessDriver:
    """Build the driver from a facade's settings."""
    return ProcessDriver(
        settings.workers,
        max_tasks_per_worker=settings.max_tasks_per_worker,
        idle_timeout=settings.idle_timeout,
        max_worker_memory=settings.max_worker_memory,
        initializer=settings.initializer,
        preload=settings.preload,
    )
