"""How the pool reads its workers' answers: every frame checked against the task it must name.

`Answers` is the half of `Pool` (`_pool.py`) that takes what a worker wrote: the answer for the task
in progress settles its call (on a short path: nearly every frame is one), a RESEND gives the tasks
of a group that would not load back to the queue one by one, READY, START_FAILED, IDLE_EXIT and
SLOW_IMPORT say how the worker is doing, and anything else is a protocol error (the worker is killed
and every task it held fails with `WorkerCrashed`; a wrong answer is never returned).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable

from .. import _protocol
from .._closures import ClosureCache
from .._exceptions import SerializationError
from .._pickling import decode_outcome, describe_failure, pickle_task
from .._tasks import Outcome
from ._feed import Job, Worker
from ._lifecycle import Lifecycle

__all__ = ["Answers"]

logger = logging.getLogger("starlette_concurrency")

_ANSWERS, _ID, _ID_SIZE = _protocol.ANSWERS, struct.Struct("!Q"), _protocol.ID_SIZE


class Answers(Lifecycle):
    """The answers of workers, for `Pool`; the queue, the dispatch and the workers' spawning are the pool's."""

    max_tasks_per_worker: int | None
    warned_slow_import: bool
    _over_memory: Callable[[Worker], bool] | None
    _closures: ClosureCache

    def _frames(self, worker: Worker) -> str | None:
        """Handle every complete frame a read brought; return why the worker must go, or None.

        The answer for the task in progress (nearly every frame) is settled here; `_handle` takes every
        other frame, and says what is wrong with one that is not a worker's to write.
        """
        next_frame = worker.frames.next
        inflight = worker.inflight
        counters = self.counters
        while (message := next_frame()) is not None:
            tag, body = message
            if not (
                tag in _ANSWERS
                and worker.ready
                and inflight
                and len(body) >= _ID_SIZE
                and inflight[0].id == _ID.unpack_from(body)[0]
            ):
                reason = self._handle(worker, tag, body)
                if reason is not None:
                    return reason
                continue
            job = self._next_inflight(worker)
            worker.tasks_done += 1
            now = time.monotonic()
            outcome = decode_outcome(tag, memoryview(body)[_ID_SIZE:], job.task)  # no copy of the body
            last = worker.last_answer
            counters.record(outcome, now - (job.sent_at if job.sent_at > last else last))
            worker.last_answer = now
            job.call.settle(job.index, outcome)
            if inflight:
                if inflight[0].call.abandoned:
                    return "timeout or cancellation"  # it started a task nobody waits for: stop it
            elif (why := self._due_for_recycle(worker)) is not None:
                return why
        return None  # the reader calls _answered() once it has handled every frame it read

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
        if tag == _protocol.SLOW_IMPORT:
            self._warn_slow_import(worker, body)
            return None
        if tag == _protocol.RESEND:
            return self._resend(worker, body)
        if tag not in _protocol.ANSWERS:
            raise _protocol.ProtocolError(f"unknown tag {tag!r}")
        # An answer `_frames` did not take: it does not name the task in progress.
        task_id = _protocol.answer_id(body)  # raises for a body too short to name one
        raise _protocol.ProtocolError(f"an answer for task id {task_id}, which is not the task in progress")

    def _next_inflight(self, worker: Worker) -> Job:
        """Take the first job a worker holds: it answered it (or gave it back)."""
        job = worker.inflight.popleft()
        if job.call.background:
            worker.deferred -= 1
        sizes = worker.frame_sizes
        sizes[0] -= 1
        if not sizes[0]:
            sizes.popleft()
        return job

    def _resend(self, worker: Worker, body: bytes) -> str | None:
        """A group's payload would not load in the worker: queue its tasks again, each pickled on its own.

        None of them ran. One by one, only the task that will not load fails (LOAD_FAILED), the others
        run. They are pickled again here, so they travel as they are now.
        """
        task_id, count = _protocol.split_resend(body)
        inflight = worker.inflight
        if count < 1 or len(inflight) < count or any(inflight[k].id != task_id + k for k in range(count)):
            raise _protocol.ProtocolError(f"a resend of {count} tasks from id {task_id}, which are not in progress")
        jobs = [self._next_inflight(worker) for _ in range(count)]
        back: list[Job] = []
        for job in jobs:
            if job.call.abandoned:
                continue
            try:
                job.payload, job.slot = pickle_task(job.task, self._closures), -1
            except SerializationError as exc:
                outcome = Outcome(error=exc)
                self.counters.record(outcome)
                job.call.settle(job.index, outcome)
                continue
            back.append(job)
        for job in reversed(back):
            (self._deferred if job.call.background else self._run).appendleft(job)
        if worker.inflight and worker.inflight[0].call.abandoned:
            return "timeout or cancellation"  # it started a task nobody waits for: stop it
        return None

    def _due_for_recycle(self, worker: Worker) -> str | None:
        """Say why the worker is due for replacement between tasks ("recycle: ..."), or None."""
        if self.max_tasks_per_worker is not None and worker.tasks_done >= self.max_tasks_per_worker:
            return f"recycle: ran max_tasks_per_worker={self.max_tasks_per_worker} tasks"
        if self._over_memory is not None and worker.tasks_done > 0 and self._over_memory(worker):
            return "recycle: over max_worker_memory"
        return None

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
