"""The multiplexed pool behind the `process` driver: the state machine's I/O.

```
 execute(tasks)          Pool (this module)                         Machine (_machine.py)
 ──────────────          ──────────────────                         ─────────────────────
 pickle the tasks  ──▶  jobs (a payload, a function kind each)  ──▶  submit: queue, spawn, dispatch
 (nothing runs if         send(slot, jobs): one TASKS frame      ◀──  send / spawn / kill / stop / fail
 one fails)               spawn: Popen in the spawn thread       ──▶  spawned / spawn_failed
 await the call           reader: READY, answers, RESEND...      ──▶  ready / answered / resent / idle_exit
 outcomes[i] ◀────────── settle (decode the answer here)
                          EOF or exit: reap, read what is left   ──▶  lost, answered…, exited
                          one timer at machine.deadline()        ──▶  tick
```

Every decision (which worker takes what, when a worker is killed, replaced or recycled, what happens
to the tasks a dead worker held) is the machine's; this module only carries them out and feeds back
what happened. A call never owns a worker: its tasks join the queue and each answer is delivered to
its call as it arrives, from whichever worker.

**Who reads the pipes.** The event loop the pool is used from, never a caller. On asyncio, the
loop's selector calls each worker's read callback (`Worker.attach`), which delivers answers at once;
on trio, each worker has a reader system task. Both are set up with the worker, or when the pool is
first used from a new loop: nothing of the pool stays bound to a loop that has ended (each test; a
TestClient without lifespan). The pool serves one event loop at a time; used from a second one while
the first still runs, it raises `RuntimeError`.

**A worker's end.** Whatever ends it (a crash, a kill the machine asked for, a stop), the pool first
tells the machine it is lost (nothing more is sent to it), waits for the process to be reaped, reads
every answer it wrote before it died, and only then reports its exit: the machine then knows exactly
which task may have been running.

**Pickling** (`_pickling.py`, `_closures.py`). At call time, before anything is queued: a call of at
least ``32 * workers`` tasks in groups of ``len(tasks) / (8 * workers)`` (at most 32), each group one
dump (`pickle_group`), a shorter call task by task (`pickle_task`). `_frame_for` makes consecutive
jobs of one group one entry (the group's payload, the range to run). A group the worker cannot load
comes back as RESEND: its tasks go back to the front of the queue, each pickled again on its own, so
that only the one that will not load fails. Lambdas and closures travel as a skeleton key and their
current state: `_frame_for` also sends the skeletons the worker lacks (its `WorkerMirror` knows).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import struct
import time
import types
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import anyio.lowlevel

from ..._closures import ClosureCache, Payload, Skeleton
from ..._exceptions import ConcurrencyClosed, SerializationError, WorkerCrashed, WorkerStartFailed
from ..._logs import Levels, handle as handle_record, load as load_record, task_extra
from ..._pickling import decode_outcome, describe_failure, pickle_group, pickle_task
from ..._stats import Stats, TaskCounters
from ..._tasks import NOT_STARTED, Outcome, Task
from ..._wire import protocol
from ._handle import Worker, launch
from ._machine import STOP_GRACE, Call, Failure, Job, Leave, Machine, Mismatch, Phase, Slot

__all__ = ["Pool", "Worker"]

logger = logging.getLogger("starlette_concurrency")

_MIN_GROUP, _MAX_GROUP = 4, 32  # tasks pickled in one dump (see _pickle)
_ANSWERS, _ID, _ID_SIZE = protocol.ANSWERS, struct.Struct("!Q"), protocol.ID_SIZE


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


def kind_of(fn: Any) -> Hashable:
    """What a task's run time is estimated by: its function's code (a partial's, a method's), or its type."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if isinstance(code, types.CodeType):
        return code
    return cast(Hashable, type(fn))


