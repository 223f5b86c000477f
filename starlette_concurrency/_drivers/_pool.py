"""The multiplexed pool behind the `process` driver: one queue, every call, every worker.

```
 execute(tasks)          pool                                     readers (one per worker)   workers
 ──────────────          ────                                     ────────────────────────   ───────
 pickle each task  ──▶  queue: run() tasks ┐ FIFO,
 (dumps_task; nothing    deferred tasks    ┘ run() first
 runs if one fails)       dispatch: idle worker ← a chunk    ── TASKS [(id, payload)…] ──▶  run in order
 await the call's event         busy worker ← one more chunk
                                (long queue only: window 2)  ◀── answer (id, result) ──────  one per task
                                                              id == first in flight? else protocol error
 outcomes[i] ◀─────────────────────────────────────────────── settle the task's call; dispatch again
```

A call never owns a worker: its tasks join the queue, and the answers are delivered to it as they
arrive, from whichever worker. A worker that answered takes the next queued task at once.

**Priorities.** Tasks of `run()` go first. Deferred tasks (`execute(..., background=True)`) may
occupy at most ``workers - 1`` workers (one when there is a single worker), so that a `run()` never
waits for deferred work while there are two workers or more. With a single worker it waits for the
task in progress (the documented cost of ``workers=1``). Within a priority, FIFO by arrival.

**Window.** An idle worker gets a chunk of up to ``len(queue) / (4 * workers)`` tasks (at least one,
at most 128). A busy worker gets a second frame only while at least `workers` `run()` tasks are
queued and it holds no deferred task: short tasks then never wait for a round trip, and a long task
never sits behind another while a worker is idle unless the queue is long.

**Who reads the pipes.** Each worker has a reader: a task of the event loop the pool is used from
(`trio.lowlevel.spawn_system_task`, or an asyncio task), started with the worker or when the pool is
first used from a new loop. Nothing of the pool is bound to a loop that has ended: a pool used from
another loop (each test; a TestClient without lifespan) forgets the old readers and starts new ones.
The pool must be used from one event loop at a time.

**Failures.** Every answer names its task id; one that does not name the first task in flight is a
protocol error: the worker is killed and every task it held fails with `WorkerCrashed` (a wrong
answer is never returned). A worker that dies (EOF, or its exit event) fails the task it was
running with `WorkerCrashed`; the tasks behind it go back to the front of the queue, unstarted. A
cancelled call (a timeout, a client gone) drops its queued tasks and kills the workers running one
of its tasks (their process groups), giving every other task they held back to the queue; a task of
it queued behind another call's task on a worker is stopped when its turn comes.

**Seam for the function cache.** `_frame_for(worker, jobs)` composes every TASKS frame for one
worker: a definitions blob (empty today; what that worker has not seen yet) and the (id, payload)
entries, each payload pickled once at call time by `_pickling.dumps_task`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import sniffio

from .. import _protocol
from .._exceptions import ConcurrencyClosed, WorkerCrashed, WorkerStartFailed
from .._pickling import decode_outcome, describe_failure, dumps_task
from .._stats import Stats, TaskCounters
from .._tasks import Outcome, Task
from ._child import Child

logger = logging.getLogger("starlette_concurrency")

_MAX_CHUNK = 128
_WINDOW = 2  # frames in flight per worker
_START_ATTEMPTS = 3  # a worker killed by a signal while starting is tried again this many times in a row
_STOP_GRACE = 2.0  # seconds a closed worker gets to exit before it is killed


@dataclass(eq=False, slots=True)
class _Call:
    tasks: Sequence[Task]
    outcomes: list[Outcome | None]
    background: bool
    remaining: int
    done: anyio.Event = field(default_factory=anyio.Event)
    abandoned: bool = False
    error: BaseException | None = None  # the pool failed the call as a whole (closed, workers cannot start)

    def settle(self, index: int, outcome: Outcome) -> None:
        if self.outcomes[index] is None:
            self.outcomes[index] = outcome
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = self.error or error
        self.done.set()


@dataclass(eq=False, slots=True)
class _Job:
    id: int
    call: _Call
    index: int
    payload: bytes
    sent_at: float = 0.0

    @property
    def task(self) -> Task:
        return self.call.tasks[self.index]


class Worker(Child):
    """A pool worker: its process, what it holds in flight, and its reader."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ready = False
        self.retired = False
        self.inflight: deque[_Job] = deque()
        self.frame_sizes: deque[int] = deque()  # tasks per frame in flight
        self.outbox = bytearray()
        self.wake_writer: anyio.Event | None = None
        self.loop: object = None  # the event loop its reader runs in
        self.scope: anyio.CancelScope | None = None
        self.tasks_done = 0
        self.last_answer = 0.0
        self.start_attempt = 0
        self.dead = False  # gone or going: nothing more is sent to it
        self.stopped_at = 0.0
        _live_workers.add(self)


