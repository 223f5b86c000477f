"""The process pool's state machine, without processes: Hypothesis drives it through any sequence of events.

A simulated worker obeys the real one's rule (it answers in order, and writes an answer before it starts
the next task), so the test knows which task really started; the invariants are the pool's guarantees.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from starlette_concurrency._drivers.process._machine import (
    CHUNK,
    DEFERRED_WAIT,
    SHORT,
    Call,
    Failure,
    Job,
    Leave,
    Machine,
    Mismatch,
    Phase,
    Slot,
)


class Recorder:
    """The actions the machine asked for."""

    def __init__(self) -> None:
        self.spawns: list[Slot] = []  # asked for, not yet spawned (or failed)
        self.sent: list[tuple[Slot, list[Job]]] = []
        self.killed: set[int] = set()
        self.stopped: set[int] = set()
        self.failed: list[tuple[Job, Failure]] = []
        self.start_failures = 0
        self.machine: Machine | None = None
        self.long_pipelined = 0  # frames that put a task behind one not known short (or in a chunk)
        self.skips: set[int] = set()  # jobs a worker was told not to start

    def spawn(self, slot: Slot) -> None:
        self.spawns.append(slot)

    def send(self, slot: Slot, jobs: list[Job]) -> None:
        self.sent.append((slot, list(jobs)))
        if (
            self.machine is not None
            and len(slot.inflight) > 1
            and not all(self.machine.short(job.kind) for job in slot.inflight)
        ):
            self.long_pipelined += 1

    def skip(self, slot: Slot, jobs: list[Job]) -> None:
        for job in jobs:
            assert job.done, f"a skip for job {job.id}, whose call is live"
            assert job in slot.inflight, f"a skip for job {job.id}, which that worker does not hold"
            self.skips.add(job.id)

    def kill(self, slot: Slot) -> None:
        self.killed.add(slot.id)

    def stop(self, slot: Slot) -> None:
        self.stopped.add(slot.id)

    def fail(self, job: Job, failure: Failure, slot: Slot | None) -> None:
        self.failed.append((job, failure))

    def start_failed(self, error: object, slot: Slot | None) -> None:
        self.start_failures += 1


SHORT_KIND, LONG_KIND, NEW_KIND = "short", "long", "new"


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.actions = Recorder()
        self.machine: Machine | None = None
        self.ids = 0
        self.calls: list[Call] = []
        self.jobs: list[Job] = []
        self.settled: Counter[int] = Counter()  # job id → times settled (answer returned, failed, dropped)
        self.begun: set[int] = set()  # jobs a simulated worker started
        self.sends: Counter[int] = Counter()  # job id → frames it was sent in
        self.seen_sent = 0
        self.dead: set[int] = set()  # slots whose process is gone, not yet reported

    @initialize(
        size=st.integers(1, 4),
        max_tasks=st.none() | st.integers(1, 5),
        grace=st.sampled_from([0.0, 0.1, 1.0]),
    )
    def setup(self, size: int, max_tasks: int | None, grace: float) -> None:
        self.over: set[int] = set()
        self.machine = Machine(
            size,
            self.actions,
            max_tasks_per_worker=max_tasks,
            over_memory=lambda slot: slot.id in self.over,
            cancel_grace=grace,
            start_timeout=5.0,
        )
        self.machine.estimates[SHORT_KIND] = SHORT / 2
        self.machine.estimates[LONG_KIND] = 1.0
        self.actions.machine = self.machine
        self.machine.start(self.now)
        self._sync()

    @property
    def m(self) -> Machine:
        assert self.machine is not None
        return self.machine

    def _sync(self) -> None:
        """Account for the frames sent since the last look: no task that may have begun is sent again."""
        for _slot, jobs in self.actions.sent[self.seen_sent :]:
            for job in jobs:
                assert job.id not in self.begun, f"job {job.id} sent again after it may have started"
                self.sends[job.id] += 1
        self.seen_sent = len(self.actions.sent)
        self._settle_failures()

    _failures_seen = 0

    def _settle_failures(self) -> None:
        for job, _ in self.actions.failed[self._failures_seen :]:
            self.settled[job.id] += 1
        self._failures_seen = len(self.actions.failed)

    def live_slot(self, phase: Phase | None = None) -> list[Slot]:
        return [
            s
            for s in self.m.slots
            if s.handle is not None and s.id not in self.dead and (phase is None or s.phase is phase)
        ]

    # Calls ---------------------------------------------------------------------------------------

    @rule(
        kinds=st.lists(st.sampled_from([SHORT_KIND, LONG_KIND, NEW_KIND]), min_size=1, max_size=12),
        background=st.booleans(),
    )
    def submit(self, kinds: list[str], background: bool) -> None:
        call = Call(background=background)
        jobs = []
        for index, kind in enumerate(kinds):
            self.ids += 1
            jobs.append(Job(self.ids, call, index, kind))
        self.calls.append(call)
        self.jobs.extend(jobs)
        self.m.submit(jobs, background, self.now)
        self._sync()

    @precondition(lambda self: any(not c.cancelled for c in self.calls))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        call = data.draw(st.sampled_from([c for c in self.calls if not c.cancelled]))
        undone = [job for job in self.jobs if job.call is call and not job.done]
        self.m.cancel(call, self.now)
        for job in undone:
            self.settled[job.id] += 1  # dropped with its call
        self._sync()

    @rule(draining=st.booleans())
    def drain(self, draining: bool) -> None:
        self.m.set_draining(draining, self.now)
        self._sync()

    @rule(seconds=st.sampled_from([0.01, 0.2, 1.0, DEFERRED_WAIT, 6.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.m.tick(self.now)
        self._sync()

    # Workers -------------------------------------------------------------------------------------

    @precondition(lambda self: bool(self.actions.spawns))
    @rule(data=st.data(), ok=st.booleans())
    def spawn_done(self, data: st.DataObject, ok: bool) -> None:
        slot = data.draw(st.sampled_from(self.actions.spawns))
        self.actions.spawns.remove(slot)
        if ok:
            self.m.spawned(slot, object())
        else:
            self.m.spawn_failed(slot, "EAGAIN", self.now)
        self._sync()

    @precondition(lambda self: bool(self.live_slot(Phase.STARTING)))
    @rule(data=st.data(), ok=st.booleans())
    def start_up(self, data: st.DataObject, ok: bool) -> None:
        slot = data.draw(st.sampled_from(self.live_slot(Phase.STARTING)))
        if ok:
            self.m.ready(slot, self.now)
        else:
            self.m.start_failed(slot, "initializer raised", self.now)
            self.dead.add(slot.id)  # it exits by itself
        self._sync()

    @precondition(lambda self: any(s.inflight for s in self.live_slot()))
    @rule(data=st.data(), answer=st.booleans())
    def run_head(self, data: st.DataObject, answer: bool) -> None:
        """The worker starts its first task (and maybe answers it)."""
        slot = data.draw(st.sampled_from([s for s in self.live_slot() if s.inflight]))
        head = slot.inflight[0]
        self.begun.add(head.id)
        if answer:
            self.now += 0.001
            late = head.done  # its call was cancelled: the answer settles nothing more
            job = self.m.answered(slot, head.id, self.now)
            assert job is head
            assert job.done
            if not late:
                self.settled[job.id] += 1
            self.m.answers_read(slot, self.now)
        self._sync()

    def skippable(self) -> list[Slot]:
        return [
            s
            for s in self.live_slot()
            if s.phase is not Phase.STARTING
            and s.inflight
            and s.inflight[0].id in self.actions.skips
            and s.inflight[0].id not in self.begun
        ]

    @precondition(lambda self: bool(self.skippable()))
    @rule(data=st.data())
    def skips_head(self, data: st.DataObject) -> None:
        """The worker comes to a task it was told to skip, before starting it: it answers SKIPPED."""
        slot = data.draw(st.sampled_from(self.skippable()))
        head = slot.inflight[0]
        job = self.m.skipped(slot, head.id, self.now)
        assert job is head
        assert job.done
        self.m.answers_read(slot, self.now)
        self._sync()

    @precondition(lambda self: any(s.inflight and not s.inflight[0].done for s in self.live_slot(Phase.READY)))
    @rule(data=st.data())
    def skip_of_a_live_task_is_refused(self, data: st.DataObject) -> None:
        slot = data.draw(
            st.sampled_from([s for s in self.live_slot(Phase.READY) if s.inflight and not s.inflight[0].done])
        )
        with pytest.raises(Mismatch):
            self.m.skipped(slot, slot.inflight[0].id, self.now)
        self.m.protocol_error(slot, self.now)
        self._sync()

    @precondition(lambda self: any(s.inflight for s in self.live_slot()))
    @rule(data=st.data())
    def wrong_answer(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from([s for s in self.live_slot() if s.inflight]))
        with pytest.raises(Mismatch):
            self.m.answered(slot, -1, self.now)
        self.m.protocol_error(slot, self.now)
        self._sync()

    @precondition(lambda self: bool(self.live_slot()))
    @rule(data=st.data())
    def dies(self, data: st.DataObject) -> None:
        """The process dies (a crash, a kill from outside, or the kill the machine asked for)."""
        slot = data.draw(st.sampled_from(self.live_slot()))
        self.dead.add(slot.id)

    @precondition(lambda self: any(s.id in self.actions.killed | self.actions.stopped for s in self.live_slot()))
    @rule(data=st.data())
    def obeys(self, data: st.DataObject) -> None:
        """A worker told to stop (or killed) goes."""
        slot = data.draw(
            st.sampled_from([s for s in self.live_slot() if s.id in self.actions.killed | self.actions.stopped])
        )
        self.dead.add(slot.id)

    @precondition(lambda self: any(s.id in self.dead for s in self.m.slots))
    @rule(data=st.data())
    def exit_seen(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from([s for s in self.m.slots if s.id in self.dead]))
        maybe_started = slot.inflight[0] if slot.inflight and slot.leave is not Leave.IDLE else None
        self.m.lost(slot, self.now)
        self.m.exited(slot, self.now)
        self.dead.discard(slot.id)
        self._sync()
        if maybe_started is not None and maybe_started.id in self.begun:
            assert maybe_started.done

    def idle_candidates(self) -> list[Slot]:
        # A worker leaves on its idle timeout only with nothing read and unanswered (what it holds was
        # written after it decided to leave).
        return [s for s in self.live_slot(Phase.READY) if not s.inflight or s.inflight[0].id not in self.begun]

    @precondition(lambda self: bool(self.idle_candidates()))
    @rule(data=st.data())
    def idles_out(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self.idle_candidates()))
        self.m.idle_exit(slot, self.now)
        self.dead.add(slot.id)
        self._sync()

    @precondition(lambda self: bool(self.live_slot(Phase.READY)))
    @rule(data=st.data())
    def grows_memory(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self.live_slot(Phase.READY)))
        self.over.add(slot.id)

    # Invariants ----------------------------------------------------------------------------------

    @invariant()
    def settled_at_most_once(self) -> None:
        if self.machine is None:
            return
        assert all(times <= 1 for times in self.settled.values()), self.settled.most_common(3)
        for job in self.jobs:
            assert job.done == (self.settled[job.id] == 1), (job.id, job.done, self.settled[job.id])

    @invariant()
    def bounded(self) -> None:
        if self.machine is None:
            return
        assert len(self.m.slots) <= self.m.size

    @invariant()
    def no_task_waits_while_a_worker_idles(self) -> None:
        m = self.machine
        if m is None or not (m.run or m.deferred):
            return
        cap = m.size if m.draining else max(1, m.size - 1)
        deferred_busy = sum(1 for s in m.slots if s.phase is Phase.READY and s.deferred)
        aged = bool(m.deferred) and (m.draining or self.now >= m.deferred[0].queued_at + DEFERRED_WAIT)
        for slot in m.slots:
            if slot.phase is Phase.READY and not slot.inflight:
                assert not m.run, "a run() task waits while a worker is idle"
                assert not aged, "a deferred task waited its longest while a worker idles"
                assert deferred_busy >= cap, "a deferred task waits while a worker it may use idles"

    @invariant()
    def every_queued_task_has_a_path(self) -> None:
        m = self.machine
        if m is None or not (m.run or m.deferred):
            return
        # A worker that will take it (serving, or starting), or a moment when the machine acts again.
        assert m.slots or m.deadline(self.now) < math.inf

    @invariant()
    def stats_equal_the_state(self) -> None:
        m = self.machine
        if m is None:
            return
        held = [job for job in self.jobs if not job.done]
        in_workers = {id(job) for s in m.slots for job in s.inflight}
        queued_model = sum(1 for job in held if id(job) not in in_workers)
        workers, busy, queued = m.counts()
        assert workers == sum(1 for s in m.slots if s.phase is not Phase.LEAVING)
        assert busy == sum(1 for s in m.slots if s.inflight)
        waiting_in_workers = sum(len(s.inflight) - 1 for s in m.slots if s.inflight)
        assert queued == queued_model + waiting_in_workers
        assert queued_model == len(m.run) + len(m.deferred)

    @invariant()
    def nothing_long_is_pipelined(self) -> None:
        m = self.machine
        if m is None:
            return
        # When it was sent (a task measured short may have run long since).
        assert self.actions.long_pipelined == 0, "a task was sent behind one not known short"


# Bounded for CI; ``SC_MACHINE_EXAMPLES=5000 SC_MACHINE_STEPS=200 pytest --timeout 0 …`` for a longer search.
PoolMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SC_MACHINE_EXAMPLES", "150")),
    stateful_step_count=int(os.environ.get("SC_MACHINE_STEPS", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolMachine = PoolMachine.TestCase


def test_a_task_behind_the_one_a_dead_worker_ran_goes_back_and_the_one_it_ran_fails() -> None:
    actions = Recorder()
    machine = Machine(1, actions)
    machine.estimates[SHORT_KIND] = SHORT / 2
    machine.start(0.0)
    slot = actions.spawns.pop()
    machine.spawned(slot, object())
    machine.ready(slot, 0.0)
    a, b = Call(), Call()
    first = Job(1, a, 0, SHORT_KIND)
    machine.submit([first], False, 0.0)
    machine.submit([Job(2, b, 0, SHORT_KIND), Job(3, b, 1, SHORT_KIND)], False, 0.0)
    held = [job.id for job in slot.inflight]
    machine.lost(slot, 0.1)
    machine.exited(slot, 0.1)
    assert [(job.id, failure) for job, failure in actions.failed] == [(held[0], Failure.CRASHED)]
    assert {job.id for job in machine.run} == {1, 2, 3} - {held[0]}


def test_a_failed_spawn_is_retried_with_a_backoff_and_queued_tasks_fail_only_after_the_start_timeout() -> None:
    actions = Recorder()
    machine = Machine(1, actions, start_timeout=5.0)
    call = Call()
    machine.submit([Job(1, call, 0, NEW_KIND)], False, 0.0)
    attempts = 0
    now = 0.0
    while not actions.failed and now < 60:
        if actions.spawns:
            attempts += 1
            machine.spawn_failed(actions.spawns.pop(), "EMFILE", now)
        now = machine.deadline(now)
        assert now < math.inf, "a queued task with no worker and no deadline: a silent hang"
        machine.tick(now)
    assert attempts >= 3
    assert [failure for _, failure in actions.failed] == [Failure.START_FAILED]
    assert 5.0 <= now < 8.0


def ready_machine(size: int, **options: object) -> tuple[Machine, Recorder, list[Slot]]:
    actions = Recorder()
    machine = Machine(size, actions, **options)  # type: ignore[arg-type]
    machine.estimates[SHORT_KIND] = SHORT / 2
    machine.estimates[LONG_KIND] = 1.0
    actions.machine = machine
    machine.start(0.0)
    slots = list(actions.spawns)
    actions.spawns.clear()
    for slot in slots:
        machine.spawned(slot, object())
        machine.ready(slot, 0.0)
    return machine, actions, slots


@pytest.mark.parametrize("kind", [NEW_KIND, SHORT_KIND])
def test_short_tasks_never_wait_behind_a_long_one_while_another_worker_can_take_them(kind: str) -> None:
    machine, _actions, (first, second) = ready_machine(2)
    machine.submit([Job(1, Call(), 0, LONG_KIND)], False, 0.0)
    assert [job.id for job in first.inflight] == [1]
    short = Call()
    machine.submit([Job(10 + i, short, i, kind) for i in range(6)], False, 0.0)
    assert [job.id for job in first.inflight] == [1]  # nothing behind the long task
    assert second.inflight  # the other worker took some
    now = 0.0
    while second.inflight:
        now += 0.01
        head = second.inflight[0]
        assert machine.answered(second, head.id, now) is head
        machine.answers_read(second, now)
        assert [job.id for job in first.inflight] == [1]
    assert not machine.run


def test_a_chunk_holds_only_tasks_known_short() -> None:
    machine, _actions, (slot,) = ready_machine(1)
    machine.estimates[SHORT_KIND] = CHUNK / 100  # a hundred fit in a chunk's time
    call = Call()
    kinds = [SHORT_KIND] * 2 + [LONG_KIND] + [SHORT_KIND] * 20
    machine.submit([Job(i + 1, call, i, kind) for i, kind in enumerate(kinds)], False, 0.0)
    assert len(slot.inflight) == 2  # a chunk, up to the task not known short
    assert all(machine.short(job.kind) for job in slot.inflight)


def test_a_chunk_holds_the_queue_s_share_of_each_idle_worker_up_to_chunk_seconds_of_work() -> None:
    machine, _actions, slots = ready_machine(2)
    machine.estimates[SHORT_KIND] = CHUNK / 100
    machine.submit([Job(i + 1, Call(), 0, SHORT_KIND) for i in range(40)], False, 0.0)
    assert [len(slot.inflight) for slot in slots] == [20, 20]  # two idle workers: half each
    machine, _actions, slots = ready_machine(2)
    machine.estimates[SHORT_KIND] = CHUNK / 4
    machine.submit([Job(i + 1, Call(), 0, SHORT_KIND) for i in range(40)], False, 0.0)
    assert [len(slot.inflight) for slot in slots] == [4, 4]  # no more work in a frame than CHUNK seconds
    assert [list(slot.frames) for slot in slots] == [[4], [4]]


def test_deferred_work_keeps_a_worker_free_for_run_until_the_drain_then_uses_every_worker() -> None:
    machine, _, slots = ready_machine(3)
    call = Call(background=True)
    machine.submit([Job(i + 1, call, i, NEW_KIND) for i in range(6)], True, 0.0)
    assert sum(1 for slot in slots if slot.inflight) == 2  # workers - 1
    machine.set_draining(True, 0.1)
    assert all(slot.inflight for slot in slots)


def test_deferred_work_waits_at_most_deferred_wait_behind_run_traffic() -> None:
    machine, _, (slot,) = ready_machine(1)
    deferred = Job(1, Call(background=True), 0, NEW_KIND)
    machine.submit([deferred], True, 0.0)
    assert slot.inflight[0] is deferred  # one worker: it may take deferred work
    machine.answered(slot, 1, 0.1)
    ids = iter(range(100, 1000))
    late = Job(2, Call(background=True), 0, NEW_KIND)
    machine.submit([Job(next(ids), Call(), 0, NEW_KIND)], False, 0.1)
    machine.submit([late], True, 0.1)
    now = 0.1
    while slot.inflight[0] is not late:
        assert now < 0.1 + DEFERRED_WAIT + 1, "run() traffic starved deferred work"
        head = slot.inflight[0]
        machine.submit([Job(next(ids), Call(), 0, NEW_KIND)], False, now)  # more run() work keeps coming
        now += 0.2
        machine.answered(slot, head.id, now)
        machine.answers_read(slot, now)