@dataclass(eq=False, slots=True)
class _Call(Call):
    tasks: Sequence[Task] = ()
    outcomes: list[Outcome | None] = field(default_factory=list)
    remaining: int = 0
    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None  # the pool failed the call as a whole (closed)

    def settle(self, index: int, outcome: Outcome) -> None:
        if self.outcomes[index] is None:
            self.outcomes[index] = outcome
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = self.error or error
        self.done.set()


class Pool:
    """The queue, the workers and the readers; `ProcessDriver` is its public face.

    Args:
        size: the most worker processes at once.
        spawn: starts one worker process (in the spawn thread) and returns its handle.
        name: the driver's name, for logs and errors.
        max_tasks_per_worker: recycle a worker after this many tasks.
        over_memory: whether a worker is over its memory ceiling.
        cancel_grace: seconds a cancelled task may still run before its worker is killed.
        start_timeout: seconds queued tasks wait while no worker can start.
        levels: the server's logger levels, for workers that forward their log records (None: they do not).
    """

    def __init__(
        self,
        size: int,
        spawn: Callable[[], Awaitable[Worker]],
        *,
        name: str = "process",
        max_tasks_per_worker: int | None = None,
        over_memory: Callable[[Worker], bool] | None = None,
        cancel_grace: float = 0.1,
        start_timeout: float = 10.0,
        levels: Levels | None = None,
    ) -> None:
        self.size = size
        self.levels = levels
        self.name = name
        self._spawn_worker = spawn
        self.counters = TaskCounters()
        self.warned_slow_import = False
        self.machine = Machine(
            size,
            self,
            max_tasks_per_worker=max_tasks_per_worker,
            over_memory=(lambda slot: slot.handle is not None and over_memory(slot.handle)) if over_memory else None,
            cancel_grace=cancel_grace,
            start_timeout=start_timeout,
        )
        self._calls: set[_Call] = set()
        self._closures = ClosureCache()  # lambdas and closures: what stays the same is sent once per worker
        self._ids = secrets.randbits(48)  # ids nobody outside can guess from a count of tasks
        self._start_error: WorkerStartFailed | None = None  # for start() to raise
        self._loop: object = None
        self._asyncio_loop: asyncio.AbstractEventLoop | None = None  # the native loop of _loop, on asyncio
        self.pid = os.getpid()  # the process the pool belongs to: a forked child must make its own
        self._tasks: set[Any] = set()  # asyncio tasks: a strong reference while they run
        self._armed = math.inf  # the machine's deadline the timer is set for
        self._timer: asyncio.TimerHandle | None = None
        self._timer_wake: anyio.Event | None = None  # trio: wakes the timer task to re-arm
        self._handles: list[Worker] = []  # every process not reaped yet (aclose kills their groups)
        # While a dead worker is buried: the failures to settle once its replacement exists, so that
        # the caller who learns of the crash finds the pool whole again.
        self._holding: list[tuple[_Call, int, Outcome]] | None = None
        self._fresh: list[Slot] = []
        self._undelivered: list[tuple[Slot, list[Job]]] = []  # frames a dead worker's pipe refused
        self.closed = False

    @property
    def workers(self) -> list[Worker]:
        """The handles of the worker processes that serve (or are starting to), not those leaving."""
        return [
            slot.handle for slot in self.machine.slots if slot.handle is not None and slot.phase is not Phase.LEAVING
        ]

    def set_draining(self, draining: bool) -> None:
        """Let deferred tasks use every worker (shutdown's drain), or only ``workers - 1`` again."""
        self.machine.set_draining(draining, time.monotonic())
        self._after()

    # Calls ---------------------------------------------------------------------------------------

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None], *, background: bool) -> None:
        payloads = await self._pickle(tasks)  # all of it before anything is queued: nothing runs if one fails
        self.check_open()
        if not tasks:
            return
        self._bind_loop()
        call = _Call(background=background, tasks=tasks, outcomes=outcomes, remaining=len(tasks))
        ids = self._ids
        kinds: dict[int, Hashable] = {}
        jobs = []
        for index, (payload, slot) in enumerate(payloads):
            fn = tasks[index].fn
            kind = kinds.get(id(fn))
            if kind is None:
                kind = kinds[id(fn)] = kind_of(fn)
            jobs.append(Job(ids + index + 1, call, index, kind, payload, slot))
        self._ids = ids + len(payloads)
        self._calls.add(call)
        try:
            self.machine.submit(jobs, background, time.monotonic())
            self._after()
            await call.done.wait()
        except BaseException:
            if call.remaining:
                self.machine.cancel(call, time.monotonic())
                self._after()
                with anyio.CancelScope(shield=True):
                    await self._stopped(call)
                if background:  # a job never sent to a worker never began: say so to the drain's log
                    for job in jobs:
                        if not job.sent_at and outcomes[job.index] is None:
                            outcomes[job.index] = NOT_STARTED
            raise
        finally:
            self._calls.discard(call)
        if call.error is not None:
            raise call.error

    async def _stopped(self, call: _Call) -> None:
        """Wait until no worker holds a task of a cancelled call: each answered within its grace, or its
        worker was killed. Then nothing of the call runs any more when its caller goes on."""
        slots = self.machine.slots
        with anyio.move_on_after(self.machine.cancel_grace + 2 * STOP_GRACE):
            while any(job.call is call for slot in slots for job in slot.inflight):  # noqa: ASYNC110
                await anyio.sleep(0.002)
            # and the replacement of a worker killed for it is known: the caller finds the pool whole
            while any(slot.handle is None for slot in slots):  # noqa: ASYNC110
                await anyio.sleep(0.002)

    async def _pickle(self, tasks: Sequence[Task]) -> list[tuple[Payload, int]]:
        """Pickle a call's tasks: (payload, slot) per task, a slot >= 0 for a task pickled in a group.

        Tasks of a long call are pickled in groups, one dump each (see `pickle_group`): the dispatch
        cuts chunks for the workers as it goes, so a group is small enough that it seldom straddles two.
        """
        if all(isinstance(task.prepared, Payload) for task in tasks):  # deferred: pickled when accepted
            return [(task.prepared, -1) for task in tasks]
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

    # Actions (what the machine asks) ---------------------------------------------------------------

    def spawn(self, slot: Slot) -> None:
        if self._holding is not None:
            self._fresh.append(slot)
        launch(self._tasks, self._spawn, slot)

    def send(self, slot: Slot, jobs: list[Job]) -> None:
        worker: Worker = slot.handle
        frame = self._frame_for(worker, jobs)
        if worker.send(frame):
            worker.frame_bytes.append([len(frame), 0])
        else:
            # The pipe's other end is closed: the worker is dead and never read a byte of it. Told to
            # the machine once it has returned (see _after), so that none of these jobs counts as started.
            self._undelivered.append((slot, jobs))

    def skip(self, slot: Slot, jobs: list[Job]) -> None:
        worker: Worker = slot.handle
        if worker.answers_waiting():
            # It answered the task it ran and went on: what follows is µs work already done, or about to
            # be; a SKIP would cost a write and a wake-up for nothing (measured: a fifth fewer calls
            # completed under cancellation-heavy load of µs lambdas).
            return
        frame = protocol.frame(protocol.SKIP, protocol.skip_body([job.id for job in jobs]))
        if worker.frame_bytes and worker.send(frame):
            worker.frame_bytes[-1][1] += len(frame)  # read after that frame (see _unread)

    def kill(self, slot: Slot) -> None:
        if slot.handle is not None:  # else killed as soon as it is spawned (see Machine.spawned)
            slot.handle.kill()

    def stop(self, slot: Slot) -> None:
        if slot.handle is not None:
            slot.handle.close_input()

    def fail(self, job: Job, failure: Failure, slot: Slot | None) -> None:
        call: _Call = job.call  # type: ignore[assignment]
        task = call.tasks[job.index]
        worker: Worker | None = slot.handle if slot is not None else None
        error: BaseException
        if failure is Failure.START_FAILED:
            last = self.machine.last_start_error
            error = WorkerStartFailed(f"no {self.name} worker could start for {task.label}: {last}")
        elif failure is Failure.PROTOCOL_ERROR and worker is not None:
            error = WorkerCrashed(
                f"the worker (pid {worker.pid}) running {task.label} broke the protocol "
                f"({worker.protocol_error}); it was killed"
            )
        else:
            pid = worker.pid if worker is not None else "?"
            returncode = worker.returncode if worker is not None and not worker.hung else None
            error = WorkerCrashed.from_returncode(returncode, f"the worker (pid {pid}) running {task.label}")
        outcome = Outcome(error=error)
        self.counters.record(outcome)
        if self._holding is not None:
            self._holding.append((call, job.index, outcome))
        else:
            call.settle(job.index, outcome)

    def start_failed(self, error: object, slot: Slot | None) -> None:
        worker: Worker | None = slot.handle if slot is not None else None
        if not isinstance(error, WorkerStartFailed):
            returncode = worker.returncode if worker is not None else None
            pid = worker.pid if worker is not None else "?"
            error = WorkerStartFailed.from_returncode(returncode, f"a worker (pid {pid}) failed to start and")
            self.machine.last_start_error = error
        self._start_error = error
        extra = {"driver": self.name, "worker_pid": worker.pid if worker is not None else None}
        logger.error("%s", error, extra=extra)

    # Workers -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start workers up to the pool's size and wait until each is ready or one failed.

        Raises:
            WorkerStartFailed: a worker could not start (its initializer raised, say).
        """
        self.check_open()
        self._bind_loop()
        self._start_error = None
        self.machine.start(time.monotonic())
        self._after()
        machine = self.machine
        while self._start_error is None and not (
            len(machine.slots) >= self.size and all(slot.phase is Phase.READY for slot in machine.slots)
        ):
            await anyio.sleep(0.005)
            self.check_open()
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            with anyio.CancelScope(shield=True):
                while any(  # noqa: ASYNC110 - the failed ones are being buried: none may be left behind
                    (not slot.started and slot.leave is not None) or slot.phase is Phase.STARTING
                    for slot in machine.slots
                ):
                    await anyio.sleep(0.005)
            raise error
        logger.info("%s pool started with %d workers", self.name, len(machine.slots), extra={"driver": self.name})

    async def _spawn(self, slot: Slot) -> None:
        try:
            with anyio.CancelScope(shield=True):  # a worker started must be known, or it would be lost
                worker = await self._spawn_worker()
        except Exception as exc:  # EAGAIN, ENOMEM, an interpreter that is gone
            error = WorkerStartFailed(f"a {self.name} worker could not be started: {exc!r}")
            self.machine.spawn_failed(slot, error, time.monotonic())
            self._after()
            return
        worker.slot = slot
        self._handles.append(worker)
        self.machine.spawned(slot, worker)
        self._serve_soon(worker)
        self._after()

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
        self._timer, self._timer_wake, self._armed = None, None, math.inf
        if self._asyncio_loop is None:
            launch(self._tasks, self._timer_task)
        for worker in list(self._handles):
            if worker.gone:  # its burial was cut short with its loop: finish it here
                launch(self._tasks, self._finish, worker)
                continue
            worker.detach()
            worker.scope = None
            worker.wake_writer = None
            self._serve_soon(worker)
        self._after()

    def _serve_soon(self, worker: Worker) -> None:
        worker.loop = self._loop
        if self._asyncio_loop is not None:
            worker.attach(self._asyncio_loop, self._frames, self._gone)
        else:
            launch(self._tasks, self._serve, worker)

    async def _serve(self, worker: Worker) -> None:
        """trio: read one worker's answers (and write its frames) until it is gone."""
        with anyio.CancelScope() as scope:
            worker.scope = scope
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.write_loop)
                tg.start_soon(self._watch_exit, worker, tg.cancel_scope)
                await worker.read_loop(self._frames)
                if worker.broken:  # being killed: its exit event says when it is gone
                    await worker.wait_exit()
                tg.cancel_scope.cancel()
        if worker.scope is scope:  # else its loop moved on: not a death
            self._gone(worker)

    async def _watch_exit(self, worker: Worker, scope: anyio.CancelScope) -> None:
        await worker.wait_exit()
        scope.cancel()

    def _gone(self, worker: Worker) -> None:
        """A worker's pipe closed or its process exited: nothing more goes to it; bury it."""
        if worker.gone:
            return
        worker.gone = True
        self.machine.lost(worker.slot, time.monotonic())
        launch(self._tasks, self._finish, worker)

    async def _finish(self, worker: Worker) -> None:
        """Reap a worker, read every answer it wrote, then report its exit: the machine settles the rest."""
        slot: Slot = worker.slot
        with anyio.CancelScope(shield=True):
            if not await worker.wait_exit_within(1.0):  # closed its pipe but lives on
                worker.hung = True
                worker.kill()
                await worker.wait_exit_within(STOP_GRACE)
            if not worker.broken:
                worker.read_available()  # what it wrote before it died counts
                self._frames(worker)
            head = slot.inflight[0] if slot.inflight else None
            leave = slot.leave if slot.leave is not None else Leave.CRASHED
            unread = self._unread(worker, slot)
            self._holding, self._fresh = [], []
            try:
                self.machine.exited(slot, time.monotonic(), unread)
            finally:
                held, fresh, self._holding = self._holding, self._fresh, None
            if not leave.gentle:
                worker.kill()  # its group: what its task started (a grandchild holding the pipe, say)
            with anyio.move_on_after(10):
                while any(slot.handle is None and slot in self.machine.slots for slot in fresh):  # noqa: ASYNC110
                    await anyio.sleep(0.002)
            for call, index, outcome in held:
                call.settle(index, outcome)
            worker.close()
            if worker in self._handles:
                self._handles.remove(worker)
            if leave.level and slot.started:
                extra: dict[str, Any] = {"driver": self.name, "worker_pid": worker.pid}
                if head is not None and leave is not Leave.IDLE:
                    task = head.call.tasks[head.index]  # type: ignore[attr-defined]
                    extra.update(task=task.label, task_key=task.key)
                text = leave.text
                logger.log(leave.level, "%s worker (pid %d) retired: %s", self.name, worker.pid, text, extra=extra)
            self._after()

    def _unread(self, worker: Worker, slot: Slot) -> int:
        """How many of the jobs a dead worker held were in frames it had not finished reading.

        A worker reads a whole frame before it runs any of it; the frames are in its pipe in order. So a
        frame with any byte still unread (the pipe's FIONREAD, our write buffer) was never started. The
        SKIP frames written after a TASKS frame are read after it: unread, they say nothing of it.
        """
        sizes = worker.frame_bytes
        while len(sizes) > len(slot.frames):  # frames answered since (the machine forgot them)
            sizes.popleft()
        pending = worker.unread_bytes()
        jobs = 0
        for (size, after), count in zip(reversed(sizes), reversed(slot.frames), strict=False):
            pending -= after
            if pending <= 0:
                break
            jobs += count
            pending -= size
        return jobs

    # Answers -------------------------------------------------------------------------------------

    def _frames(self, worker: Worker) -> None:
        """Handle every complete frame a read brought: answers settle their calls, the rest tells the machine."""
        slot: Slot = worker.slot
        machine = self.machine
        next_frame = worker.frames.next
        counters = self.counters
        now = time.monotonic()
        try:
            while (message := next_frame()) is not None:
                tag, body = message
                if tag in _ANSWERS and len(body) >= _ID_SIZE:
                    job = machine.answered(slot, _ID.unpack_from(body)[0], now)
                    call: _Call = job.call  # type: ignore[assignment]
                    task = call.tasks[job.index]
                    if not call.cancelled:
                        outcome = decode_outcome(tag, memoryview(body)[_ID_SIZE:], task)
                        counters.record(outcome, job.seconds)
                        if task.trace is not None:  # its span says where it ran, and for how long
                            task.trace.ran(worker.pid, job.seconds)
                        call.settle(job.index, outcome)
                    elif call.background:  # a late answer: the deferred batch's log says it ran after all
                        call.settle(job.index, decode_outcome(tag, memoryview(body)[_ID_SIZE:], task))
                else:
                    self._handle(worker, slot, tag, body, now)
        except (protocol.ProtocolError, Mismatch) as exc:
            self._broken(worker, str(exc), now)
        except Exception as exc:  # a bug of ours: the worker cannot be trusted to be in step any more
            logger.exception("reading a process worker's answers failed")
            self._broken(worker, f"see the log: {exc!r}", now)
        else:
            machine.answers_read(slot, now)
        self._after()

    def _broken(self, worker: Worker, reason: str, now: float) -> None:
        worker.broken = True
        worker.protocol_error = reason
        self.machine.protocol_error(worker.slot, now)

    def _handle(self, worker: Worker, slot: Slot, tag: bytes, body: bytes, now: float) -> None:
        if tag == protocol.LOG:  # also before READY: what the initializer logged
            self._log(worker, slot, body)
            return
        if not worker.ready:
            if tag == protocol.READY:
                worker.ready = True
                self.machine.ready(slot, now)
                return
            if tag == protocol.START_FAILED:
                error = describe_failure(body, f"a worker (pid {worker.pid}) failed to start")
                self.machine.start_failed(slot, error, now)
                return
            raise protocol.ProtocolError(f"{tag!r} before READY")
        if tag == protocol.IDLE_EXIT:
            self.machine.idle_exit(slot, now)
        elif tag == protocol.SLOW_IMPORT:
            self._warn_slow_import(worker, body)
        elif tag == protocol.RESEND:
            self._resend(slot, body, now)
        elif tag == protocol.SKIPPED:
            job = self.machine.skipped(slot, protocol.answer_id(body), now)
            if job.call.background:  # the drain's log says it never started (and its journal start is not counted)
                skipped: _Call = job.call  # type: ignore[assignment]
                skipped.settle(job.index, NOT_STARTED)
        elif tag in _ANSWERS:
            raise protocol.ProtocolError("an answer too short to name its task")
        else:
            raise protocol.ProtocolError(f"unknown tag {tag!r}")

    def _log(self, worker: Worker, slot: Slot, body: bytes) -> None:
        """A record a worker logged: to the server's logger of its name, with its task's attributes."""
        fields, inflight = load_record(body), slot.inflight
        job = inflight[0] if inflight and inflight[0].id == protocol.answer_id(body) else None
        task = job.call.tasks[job.index] if job is not None else None  # type: ignore[attr-defined]
        handle_record(fields, task_extra(self.name, worker.pid, task))

    def _resend(self, slot: Slot, body: bytes, now: float) -> None:
        """A group's payload would not load in the worker: queue its tasks again, each pickled on its own.

        None of them ran. One by one, only the task that will not load fails (LOAD_FAILED), the others
        run. They are pickled again here, so they travel as they are now.
        """
        first, count = protocol.split_resend(body)
        back: list[Job] = []
        for job in self.machine.resent(slot, first, count, now):
            call: _Call = job.call  # type: ignore[assignment]
            try:
                job.payload, job.slot = pickle_task(call.tasks[job.index], self._closures), -1
            except SerializationError as exc:
                job.done = True
                outcome = Outcome(error=exc)
                self.counters.record(outcome)
                call.settle(job.index, outcome)
                continue
            back.append(job)
        self.machine.requeue(back, now)

    def _warn_slow_import(self, worker: Worker, body: bytes) -> None:
        """Warn once per pool that a worker's first task spent long importing (every fresh worker pays it)."""
        if self.warned_slow_import:
            return
        self.warned_slow_import = True
        seconds, _, modules = body.decode("ascii", "replace").partition(" ")
        logger.warning(
            "a %s worker (pid %d) spent %s s importing before its first task could run (modules: %s); every "
            "fresh worker pays this: preload them (preload=[...]) so that workers import them at start-up, or "
            "keep task functions in a module that imports little",
            self.name,
            worker.pid,
            seconds,
            modules or "?",
            extra={"driver": self.name, "worker_pid": worker.pid},
        )

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
            entries.append((job.id, 1, protocol.SINGLE if job.slot < 0 else job.slot, payload.data))
            last = job
        tasks = protocol.tasks_frame(worker.mirror.prepare(skeletons), entries)
        levels = self.levels
        if levels is None:
            return tasks
        # Before a worker's first tasks, and after the server's logger levels changed: the levels.
        levels_frame = levels.frame(time.monotonic())
        if worker.levels_version == levels.version:
            return tasks
        worker.levels_version = levels.version
        return levels_frame + tasks

    # The timer -----------------------------------------------------------------------------------

    def _after(self) -> None:
        """After an event: report frames that could not be written; arm the timer if needed sooner."""
        while self._undelivered:
            slot, jobs = self._undelivered.pop(0)
            self.machine.undelivered(slot, jobs, time.monotonic())
        deadline = self.machine.deadline(time.monotonic())
        if deadline >= self._armed:
            return
        self._armed = deadline
        loop = self._asyncio_loop
        if loop is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), self._tick)
        elif self._timer_wake is not None:
            self._timer_wake.set()

    def _tick(self) -> None:
        self._timer, self._armed = None, math.inf
        if not self.closed:
            self.machine.tick(time.monotonic())
        self._after()

    async def _timer_task(self) -> None:
        """trio: sleep until the machine's deadline (woken when it moves sooner), then tick."""
        while not self.closed:
            self._timer_wake = wake = anyio.Event()
            delay = self._armed - time.monotonic()
            if delay > 0:
                with anyio.move_on_after(delay if delay != math.inf else 3600):
                    await wake.wait()
            if time.monotonic() >= self._armed:
                self._tick()

    # Lifecycle -----------------------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise ConcurrencyClosed(f"this {self.name} pool has been closed")

    def stats(self) -> Stats:
        workers, busy, queued = self.machine.counts()
        self.counters.restarts = self.machine.restarts
        self.counters.timed_out = self.machine.timed_out
        return self.counters.snapshot(self.name, workers=workers, busy=busy, queued=queued)

    async def aclose(self) -> None:
        """Stop every worker: close their pipes, give them a moment to exit, then kill their groups."""
        if self.closed:
            return
        self.closed = True
        for call in list(self._calls):
            call.fail(ConcurrencyClosed(f"this {self.name} pool has been closed"))
        with contextlib.suppress(RuntimeError):  # another loop still runs the readers: the polling below sees exits
            self._bind_loop()
        with anyio.CancelScope(shield=True):
            self.machine.close(time.monotonic())
            leaving = list(self._handles)
            while self.machine.slots:  # told to stop, killed after STOP_GRACE; spawns in progress too
                await anyio.sleep(0.005)
                self.machine.tick(time.monotonic())
                leaving.extend(worker for worker in self._handles if worker not in leaving)
                # Exits are polled too: the readers may be gone already (a trio run whose main task has ended
                # cancels its system tasks, the readers among them, before an adopted host closes the pool).
                for worker in list(self._handles):
                    if worker.poll():
                        self._gone(worker)
            for worker in leaving:
                worker.kill()  # the group: what its tasks started
        if self._timer is not None:
            self._timer.cancel()
        if self._timer_wake is not None:
            self._timer_wake.set()