# Every live worker of every pool, so that a child forked from the server (the fork driver's, a
# multiprocessing one) lets go of their pipes: holding them, it would keep the workers alive after the
# server died, and could corrupt their protocol by using them.
_live_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


def _forget_workers_in_forked_child() -> None:
    for worker in list(_live_workers):
        worker.close_quietly()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_forget_workers_in_forked_child)


class Pool:
    """The queue, the workers and the readers; `ProcessDriver` is its public face."""

    def __init__(
        self,
        size: int,
        spawn: Callable[[], Awaitable[Worker]],
        *,
        name: str = "process",
        max_tasks_per_worker: int | None = None,
        over_memory: Callable[[Worker], bool] | None = None,
    ) -> None:
        self.size = size
        self.name = name
        self._spawn_worker = spawn
        self.max_tasks_per_worker = max_tasks_per_worker
        self._over_memory = over_memory
        self.workers: list[Worker] = []
        self.counters = TaskCounters()
        self._run: deque[_Job] = deque()
        self._deferred: deque[_Job] = deque()
        self._calls: set[_Call] = set()
        self._ids = 0
        self._spawning = 0
        self._stopping: list[Worker] = []
        self._start_error: WorkerStartFailed | None = None  # for start() to raise
        self._last_start_error: WorkerStartFailed | None = None
        self._loop: object = None
        self._pid = os.getpid()
        self._tasks: set[Any] = set()  # asyncio readers: a strong reference while they run
        self.closed = False

    # Calls ---------------------------------------------------------------------------------------

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None], *, background: bool) -> None:
        payloads = []
        for number, task in enumerate(tasks):  # all of it before anything is queued: nothing runs if one fails
            payloads.append(dumps_task(task))
            if number % 256 == 255:  # pickling 20,000 closures takes a while: let the server breathe
                await anyio.lowlevel.checkpoint()
        self.check_open()
        if not tasks:
            return
        self._bind_loop()
        if self._live() + self._spawning < self.size:  # first use, or workers that left (idle timeout, killed)
            await self.start()
        call = _Call(tasks, outcomes, background, len(tasks))
        queue = self._deferred if background else self._run
        for index, payload in enumerate(payloads):
            self._ids += 1
            queue.append(_Job(self._ids, call, index, payload))
        self._calls.add(call)
        try:
            self._grow()
            self._dispatch()
            await call.done.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._abandon(call)
            raise
        finally:
            self._calls.discard(call)
        if call.error is not None:
            raise call.error

    async def _abandon(self, call: _Call) -> None:
        """Stop exactly the call's unfinished tasks: drop the queued ones, kill the workers running one."""
        if call.remaining == 0 or call.abandoned:
            return
        call.abandoned = True
        stopped = 0
        for queue in (self._run, self._deferred):
            kept = [job for job in queue if job.call is not call]
            stopped += len(queue) - len(kept)
            queue.clear()
            queue.extend(kept)
        for worker in list(self.workers):
            if worker.inflight and worker.inflight[0].call is call:
                stopped += sum(job.call is call for job in worker.inflight)
                await self._retire(worker, "timeout or cancellation", task=worker.inflight[0].task)
            else:
                stopped += sum(job.call is call for job in worker.inflight)  # stopped when their turn comes
        self.counters.timed_out += stopped
        self._dispatch()

    # Workers -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start workers up to the pool's size and wait until each is ready or has failed.

        Raises:
            WorkerStartFailed: a worker could not start (its initializer raised, say).
        """
        self.check_open()
        self._bind_loop()
        self._start_error = None
        missing = self.size - self._live() - self._spawning
        if missing > 0:
            async with anyio.create_task_group() as tg:
                for _ in range(missing):
                    tg.start_soon(self._add_worker)
            logger.info("%s pool started with %d workers", self.name, len(self.workers), extra={"driver": self.name})
        while self._start_error is None and (self._spawning or any(not w.ready for w in self.workers)):  # noqa: ASYNC110
            await anyio.sleep(0.005)  # start-up only; the readers do the work
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            with anyio.CancelScope(shield=True):
                while any(not w.ready for w in self.workers) or self._spawning:  # noqa: ASYNC110
                    await anyio.sleep(0.005)  # the failed ones are being buried: none may be left behind
            raise error

    async def _add_worker(self, attempt: int = 0) -> None:
        self._spawning += 1
        try:
            with anyio.CancelScope(shield=True):  # a worker started must be known, or it would be lost
                worker = await self._spawn_worker()
        except OSError as exc:  # EAGAIN, ENOMEM, an interpreter that is gone
            self._start_error = WorkerStartFailed(f"a {self.name} worker could not be started: {exc!r}")
            return
        finally:
            self._spawning -= 1
        worker.start_attempt = attempt
        self.workers.append(worker)
        if self.closed:  # closed while it was being spawned
            await self._retire(worker, "pool closed", replace=False)
            return
        self._serve_soon(worker)

    def _grow(self) -> None:
        """Start workers in the background up to the pool's size (after idle exits) while work waits."""
        missing = self.size - self._live() - self._spawning
        if missing > 0 and (self._run or self._deferred) and not self.closed:
            for _ in range(missing):
                self._launch(self._add_worker)

    def _live(self) -> int:
        """Count the workers that are not gone; an idle one found dead is marked so (its reader buries it)."""
        live = 0
        for worker in self.workers:
            if not worker.dead and not worker.inflight and worker.poll():
                worker.dead = True  # killed from outside while idle: nothing may be sent to it
            live += not worker.dead
        return live

    def _bind_loop(self) -> None:
        """Start readers in this event loop for the workers whose reader ran in another (now ended) one."""
        if os.getpid() != self._pid:
            raise RuntimeError("a process pool cannot be used in a process forked from the one that started it")
        token = anyio.lowlevel.current_token()
        if token == self._loop:
            return
        self._loop = token
        self._tasks.clear()
        for worker in self.workers:
            worker.scope = None
            worker.wake_writer = None
            self._serve_soon(worker)

    def _launch(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run `fn(*args)` as a task of the current event loop that no caller waits for."""
        if sniffio.current_async_library() == "trio":
            import trio

            trio.lowlevel.spawn_system_task(self._guarded, fn, *args)
        else:
            import asyncio

            task = asyncio.get_running_loop().create_task(self._guarded(fn, *args), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _guarded(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:  # a bug of ours must not end the server's event loop (trio's system tasks would)
            logger.exception("the %s pool's background task failed", self.name, extra={"driver": self.name})

    def _serve_soon(self, worker: Worker) -> None:
        worker.loop = self._loop
        self._launch(self._serve, worker)

    async def _serve(self, worker: Worker) -> None:
        """Read one worker's answers (and write its frames) until it is gone; then bury it."""
        reason = "exit"
        with anyio.CancelScope() as scope:
            worker.scope = scope
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write, worker)
                tg.start_soon(self._watch_exit, worker, tg.cancel_scope)
                reason = await self._read(worker)
                tg.cancel_scope.cancel()
        if worker.retired or worker.scope is not scope:
            return  # retired by the pool, or its loop moved on: not a death
        worker.dead = True
        with anyio.CancelScope(shield=True):
            await self._bury(worker, reason)

    async def _watch_exit(self, worker: Worker, scope: anyio.CancelScope) -> None:
        await worker.wait_exit()
        scope.cancel()

    async def _write(self, worker: Worker) -> None:
        while not worker.closed and worker.to_child is not None:
            if not worker.outbox:
                worker.wake_writer = anyio.Event()
                await worker.wake_writer.wait()
                continue
            try:
                await anyio.wait_writable(worker.to_child)
                written = os.write(worker.to_child, worker.outbox)
            except BlockingIOError:
                continue
            except (OSError, anyio.ClosedResourceError):
                return  # it died: the reader sees it
            del worker.outbox[:written]

    def _send(self, worker: Worker, data: bytes) -> None:
        if not worker.outbox and worker.to_child is not None:
            try:
                written = os.write(worker.to_child, data)
            except BlockingIOError:
                written = 0
            except OSError:
                return  # it died: its reader sees it and gives the tasks back
            data = data[written:]
        if data:
            worker.outbox += data
            if worker.wake_writer is not None:
                worker.wake_writer.set()

    async def _read(self, worker: Worker) -> str:
        """Handle frames as they come; return why the worker is gone ("exit": EOF, or it exited)."""
        try:
            while True:
                while (message := worker.frames.next()) is not None:
                    reason = self._handle(worker, *message)
                    if reason is not None:
                        return reason
                try:
                    await anyio.wait_readable(worker.from_child)
                except (anyio.ClosedResourceError, OSError):
                    return "exit"
                if not worker.read_available():
                    return "exit"
        except _protocol.ProtocolError as exc:
            return f"protocol error: {exc}"

    def _handle(self, worker: Worker, tag: bytes, body: bytes) -> str | None:
        if not worker.ready:
            if tag == _protocol.READY:
                worker.ready = True
                self._dispatch()
                return None
            if tag == _protocol.START_FAILED:
                self._start_failed(worker, describe_failure(body, f"a worker (pid {worker.pid}) failed to start"))
                return "start failed"
            raise _protocol.ProtocolError(f"{tag!r} before READY")
        if tag == _protocol.IDLE_EXIT:
            return "idle"
        if tag not in _protocol.ANSWERS:
            raise _protocol.ProtocolError(f"unknown tag {tag!r}")
        task_id, payload = _protocol.split_answer(body)
        if not worker.inflight or worker.inflight[0].id != task_id:
            raise _protocol.ProtocolError(f"an answer for task id {task_id}, which is not the task in progress")
        job = worker.inflight.popleft()
        worker.frame_sizes[0] -= 1
        if not worker.frame_sizes[0]:
            worker.frame_sizes.popleft()
        worker.tasks_done += 1
        now = time.monotonic()
        outcome = decode_outcome(tag, payload, job.task)
        self.counters.record(outcome, now - max(job.sent_at, worker.last_answer))
        worker.last_answer = now
        job.call.settle(job.index, outcome)
        if worker.inflight and worker.inflight[0].call.abandoned:
            return "timeout or cancellation"  # it started a task nobody waits for: stop it
        if not worker.inflight and self._due_for_recycle(worker):
            return "recycle"
        self._dispatch()
        return None

    def _start_failed(self, worker: Worker, error: WorkerStartFailed) -> None:
        self._start_error = self._last_start_error = error
        logger.error("%s", error, extra={"driver": self.name, "worker_pid": worker.pid})

    async def _bury(self, worker: Worker, reason: str) -> None:
        """A worker is gone (or must go): settle what it held, retire it, start its replacement."""
        held = bool(worker.inflight)
        failed: list[tuple[_Job, WorkerCrashed]] = []  # settled once the replacement is in: the pool looks healed
        if reason == "exit":
            try:  # answers written before it died count
                worker.read_available()
                while (message := worker.frames.next()) is not None:
                    handled = self._handle(worker, *message)
                    if handled is not None:
                        if handled in ("idle", "start failed"):
                            reason = handled
                        break
            except _protocol.ProtocolError as exc:
                reason = f"protocol error: {exc}"
        crashed = reason == "exit" or reason.startswith("protocol error")
        if reason == "exit":
            if not await worker.wait_exit_within(1.0):
                worker.kill()  # closed its pipe but lives on
                await worker.wait_exit_within(_STOP_GRACE)
                returncode = None
            else:
                returncode = worker.returncode
        else:
            returncode = None
        task = worker.inflight[0].task if worker.inflight else None
        if crashed and not worker.ready and reason == "exit":  # died before READY
            if returncode is not None and returncode < 0 and worker.start_attempt + 1 < _START_ATTEMPTS:
                await self._retire(worker, "killed while starting", attempt=worker.start_attempt + 1)
                return
            self._start_failed(
                worker,
                WorkerStartFailed.from_returncode(returncode, f"a worker (pid {worker.pid}) failed to start and"),
            )
            reason = "start failed"
        if reason.startswith("protocol error"):
            for job in list(worker.inflight):
                error = WorkerCrashed(
                    f"the worker (pid {worker.pid}) running {job.task.label} broke the protocol ({reason}); "
                    "it was killed"
                )
                failed.append((job, error))
            worker.inflight.clear()
        elif crashed and worker.inflight and reason == "exit":
            job = worker.inflight.popleft()
            what = f"the worker (pid {worker.pid}) running {job.task.label}"
            failed.append((job, WorkerCrashed.from_returncode(returncode, what)))
        idle = not held and not self._run and not self._deferred and reason in ("exit", "idle")
        try:
            await self._retire(worker, reason, task=task, replace=reason != "start failed" and not idle)
        finally:
            for job, error in failed:
                self._fail(job, error)
        if reason == "start failed" and not any(w.ready for w in self.workers) and not self._spawning:
            self._fail_queued(str(self._last_start_error))

    def _fail(self, job: _Job, error: WorkerCrashed) -> None:
        outcome = Outcome(error=error)
        self.counters.record(outcome)
        job.call.settle(job.index, outcome)

    def _fail_queued(self, reason: str) -> None:
        """No worker can start: fail every waiting call with the reason instead of letting it hang."""
        for queue in (self._run, self._deferred):
            while queue:
                queue.popleft().call.fail(WorkerStartFailed(reason))

    async def _retire(
        self, worker: Worker, reason: str, *, task: Task | None = None, replace: bool = True, attempt: int = 0
    ) -> None:
        """Take a worker out of the pool (its tasks in flight back to the queue), stop it, replace it."""
        if worker.retired:
            return
        worker.retired = True
        back = [job for job in worker.inflight if not job.call.abandoned]
        for job in reversed(back):
            (self._deferred if job.call.background else self._run).appendleft(job)
        worker.inflight.clear()
        worker.frame_sizes.clear()
        worker.dead = True
        kill = reason not in ("recycle", "idle", "closing")
        if kill:
            worker.kill()
        else:
            worker.stopped_at = time.monotonic()
            self._stopping.append(worker)  # it exits at the EOF of its task pipe
        if worker.scope is not None:
            worker.scope.cancel()
        if kill:
            with anyio.CancelScope(shield=True):
                await worker.wait_exit_within(_STOP_GRACE)  # killed: reaped at once, never left a zombie
        worker.close()
        with contextlib.suppress(ValueError):
            self.workers.remove(worker)
        extra: dict[str, Any] = {"driver": self.name, "worker_pid": worker.pid}
        if task is not None:
            extra.update(task=task.label, task_key=task.key)
        level = logging.INFO if reason in ("recycle", "idle", "closing", "killed while starting") else logging.WARNING
        if reason != "closing":
            why = "crashed" if reason == "exit" else reason
            logger.log(level, "%s worker (pid %d) retired: %s", self.name, worker.pid, why, extra=extra)
        self._reap()
        if self.closed or not replace:
            return
        if self._live() + self._spawning >= self.size:
            return  # replaced already (a call found it dead and started one)
        self.counters.restarts += 1
        await self._add_worker(attempt)
        self._dispatch()

    def _due_for_recycle(self, worker: Worker) -> bool:
        if self.max_tasks_per_worker is not None and worker.tasks_done >= self.max_tasks_per_worker:
            return True
        return self._over_memory is not None and worker.tasks_done > 0 and self._over_memory(worker)

    def _budget(self, worker: Worker) -> int:
        if self._over_memory is not None and worker.tasks_done and self._over_memory(worker):
            return 0  # let it finish what it holds, then it is recycled
        if self.max_tasks_per_worker is None:
            return _MAX_CHUNK
        return max(0, self.max_tasks_per_worker - worker.tasks_done - len(worker.inflight))

    # Dispatch ------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand queued tasks to workers: idle ones first, run() before deferred, then a second frame."""
        if self.closed:
            return
        ready = [worker for worker in self.workers if worker.ready and not worker.dead]
        deferred_cap = max(1, self.size - 1)
        deferred_busy = sum(1 for worker in ready if any(job.call.background for job in worker.inflight))
        for worker in ready:
            if worker.inflight:
                continue
            if self._run:
                queue = self._run
            elif self._deferred and deferred_busy < deferred_cap:
                queue = self._deferred
                deferred_busy += 1
            else:
                break
            self._send_chunk(worker, queue)
        if len(self._run) >= self.size:
            for worker in ready:
                if not self._run:
                    break
                if (
                    worker.inflight
                    and len(worker.frame_sizes) < _WINDOW
                    and not any(job.call.background for job in worker.inflight)
                ):
                    self._send_chunk(worker, self._run)

    def _send_chunk(self, worker: Worker, queue: deque[_Job]) -> None:
        size = min(self._budget(worker), max(1, min(_MAX_CHUNK, len(queue) // (self.size * 4))))
        jobs: list[_Job] = []
        while queue and len(jobs) < size:
            job = queue.popleft()
            if not job.call.abandoned:
                jobs.append(job)
        if not jobs:
            return
        now = time.monotonic()
        for job in jobs:
            job.sent_at = now
        worker.inflight.extend(jobs)
        worker.frame_sizes.append(len(jobs))
        self._send(worker, self._frame_for(worker, jobs))

    def _frame_for(self, worker: Worker, jobs: list[_Job]) -> bytes:
        """Compose the TASKS frame for one worker (the place to add definitions it has not seen yet)."""
        return _protocol.tasks_frame(b"", [(job.id, job.payload) for job in jobs])

    # Lifecycle -----------------------------------------------------------------------------------

    def _reap(self) -> None:
        now = time.monotonic()
        still = []
        for worker in self._stopping:
            if not worker.poll():
                if now - worker.stopped_at > _STOP_GRACE:
                    worker.kill()
                still.append(worker)
        self._stopping = still

    def check_open(self) -> None:
        if self.closed:
            raise ConcurrencyClosed(f"this {self.name} pool has been closed")

    def stats(self) -> Stats:
        busy = sum(1 for worker in self.workers if worker.inflight)
        return self.counters.snapshot(
            self.name, workers=len(self.workers), busy=busy, queued=len(self._run) + len(self._deferred)
        )

    async def aclose(self) -> None:
        """Stop every worker: close their pipes, give them a moment to exit, then kill their groups."""
        if self.closed:
            return
        self.closed = True
        closed = ConcurrencyClosed(f"this {self.name} pool has been closed")
        for call in list(self._calls):
            call.fail(ConcurrencyClosed(str(closed)))
        self._run.clear()
        self._deferred.clear()
        leaving = list(self.workers)
        with anyio.CancelScope(shield=True):
            for worker in leaving:
                busy = bool(worker.inflight)
                await self._retire(worker, "timeout or cancellation" if busy else "closing", replace=False)
            while self._spawning:  # noqa: ASYNC110 - a worker being spawned is killed as soon as it is known
                await anyio.sleep(0.005)
            for worker in leaving + self._stopping:
                if not await worker.wait_exit_within(_STOP_GRACE):
                    worker.kill()
                    await worker.wait_exit_within(_STOP_GRACE)
                worker.kill()  # the group: what its tasks started
        self._stopping.clear()
