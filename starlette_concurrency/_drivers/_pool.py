"""The multiplexed pool behind the `process` driver: one queue, every call, every worker.

```
 execute(tasks)          pool                                     readers (one per worker)   workers
 ──────────────          ────                                     ────────────────────────   ───────
 pickle the tasks  ──▶  queue: run() tasks ┐ FIFO,
 (long call: groups,     deferred tasks    ┘ run() first
 one dump each;           dispatch: idle worker ← a chunk    ── TASKS [entries…] ──────▶  run in order
 nothing runs if one            busy worker ← one more chunk    (a task, or a range
 fails)                         (long queue only: window 2)      of a group)
 await the call's event                                      ◀── answer (id, result) ──────  one per task
                                                              id == first in flight? else protocol error
 outcomes[i] ◀─────────────────────────────────────────────── settle its call; dispatch once per read
```

A call never owns a worker: its tasks join the queue, and the answers are delivered to it as they
arrive, from whichever worker. A worker that answered takes the next queued task at once.

**Priorities.** Tasks of `run()` go first. Deferred tasks (`execute_deferred()`) may
occupy at most ``workers - 1`` workers (one when there is a single worker), so that a `run()` never
waits for deferred work while there are two workers or more. With a single worker it waits for the
task in progress (the documented cost of ``workers=1``). Within a priority, FIFO by arrival.

**Window.** An idle worker gets a chunk of up to ``len(queue) / (4 * workers)`` tasks (at least one,
at most 128). A busy worker gets a second frame only while at least `workers` `run()` tasks are
queued and it holds no deferred task: short tasks then never wait for a round trip, and a long task
never sits behind another while a worker is idle unless the queue is long.

**Who reads the pipes.** The event loop the pool is used from, never a caller. On asyncio, the
loop's selector calls each worker's read callback (`Worker.attach`), which delivers answers at once;
on trio, each worker has a reader system task (`trio.lowlevel.spawn_system_task`). Both are set up
with the worker, or when the pool is first used from a new loop: nothing of the pool stays bound to
a loop that has ended (each test; a TestClient without lifespan). The pool serves one event loop at
a time; used from a second one while the first still runs, it raises `RuntimeError`.

**Failures.** Every answer names its task id; one that does not name the first task in flight is a
protocol error: the worker is killed and every task it held fails with `WorkerCrashed` (a wrong
answer is never returned). A worker that dies (EOF, or its exit event) fails the task it was
running with `WorkerCrashed`; the tasks behind it go back to the front of the queue, unstarted. A
cancelled call (a timeout, a client gone) drops its queued tasks and kills the workers running one
of its tasks (their process groups), giving every other task they held back to the queue; a task of
it queued behind another call's task on a worker is stopped when its turn comes.

**Modules.** This one: calls, the queue, dispatch. `_answers.py`: the answers (and every other
frame a worker writes). `_feed.py`: calls, jobs and the `Worker` with its pipes' read and write
loops. `_lifecycle.py`: burying, retiring and replacing workers. `_child.py`: the process handle
shared with the fork driver. `_protocol.py`: the frames.

**Pickling** (`_pickling.py`, `_closures.py`). At call time, before anything is queued: a call of at
least ``32 * workers`` tasks in groups of ``len(tasks) / (8 * workers)`` (at most 32), each group one
dump (`pickle_group`: what its tasks share is pickled once; a dump that fails is done again task by
task, to name the task), a shorter call task by task (`pickle_task`). A job is a task with its
payload and, for a group, its slot in it; `_frame_for` makes consecutive jobs of one group one entry
(the group's payload, the range to run). A group the worker cannot load comes back as RESEND: its
tasks go back to the front of the queue, each pickled again on its own, so that only the one that
will not load fails. Lambdas and closures travel as a skeleton key and their current state:
`_frame_for` also sends the skeletons the worker lacks (its `WorkerMirror` knows, and evicts with its
bound). A new worker has a new, empty mirror.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import sniffio

from .. import _protocol
from .._closures import ClosureCache, Payload, Skeleton
from .._exceptions import ConcurrencyClosed, WorkerStartFailed
from .._pickling import pickle_group, pickle_task
from .._stats import Stats, TaskCounters
from .._tasks import Outcome, Task
from ._answers import Answers
from ._feed import Call, Job, Worker, launch

__all__ = ["Pool", "Worker"]

logger = logging.getLogger("starlette_concurrency")

_MAX_CHUNK = 128
_MIN_GROUP, _MAX_GROUP = 4, 32  # tasks pickled in one dump (see _pickle)
_WINDOW = 2  # frames in flight per worker


def _running(token: Any) -> bool:
    """Whether the event loop of an anyio token is still running (its tasks may still run)."""
    native = token.native_token
    if hasattr(native, "is_running"):  # asyncio
        return bool(native.is_running())
    try:  # trio: a token of a finished run refuses new callbacks
        native.run_sync_soon(lambda: None)
    except Exception:
        return False
    return True


class Pool(Answers):
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
        self.warned_slow_import = False
        self._run: deque[Job] = deque()
        self._deferred: deque[Job] = deque()
        self._calls: set[Call] = set()
        self._closures = ClosureCache()  # lambdas and closures: what stays the same is sent once per worker
        self._ids = secrets.randbits(48)  # ids nobody outside can guess from a count of tasks
        self._spawning = 0
        self._stopping: list[Worker] = []
        self._start_error: WorkerStartFailed | None = None  # for start() to raise
        self._last_start_error: WorkerStartFailed | None = None
        self._loop: object = None
        self._asyncio_loop: asyncio.AbstractEventLoop | None = None  # the native loop of _loop, on asyncio
        self.pid = os.getpid()  # the process the pool belongs to: a forked child must make its own
        self._tasks: set[Any] = set()  # asyncio readers: a strong reference while they run
        self.closed = False

    # Calls ---------------------------------------------------------------------------------------

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None], *, background: bool) -> None:
        payloads = await self._pickle(tasks)  # all of it before anything is queued: nothing runs if one fails
        self.check_open()
        if not tasks:
            return
        self._bind_loop()
        if self._live() + self._spawning < self.size:  # first use, or workers that left (idle timeout, killed)
            await self.start()
        call = Call(tasks, outcomes, background, len(tasks))
        queue = self._deferred if background else self._run
        ids = self._ids
        for index, (payload, slot) in enumerate(payloads):
            queue.append(Job(ids + index + 1, call, index, payload, slot))
        self._ids = ids + len(payloads)
        self._calls.add(call)
        try:
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

    async def _pickle(self, tasks: Sequence[Task]) -> list[tuple[Payload, int]]:
        """Pickle a call's tasks: (payload, slot) per task, a slot >= 0 for a task pickled in a group.

        Tasks of a long call are pickled in groups, one dump each (see `pickle_group`): the dispatch
        cuts chunks for the workers as it goes, so a group is small enough that it seldom straddles two.
        """
        group = min(_MAX_GROUP, len(tasks) // (8 * self.size))
        step = 256 // group * group if group >= _MIN_GROUP else 256  # whole groups between two checkpoints
        payloads: list[tuple[Payload, int]] = []
        for start in range(0, len(tasks), step):
            if start:  # pickling 20,000 closures takes a while: let the server breathe
                await anyio.lowlevel.checkpoint()
            some = tasks[start : start + step]
            if len(some) < 4:  # entering a batch costs more than it saves on a few tasks
                payloads.extend([(pickle_task(task, self._closures), -1) for task in some])
                continue
            with self._closures.batch():  # no await inside: see ClosureCache.batch
                if group < _MIN_GROUP:
                    payloads.extend([(pickle_task(task, self._closures), -1) for task in some])
                    continue
                for first in range(0, len(some), group):
                    members = some[first : first + group]
                    payload = pickle_group(members, self._closures)
                    if payload is None:
                        payloads.extend([(pickle_task(task, self._closures), -1) for task in members])
                    else:
                        payloads.extend([(payload, slot) for slot in range(len(members))])
        return payloads

    async def _abandon(self, call: Call) -> None:
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
        if os.getpid() != self.pid:
            raise RuntimeError("a process pool cannot be used in a process forked from the one that started it")
        if self._asyncio_loop is not None and asyncio._get_running_loop() is self._asyncio_loop:
            return  # the asyncio loop it is bound to (asking anyio for a token costs as much as the rest)
        token = anyio.lowlevel.current_token()
        if token == self._loop:
            return
        if self._loop is not None and _running(self._loop):
            # Its readers live in that loop: a second loop reading the same pipes would split frames.
            raise RuntimeError(
                f"this {self.name} pool is in use by another event loop that is still running; a pool serves "
                "one event loop at a time (one loop after another is fine)"
            )
        self._loop = token
        native = token.native_token
        self._asyncio_loop = native if isinstance(native, asyncio.AbstractEventLoop) else None
        self._tasks.clear()
        for worker in self.workers:
            worker.detach()
            worker.scope = None
            worker.wake_writer = None
            self._serve_soon(worker)

    def _serve_soon(self, worker: Worker) -> None:
        worker.loop = self._loop
        if sniffio.current_async_library() == "asyncio":
            worker.attach(asyncio.get_running_loop(), self._frames, self._gone, self._answered)
        else:
            launch(self._tasks, self._serve, worker)

    def _gone(self, worker: Worker, reason: str) -> None:
        if not worker.retired:
            worker.dead = True
            launch(self._tasks, self._bury_shielded, worker, reason)

    async def _bury_shielded(self, worker: Worker, reason: str) -> None:
        if not worker.retired:
            with anyio.CancelScope(shield=True):
                await self._bury(worker, reason)

    async def _serve(self, worker: Worker) -> None:
        """Read one worker's answers (and write its frames) until it is gone; then bury it."""
        reason = "exit"
        with anyio.CancelScope() as scope:
            worker.scope = scope
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.write_loop)
                tg.start_soon(self._watch_exit, worker, tg.cancel_scope)
                reason = await worker.read_loop(self._frames, self._answered)
                tg.cancel_scope.cancel()
        if worker.retired or worker.scope is not scope:
            return  # retired by the pool, or its loop moved on: not a death
        worker.dead = True
        with anyio.CancelScope(shield=True):
            await self._bury(worker, reason)

    async def _watch_exit(self, worker: Worker, scope: anyio.CancelScope) -> None:
        await worker.wait_exit()
        scope.cancel()

    def _answered(self) -> None:
        """After a reader handled the frames of one read: hand the queue to the workers they freed."""
        if self._run or self._deferred:
            self._dispatch()

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
        deferred_busy = sum(1 for worker in ready if worker.deferred)
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
                if worker.inflight and len(worker.frame_sizes) < _WINDOW and not worker.deferred:
                    self._send_chunk(worker, self._run)

    def _send_chunk(self, worker: Worker, queue: deque[Job]) -> None:
        size = min(self._budget(worker), max(1, min(_MAX_CHUNK, len(queue) // (self.size * 4))))
        jobs: list[Job] = []
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
        if queue is self._deferred:
            worker.deferred += len(jobs)
        worker.frame_sizes.append(len(jobs))
        worker.send(self._frame_for(worker, jobs))

    def _frame_for(self, worker: Worker, jobs: list[Job]) -> bytes:
        """Compose the TASKS frame for one worker: the function skeletons it lacks, then the entries.

        Consecutive jobs of one group make one entry (the group's payload and the range of it to run).
        Called only as the frame is sent: frames reach a worker in order, so its mirror is exact.
        """
        entries: list[tuple[int, int, int, bytes]] = []
        skeletons: list[Skeleton] = []
        last: Job | None = None
        for job in jobs:
            payload = job.payload
            if last is not None and job.slot >= 0 and last.payload is payload and job.slot == last.slot + 1:
                first, count, start, data = entries[-1]
                if job.id == first + count:
                    entries[-1] = (first, count + 1, start, data)
                    last = job
                    continue
            if last is None or last.payload is not payload:
                skeletons.extend(payload.skeletons)
            entries.append((job.id, 1, _protocol.SINGLE if job.slot < 0 else job.slot, payload.data))
            last = job
        return _protocol.tasks_frame(worker.mirror.prepare(skeletons), entries)

    # Lifecycle -----------------------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise ConcurrencyClosed(f"this {self.name} pool has been closed")

    def stats(self) -> Stats:
        busy = sum(1 for worker in self.workers if worker.inflight)
        return self.counters.snapshot(
            self.name, workers=len(self.workers), busy=busy, queued=len(self._run) + len(self._deferred)
        )
