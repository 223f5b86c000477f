"""How the pool's workers leave: buried after a death, retired after a timeout, a recycle or an idle exit.

`Lifecycle` is the half of `Pool` (`_pool.py`) that ends workers: it settles what a worker held
(answers it wrote before dying count; the task it was running fails with `WorkerCrashed`; the rest
go back to the front of the queue, unstarted), stops the worker with its process group, logs why,
and starts its replacement before the failed task's caller wakes up, so that the pool looks whole.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from typing import Any

import anyio

from .. import _protocol
from .._exceptions import ConcurrencyClosed, WorkerCrashed, WorkerStartFailed
from .._stats import TaskCounters
from .._tasks import Outcome, Task
from ._feed import Call, Job, Worker

__all__ = ["STOP_GRACE", "Lifecycle"]

logger = logging.getLogger("starlette_concurrency")

START_ATTEMPTS = 3  # a worker killed by a signal while starting is tried again this many times in a row
STOP_GRACE = 2.0  # seconds a closed worker gets to exit before it is killed


class Lifecycle:
    """The end of a worker's life, for `Pool`; the queue and the spawning are the pool's."""

    name: str
    size: int
    closed: bool
    workers: list[Worker]
    counters: TaskCounters
    _run: deque[Job]
    _deferred: deque[Job]
    _calls: set[Call]
    _spawning: int
    _stopping: list[Worker]
    _start_error: WorkerStartFailed | None
    _last_start_error: WorkerStartFailed | None

    def _frames(self, worker: Worker) -> str | None:
        raise NotImplementedError

    def _dispatch(self) -> None:
        raise NotImplementedError

    def _live(self) -> int:
        raise NotImplementedError

    async def _add_worker(self, attempt: int = 0) -> None:
        raise NotImplementedError

    def _start_failed(self, worker: Worker, error: WorkerStartFailed) -> None:
        self._start_error = self._last_start_error = error
        logger.error("%s", error, extra={"driver": self.name, "worker_pid": worker.pid})

    async def _bury(self, worker: Worker, reason: str) -> None:
        """A worker is gone (or must go): settle what it held, retire it, start its replacement."""
        held = bool(worker.inflight)
        failed: list[tuple[Job, WorkerCrashed]] = []  # settled once the replacement is in: the pool looks healed
        if reason == "exit":
            try:  # answers written before it died count
                worker.read_available()
                handled = self._frames(worker)
                if handled in ("idle", "start failed"):
                    reason = handled
            except _protocol.ProtocolError as exc:
                reason = f"protocol error: {exc}"
            self._dispatch()  # the answers it wrote freed other calls' turns
        crashed = reason == "exit" or reason.startswith("protocol error")
        if reason == "exit":
            if not await worker.wait_exit_within(1.0):
                worker.kill()  # closed its pipe but lives on
                await worker.wait_exit_within(STOP_GRACE)
                returncode = None
            else:
                returncode = worker.returncode
        else:
            returncode = None
        task = worker.inflight[0].task if worker.inflight else None
        if crashed and not worker.ready and reason == "exit":  # died before READY
            if returncode is not None and returncode < 0 and worker.start_attempt + 1 < START_ATTEMPTS:
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

    def _fail(self, job: Job, error: WorkerCrashed) -> None:
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
        worker.deferred = 0
        worker.dead = True
        worker.detach()  # no selector callback may touch its fds once they close
        kill = not reason.startswith("recycle") and reason not in ("idle", "closing")
        if kill:
            worker.kill()
        else:
            worker.stopped_at = time.monotonic()
            self._stopping.append(worker)  # it exits at the EOF of its task pipe
        if worker.scope is not None:
            worker.scope.cancel()
        if kill:
            with anyio.CancelScope(shield=True):
                await worker.wait_exit_within(STOP_GRACE)  # killed: reaped at once, never left a zombie
        worker.close()
        with contextlib.suppress(ValueError):
            self.workers.remove(worker)
        extra: dict[str, Any] = {"driver": self.name, "worker_pid": worker.pid}
        if task is not None:
            extra.update(task=task.label, task_key=task.key)
        gentle = reason.startswith("recycle") or reason in ("idle", "closing", "killed while starting")
        level = logging.INFO if gentle else logging.WARNING
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

    def _reap(self) -> None:
        now = time.monotonic()
        still = []
        for worker in self._stopping:
            if not worker.poll():
                if now - worker.stopped_at > STOP_GRACE:
                    worker.kill()
                still.append(worker)
        self._stopping = still

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
                if not await worker.wait_exit_within(STOP_GRACE):
                    worker.kill()
                    await worker.wait_exit_within(STOP_GRACE)
                worker.kill()  # the group: what its tasks started
        self._stopping.clear()
