"""The process pool's decisions, as a state machine without I/O (the way h11 keeps HTTP's).

```
 events in (from _pool.py)                     Machine                          actions out (Actions)
 ─────────────────────────                     ───────                          ─────────────────────
 submit(call, jobs)        ──▶  queues: run() jobs ┐ FIFO; deferred jobs   ──▶  spawn(slot)
 ready / start_failed /         deferred jobs      ┘ age into run()'s turn     send(slot, jobs)
   spawn_failed(slot)           slots: STARTING → READY → LEAVING → gone      kill(slot) / stop(slot)
 answered(slot, id)        ──▶  per slot: jobs in flight, in answer order  ──▶  fail(job, Failure)
 skipped(slot, id)              per function: an estimate of its run time       start_failed(error)
 resent / idle_exit /           backoff and deadline of failing starts          skip(slot, jobs)
   protocol_error(slot)
 exited(slot)              ──▶  settle what it held: the one that may have started fails,
 cancel(call)                   the ones behind it (provably never started) go back, in order
 tick(now)                 ──▶  grace of cancelled tasks, stop deadlines, spawn backoff, start timeout
```

The machine never touches a pipe, a process or a clock: every event brings ``now``, and the I/O layer
(`_pool.py`) carries out the actions and arms one timer for `deadline()`. The guarantees, each kept in
one place here and checked by `tests/drivers/test_pool_machine.py` against any sequence of events:

- **At most once.** A worker answers the tasks it holds in order, and writes each answer before it
  starts the next task. So when a worker is gone (and the I/O layer has read every answer it wrote),
  only the first task it held without an answer may have started: `exited` fails it
  (`Failure.CRASHED`, or nothing if its call was cancelled), and puts the ones behind it back at the
  front of their queue. Nothing that may have run is ever sent again.
- **Bounded.** A slot is a worker process from the spawn to its reaped exit; `_fill` is the only
  place that adds one, and never beyond `size` slots, counting those starting and those leaving.
  `restarts` counts every process started beyond the first `size`.
- **No head-of-line blocking.** An idle worker takes one task of a function whose run time is not
  known to be short; a chunk of several tasks, or a task pipelined behind a busy worker's, only from
  functions measured short (`SHORT` seconds). Run() jobs first; deferred jobs on at most ``size - 1``
  workers (all of them once draining), and a deferred job that waited `DEFERRED_WAIT` seconds takes
  the next idle worker even before run() jobs.
- **No silent hang.** A spawn that failed is retried after a backoff (`MIN_BACKOFF` doubling to
  `MAX_BACKOFF`) while work is queued; if no worker became ready within `start_timeout`, every queued
  job fails with `Failure.START_FAILED`. `deadline()` always says when the machine next needs a tick.
- **Cheap cancellation.** `cancel` drops the call's queued jobs at once; its job a worker is running
  gets `cancel_grace` seconds to answer before the worker is killed; its jobs waiting in a worker
  (behind another call's, or later in a chunk) are named in a SKIP frame, and the worker answers
  SKIPPED for each it had not started (`skipped`), or runs it when its turn came first. Late answers
  settle nothing, but the I/O layer keeps a deferred task's: its log says it ran, not that it stopped.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "DEFERRED_WAIT",
    "MAX_BACKOFF",
    "MIN_BACKOFF",
    "SHORT",
    "STOP_GRACE",
    "Call",
    "Failure",
    "Job",
    "Leave",
    "Machine",
    "Mismatch",
    "Phase",
    "Slot",
]

MAX_CHUNK = 128  # tasks in one frame
CHUNK = 0.002  # seconds of estimated work in one frame of short tasks
MIN_ESTIMATE = 0.00001  # seconds: what a task's run time counts for at least when chunking
WINDOW = 2  # frames in flight per worker (the second one only behind short work)
SHORT = 0.005  # seconds: a function whose estimated run time is at most this may be chunked and pipelined
DEFERRED_WAIT = 2.0  # seconds a deferred job waits at most for a worker while run() jobs keep coming
MIN_BACKOFF, MAX_BACKOFF = 0.05, 2.0  # seconds between attempts to start a worker after one failed
STOP_GRACE = 2.0  # seconds a worker told to stop (recycle, idle, close) gets to exit before it is killed
_ESTIMATES = 4096  # functions whose run time is remembered (then the memory starts over)


class Phase(enum.Enum):
    """Where a worker process is in its life."""

    STARTING = "starting"  # spawned (or being spawned), not ready yet
    READY = "ready"  # takes jobs
    LEAVING = "leaving"  # takes nothing more; gone at its exit event


class Leave(enum.Enum):
    """Why a worker leaves the pool: whether it is killed at once, how loudly it is logged.

    `kill`: SIGKILL its process group now (else its task pipe is closed and it exits by itself, and is
    killed only after `STOP_GRACE`). `level`: the logging level of the line that says it left (0: none);
    WARNING only for faults: a client that goes away (a cancelled call) or a timeout is a normal event.
    `gentle`: the worker left by itself or was let go (a recycle, an idle exit, a close), so what its
    task may have started need not be killed with it.
    """

    CRASHED = ("crashed", False, logging.WARNING, False)  # it exited or closed its pipe by itself
    PROTOCOL_ERROR = ("broke the protocol", True, logging.WARNING, False)
    CANCELLED = ("killed: a cancelled or timed-out task outlived its grace", True, logging.INFO, False)
    RECYCLE_TASKS = ("recycled: ran max_tasks_per_worker tasks", False, logging.INFO, True)
    RECYCLE_MEMORY = ("recycled: over max_worker_memory", False, logging.INFO, True)
    IDLE = ("exited after its idle timeout", False, logging.INFO, True)
    START_FAILED = ("failed to start", False, 0, True)  # logged by the start failure itself
    CLOSING = ("closing", False, 0, True)
    CLOSING_BUSY = ("closing while busy", True, 0, True)

    def __init__(self, text: str, kill: bool, level: int, gentle: bool) -> None:
        self.text = text
        self.kill = kill
        self.level = level
        self.gentle = gentle


class Failure(enum.Enum):
    """How the machine fails a job it cannot run (the I/O layer words the error)."""

    CRASHED = "crashed"  # its worker died (or was killed) while it may have been running it
    PROTOCOL_ERROR = "protocol error"  # its worker broke the protocol while it may have been running it
    START_FAILED = "start failed"  # no worker could start within start_timeout


class Mismatch(Exception):
    """An answer that does not name the task its worker must answer next: a protocol error."""


class Actions(Protocol):
    """What the machine asks of the I/O layer; each returns at once."""

    def spawn(self, slot: Slot) -> None: ...
    def send(self, slot: Slot, jobs: list[Job]) -> None: ...
    def skip(self, slot: Slot, jobs: list[Job]) -> None: ...
    def kill(self, slot: Slot) -> None: ...
    def stop(self, slot: Slot) -> None: ...
    def fail(self, job: Job, failure: Failure, slot: Slot | None) -> None: ...
    def start_failed(self, error: object, slot: Slot | None) -> None: ...


@dataclass(eq=False, slots=True)
class Call:
    """One `execute()`: its jobs share it. The I/O layer subclasses it with where outcomes go."""

    background: bool = False
    cancelled: bool = False


@dataclass(eq=False, slots=True)
class Job:
    """One task of a call, from the queue to its answer."""

    id: int
    call: Call
    index: int  # the task's position in its call
    kind: Hashable  # what its run time is estimated by (its function)
    payload: Any = None  # opaque here
    slot: int = -1  # its place in a group payload, or -1
    queued_at: float = 0.0
    sent_at: float = 0.0
    seconds: float = 0.0  # its run time, once answered
    done: bool = False  # answered, failed, or dropped with its cancelled call


@dataclass(eq=False, slots=True)
class Slot:
    """One worker process, from its spawn to its exit."""

    id: int
    phase: Phase = Phase.STARTING
    handle: Any = None  # the I/O layer's worker
    inflight: deque[Job] = field(default_factory=deque)  # written to it, in the order it answers
    frames: deque[int] = field(default_factory=deque)  # jobs per frame in flight
    deferred: int = 0  # deferred jobs in flight
    tasks_done: int = 0
    started: bool = False  # it was ready once
    leave: Leave | None = None
    killed: bool = False
    deadline: float = math.inf  # grace of its cancelled running job, or its stop deadline
    grace_for: Job | None = None  # the job the grace deadline is for
    last_answer: float = 0.0


class Machine:
    """The pool's state and decisions; see the module docstring.

    Args:
        size: the most worker processes at once.
        actions: the I/O layer.
        max_tasks_per_worker: recycle a worker after this many tasks.
        over_memory: says whether a worker is over its memory ceiling (checked when it is idle).
        cancel_grace: seconds a cancelled call's running task gets to answer before its worker is killed.
        start_timeout: seconds queued jobs wait for a worker while none can start, then fail.
    """

    def __init__(
        self,
        size: int,
        actions: Actions,
        *,
        max_tasks_per_worker: int | None = None,
        over_memory: Callable[[Slot], bool] | None = None,
        cancel_grace: float = 0.1,
        start_timeout: float = 10.0,
    ) -> None:
        self.size = size
        self.actions = actions
        self.max_tasks_per_worker = max_tasks_per_worker
        self.over_memory = over_memory
        self.cancel_grace = cancel_grace
        self.start_timeout = start_timeout
        self.slots: list[Slot] = []
        self.run: deque[Job] = deque()
        self.deferred: deque[Job] = deque()
        self.estimates: dict[Hashable, float] = {}
        self.want = size  # workers to keep when nothing is queued (idle exits lower it)
        self.draining = False
        self.closed = False
        self.spawn_count = 0  # processes started in the pool's life
        self.restarts = 0
        self.timed_out = 0
        self.backoff = 0.0
        self.next_spawn = 0.0
        self.failing_since: float | None = None  # since when no worker could start
        self.last_start_error: object = None
        self._slot_ids = 0

    # Queries ------------------------------------------------------------------------------------

    def short(self, kind: Hashable) -> bool:
        """Whether a function is known to run at most `SHORT` seconds."""
        estimate = self.estimates.get(kind)
        return estimate is not None and estimate <= SHORT

    def ready_slots(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.phase is Phase.READY]

    def counts(self) -> tuple[int, int, int]:
        """(workers, busy, queued): workers not leaving, workers holding a job, jobs not started.

        ``queued`` counts the jobs a worker holds behind the one it runs: they have not started either.
        """
        workers = busy = 0
        queued = len(self.run) + len(self.deferred)
        for slot in self.slots:
            workers += slot.phase is not Phase.LEAVING
            if slot.inflight:
                busy += 1
                queued += len(slot.inflight) - 1
        return workers, busy, queued

    def deadline(self, now: float) -> float:
        """When the machine next needs a `tick` (``inf``: never, until another event).

        Only moments after `now`: a moment that passed without a change (an aged deferred job while
        every worker is busy) waits for the next event instead of spinning.
        """
        when = min((slot.deadline for slot in self.slots), default=math.inf)
        if self.closed:
            return when
        if self.run or self.deferred:
            if len(self.slots) < self.size and self.next_spawn > now:
                when = min(when, self.next_spawn)
            if self.failing_since is not None and self.failing_since + self.start_timeout > now:
                when = min(when, self.failing_since + self.start_timeout)
        if self.deferred and not self.draining and self.deferred[0].queued_at + DEFERRED_WAIT > now:
            when = min(when, self.deferred[0].queued_at + DEFERRED_WAIT)
        return when

    # Events: calls ------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Bring the pool up to `size` workers (the facade's start, or a call after idle exits)."""
        self.want = self.size
        self.failing_since = None
        self.next_spawn = 0.0
        self._fill(now)

    def submit(self, jobs: Iterable[Job], background: bool, now: float) -> None:
        """Queue a call's jobs (run() jobs, or deferred ones), then hand them out."""
        queue = self.deferred if background else self.run
        for job in jobs:
            job.queued_at = now
            queue.append(job)
        self.want = self.size
        if self.failing_since is not None and now >= self.failing_since + self.start_timeout:
            # Earlier tasks waited their bounded time already: these get theirs, and an attempt now.
            self.failing_since, self.next_spawn = now, now
        self._fill(now)
        self._dispatch(now)

    def cancel(self, call: Call, now: float) -> None:
        """A call was cancelled (timeout, caller gone): drop its queued jobs, give its running ones a grace."""
        if call.cancelled:
            return
        call.cancelled = True
        for queue in (self.run, self.deferred):
            if any(job.call is call for job in queue):
                kept = [job for job in queue if job.call is not call]
                for job in queue:
                    if job.call is call:
                        job.done = True
                        self.timed_out += 1
                queue.clear()
                queue.extend(kept)
        for slot in self.slots:
            dropped = [job for job in slot.inflight if job.call is call and not job.done]
            for job in dropped:
                job.done = True
                self.timed_out += 1
            behind = [job for job in dropped if job is not slot.inflight[0]]  # the first one runs: it has its grace
            if behind and slot.phase is Phase.READY:
                self.actions.skip(slot, behind)
            self._arm_grace(slot, now)
        self._dispatch(now)

    def set_draining(self, draining: bool, now: float) -> None:
        """While draining (shutdown), deferred jobs may use every worker."""
        self.draining = draining
        self._dispatch(now)

    # Events: workers ----------------------------------------------------------------------------

    def spawned(self, slot: Slot, handle: Any) -> None:
        """The process of a slot exists (it is not ready yet)."""
        slot.handle = handle
        if slot.phase is Phase.LEAVING:  # closed while it was being spawned
            slot.killed = True
            self.actions.kill(slot)

    def spawn_failed(self, slot: Slot, error: object, now: float) -> None:
        """No process could be started for a slot (EAGAIN, ENOMEM...): it is gone already."""
        self._remove(slot)
        self._start_failure(error, slot, now)
        self._fill(now)
        self._dispatch(now)

    def ready(self, slot: Slot, now: float) -> None:
        """A worker finished starting."""
        if slot.phase is not Phase.STARTING:
            return
        slot.phase, slot.started = Phase.READY, True
        self.failing_since = None
        self.backoff = 0.0
        self.next_spawn = 0.0
        self._dispatch(now)

    def start_failed(self, slot: Slot, error: object, now: float) -> None:
        """A worker said it could not start (its initializer raised); it exits by itself."""
        if slot.phase is not Phase.STARTING:
            raise Mismatch("START_FAILED from a worker that had started")
        slot.phase, slot.leave, slot.deadline = Phase.LEAVING, Leave.START_FAILED, now + STOP_GRACE
        self._start_failure(error, slot, now)

    def answered(self, slot: Slot, task_id: int, now: float) -> Job:
        """A worker answered a task: return its job. If its call was cancelled (``job.call.cancelled``),
        the answer came late: nobody waits for it, but it says that the task ran to its end.

        Raises:
            Mismatch: the answer does not name the first task the worker holds.
        """
        inflight = slot.inflight
        if not inflight or inflight[0].id != task_id or slot.phase is Phase.STARTING:
            raise Mismatch(f"an answer for task id {task_id}, which is not the task in progress")
        job = self._pop(slot)
        slot.tasks_done += 1
        last = slot.last_answer
        job.seconds = seconds = now - (job.sent_at if job.sent_at > last else last)
        slot.last_answer = now
        estimates, kind = self.estimates, job.kind
        old = estimates.get(kind)
        if old is None and len(estimates) >= _ESTIMATES:
            estimates.clear()
        # One long run counts for long: the estimate halves with each shorter run after it.
        estimates[kind] = seconds if old is None or seconds > old * 0.5 else old * 0.5
        job.done = True
        return job

    def skipped(self, slot: Slot, task_id: int, now: float) -> Job:
        """A worker did not start a task of a cancelled call, as SKIP asked: return its job.

        Raises:
            Mismatch: it does not name the first task the worker holds, or that task's call is live (a
                worker never skips what it was not told to).
        """
        inflight = slot.inflight
        if not inflight or inflight[0].id != task_id or not inflight[0].done or slot.phase is Phase.STARTING:
            raise Mismatch(f"a skip of task id {task_id}, which is not a cancelled task in progress")
        job = self._pop(slot)
        slot.last_answer = now  # the next task starts now: its run time counts from here
        return job

    def answers_read(self, slot: Slot, now: float) -> None:
        """The answers of one read are settled: arm the grace of a cancelled job now running, hand out work.

        A worker left idle is checked for recycling now, not only when work comes: one over its memory
        ceiling would otherwise sit there (and with a single worker, the next call would wait forever).
        """
        self._arm_grace(slot, now)
        if slot.phase is Phase.READY and not slot.inflight and (reason := self._recycle_due(slot)) is not None:
            self._leave(slot, reason, now)
        self._dispatch(now)

    def lost(self, slot: Slot, now: float) -> None:
        """A worker's pipe closed or its process exited: nothing more is sent to it (see `exited`)."""
        if slot.phase is not Phase.LEAVING:
            slot.phase, slot.leave, slot.grace_for, slot.deadline = Phase.LEAVING, Leave.CRASHED, None, math.inf

    def resent(self, slot: Slot, first: int, count: int, now: float) -> list[Job]:
        """A worker could not load a group's payload: none of those tasks ran. Return the live ones.

        The I/O layer pickles each again on its own and gives them back with `requeue` (or fails it).

        Raises:
            Mismatch: they are not the first tasks the worker holds.
        """
        inflight = slot.inflight
        if count < 1 or len(inflight) < count or any(inflight[k].id != first + k for k in range(count)):
            raise Mismatch(f"a resend of {count} tasks from id {first}, which are not in progress")
        jobs = [self._pop(slot) for _ in range(count)]
        self._arm_grace(slot, now)
        return [job for job in jobs if not job.done]

    def requeue(self, jobs: list[Job], now: float) -> None:
        """Put jobs that provably never started back at the front of their queues, in order."""
        for job in reversed(jobs):
            (self.deferred if job.call.background else self.run).appendleft(job)
        self._fill(now)
        self._dispatch(now)

    def idle_exit(self, slot: Slot, now: float) -> None:
        """A worker is leaving after its idle timeout; nothing sent after it decided so will run."""
        if slot.phase is Phase.READY:
            slot.phase, slot.leave, slot.deadline = Phase.LEAVING, Leave.IDLE, now + STOP_GRACE
            self.want = max(0, self.want - 1)

    def protocol_error(self, slot: Slot, now: float) -> None:
        """A worker wrote what it could not have written: kill it (what it held is settled at its exit)."""
        self._leave(slot, Leave.PROTOCOL_ERROR, now)

    def undelivered(self, slot: Slot, jobs: list[Job], now: float) -> None:
        """A frame could not be written at all (the worker is dead): its jobs never started."""
        if not jobs or not any(job is jobs[0] for job in slot.inflight):
            return
        ids = {id(job) for job in jobs}
        kept = [job for job in slot.inflight if id(job) not in ids]
        slot.inflight.clear()
        slot.inflight.extend(kept)
        slot.frames.pop()  # the last frame written to it
        if jobs[0].call.background:
            slot.deferred -= len(jobs)
        self.lost(slot, now)
        self.requeue([job for job in jobs if not job.done], now)

    def exited(self, slot: Slot, now: float, unread: int = 0) -> None:
        """A worker process is gone and reaped, and every answer it wrote was read: settle what it held.

        `unread`: how many of the last jobs it held were in frames it never finished reading (their bytes
        still in its task pipe): it never started them, whatever else it did.
        """
        if slot not in self.slots:
            return
        self._remove(slot)
        reason = slot.leave
        if not slot.started and reason in (None, Leave.CRASHED):  # died before READY
            self._start_failure(None, slot, now)
        elif slot.inflight:
            jobs = list(slot.inflight)
            slot.inflight.clear()
            if reason is not Leave.IDLE and unread < len(jobs):
                # An idle exit ran nothing it was sent after deciding to leave; otherwise the first job
                # without an answer may have started, unless its frame was never read.
                head = jobs.pop(0)
                if not head.done:
                    head.done = True
                    failure = Failure.PROTOCOL_ERROR if reason is Leave.PROTOCOL_ERROR else Failure.CRASHED
                    self.actions.fail(head, failure, slot)
            self.requeue([job for job in jobs if not job.done], now)
        if slot.leave is None:
            slot.leave = Leave.CRASHED
        slot.phase = Phase.LEAVING
        self._fill(now)
        self._dispatch(now)

    def tick(self, now: float) -> None:
        """Time passed: graces, stop deadlines, spawn backoff, the start timeout, deferred aging."""
        for slot in list(self.slots):
            if slot.deadline > now:
                continue
            slot.deadline = math.inf
            if slot.phase is Phase.LEAVING:
                if not slot.killed:  # told to stop, still there
                    slot.killed = True
                    self.actions.kill(slot)
            elif slot.grace_for is not None:
                self._leave(slot, Leave.CANCELLED, now)
        if (
            self.failing_since is not None
            and now >= self.failing_since + self.start_timeout
            and not any(slot.phase is Phase.READY for slot in self.slots)
        ):
            self._fail_queued()
        self._fill(now)
        self._dispatch(now)

    def close(self, now: float) -> None:
        """Stop every worker; every job still held is dropped (the I/O layer fails the calls)."""
        self.closed = True
        for queue in (self.run, self.deferred):
            for job in queue:
                job.done = True
            queue.clear()
        for slot in list(self.slots):
            busy = bool(slot.inflight)
            for job in slot.inflight:
                job.done = True
            slot.inflight.clear()
            slot.frames.clear()
            slot.deferred = 0
            self._leave(slot, Leave.CLOSING_BUSY if busy or slot.phase is Phase.STARTING else Leave.CLOSING, now)

    # Decisions ----------------------------------------------------------------------------------

    def _fill(self, now: float) -> None:
        """Start workers up to the target: the one place that adds a process."""
        if self.closed:
            return
        queued = bool(self.run or self.deferred)
        target = self.size if queued else 0 if self.failing_since is not None else self.want
        if len(self.slots) >= target or now < self.next_spawn:
            return
        while len(self.slots) < target:
            self._slot_ids += 1
            slot = Slot(self._slot_ids)
            self.slots.append(slot)
            self.spawn_count += 1
            if self.spawn_count > self.size:
                self.restarts += 1
            self.actions.spawn(slot)

    def _dispatch(self, now: float) -> None:
        """Hand queued jobs to workers: idle ones first, then a second frame behind short work only."""
        run, deferred = self.run, self.deferred
        if self.closed or not (run or deferred):
            return
        cap = self.size if self.draining else max(1, self.size - 1)
        deferred_busy = 0
        idle: list[Slot] = []
        busy: list[Slot] = []
        for slot in self.slots:
            if slot.phase is Phase.READY:
                if slot.inflight:
                    busy.append(slot)
                    deferred_busy += slot.deferred > 0
                else:
                    idle.append(slot)
        for position, slot in enumerate(idle):
            if not (run or deferred):
                return
            if (reason := self._recycle_due(slot)) is not None:
                self._leave(slot, reason, now)
                continue
            if deferred and (self.draining or now >= deferred[0].queued_at + DEFERRED_WAIT):
                queue = deferred  # aged: it had its turn behind run() long enough
            elif run:
                queue = run
            elif deferred and deferred_busy < cap:
                queue = deferred
            else:
                break
            deferred_busy += queue is deferred
            self._send(slot, queue, now, len(idle) - position)
        # Pipelining saves short tasks a round trip; never behind work that may be long.
        if len(run) >= self.size and busy:
            for slot in busy:
                if not run or not self.short(run[0].kind):
                    break
                if (
                    len(slot.frames) < WINDOW
                    and not slot.deferred
                    and slot.phase is Phase.READY
                    and all(self.short(job.kind) for job in slot.inflight)
                ):
                    self._send(slot, run, now, len(busy))

    def _send(self, slot: Slot, queue: deque[Job], now: float, ways: int = 1) -> None:
        budget = MAX_CHUNK
        if self.max_tasks_per_worker is not None:
            budget = self.max_tasks_per_worker - slot.tasks_done - len(slot.inflight)
        if budget < 1:
            return
        first = queue.popleft()
        jobs = [first]
        if self.short(first.kind):
            # A chunk saves each task a frame, a write and a wake-up on both sides: the queue shared
            # among the `ways` workers taking work now, up to CHUNK seconds of estimated work, so that
            # what waits behind it in the worker waits no longer than one short task could.
            estimate = max(self.estimates.get(first.kind, SHORT), MIN_ESTIMATE)
            size = min(budget, MAX_CHUNK, -(-(len(queue) + 1) // ways), max(1, int(CHUNK / estimate)))
            while queue and len(jobs) < size and self.short(queue[0].kind):
                jobs.append(queue.popleft())
        for job in jobs:
            job.sent_at = now
        slot.inflight.extend(jobs)
        slot.frames.append(len(jobs))
        if first.call.background:
            slot.deferred += len(jobs)
        self.actions.send(slot, jobs)

    def _recycle_due(self, slot: Slot) -> Leave | None:
        """Why an idle worker must be replaced before it takes more work, or None."""
        if self.max_tasks_per_worker is not None and slot.tasks_done >= self.max_tasks_per_worker:
            return Leave.RECYCLE_TASKS
        if self.over_memory is not None and slot.tasks_done and self.over_memory(slot):
            return Leave.RECYCLE_MEMORY
        return None

    def _pop(self, slot: Slot) -> Job:
        job = slot.inflight.popleft()
        if job.call.background:
            slot.deferred -= 1
        frames = slot.frames
        frames[0] -= 1
        if not frames[0]:
            frames.popleft()
        return job

    def _arm_grace(self, slot: Slot, now: float) -> None:
        """Give a cancelled call's job that a worker now runs `cancel_grace` seconds to answer."""
        if slot.phase is not Phase.READY:
            return
        head = slot.inflight[0] if slot.inflight else None
        if head is None or not head.done:  # nothing running, or a live job: no grace
            if slot.grace_for is not None:
                slot.grace_for, slot.deadline = None, math.inf
            return
        if slot.grace_for is head:
            return
        slot.grace_for, slot.deadline = head, now + self.cancel_grace
        if self.cancel_grace <= 0:
            self._leave(slot, Leave.CANCELLED, now)

    def _leave(self, slot: Slot, reason: Leave, now: float) -> None:
        if slot.phase is Phase.LEAVING:
            if reason.kill and not slot.killed:
                slot.killed = True
                self.actions.kill(slot)
            return
        slot.phase, slot.leave, slot.grace_for = Phase.LEAVING, reason, None
        if reason.kill:
            slot.killed, slot.deadline = True, math.inf
            self.actions.kill(slot)
        else:
            slot.deadline = now + STOP_GRACE
            self.actions.stop(slot)

    def _remove(self, slot: Slot) -> None:
        if slot in self.slots:
            self.slots.remove(slot)
        slot.deadline = math.inf

    def _start_failure(self, error: object, slot: Slot | None, now: float) -> None:
        """A worker could not start: log it, back off before the next attempt."""
        if error is not None:
            self.last_start_error = error
        self.actions.start_failed(error, slot)
        if self.failing_since is None:
            self.failing_since = now
        self.backoff = min(MAX_BACKOFF, max(MIN_BACKOFF, self.backoff * 2))
        self.next_spawn = now + self.backoff

    def _fail_queued(self) -> None:
        for queue in (self.run, self.deferred):
            while queue:
                job = queue.popleft()
                job.done = True
                self.actions.fail(job, Failure.START_FAILED, None)
