"""The `process` driver: a warm pool of fresh interpreters, each behind a private pair of pipes.

The pool itself (one queue for every call, run() before deferred work, a small window of frames per
worker, answers checked against the task they name) is `_pool.py`; the parent's handle on a worker
process is `_child.py`; the worker's loop is `_wire/worker.py`; the wire format is `_wire/protocol.py`. This
module holds what is particular to this driver: its options and how a worker is started.

What a worker inherits, and what it does not. It is `sys.executable` running `_wire/worker.py`, with no
interpreter flags, started with the server's environment (`os.environ`) and working directory as they
are when that worker starts, and the server's `sys.path` as it was when the pool started (sent in the
INIT frame). stdin is /dev/null; stdout and stderr are the server's, so what a task prints shows in
the server's output. No other file descriptor crosses: `Popen(close_fds=True)` passes only the
worker's two pipe ends, so a listening socket of the server never reaches a worker, even one marked
inheritable. The pipes are anonymous, private to the parent and that one worker: no listening
socket, no path in a shared directory, nothing another user or process can connect to.

Each worker leads a process group of its own (so that stopping it stops what its task started) and
dies with the server at the kernel's word (`PR_SET_PDEATHSIG`). Workers are spawned by one long-lived
thread, never on the event loop: `Popen` waits for the child's exec, tens of milliseconds of stall
per start otherwise.

Trust model. Payloads are cloudpickle, and unpickling runs code. Only the server produces the task
payloads, from its own callables, and only a worker the server started produces the results, by
running those callables; another process of the same user could write into a worker's pipes through
`/proc/<pid>/fd`, but every answer must name the task in progress: a stray frame kills the worker,
never passes for a result. Never hand `run()` a callable built from untrusted bytes: that is running
untrusted code, pickled or not. Payloads and results are never logged by the driver.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from collections.abc import Sequence

from ..._closures import Payload
from ..._config import Settings, check_workers, default_workers
from ..._exceptions import ConfigurationError
from ..._logs import Levels
from ..._options import ProcessOptions
from ..._pickling import dumps, dumps_task
from ..._stats import Stats
from ..._tasks import Outcome, Task
from ..._wire import protocol, worker as wire_worker
from .._child import run_in_spawn_thread
from ..base import Driver
from ._pool import Pool, Worker

__all__ = ["ProcessDriver"]

_WORKER_SCRIPT = wire_worker.__file__


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux, or the worker just exited
        return None


class ProcessDriver(Driver):
    """Run tasks in a warm pool of fresh Python interpreters (`python starlette_concurrency/_wire/worker.py`).

    Workers are started with the server's interpreter, `sys.path`, working directory and environment,
    never by forking the server, so the driver is safe in a threaded server and functions from the
    app's own modules import in them. Tasks, results and exceptions travel pickled (cloudpickle) on
    private pipes; `print()` in a task shows in the server's output and disturbs nothing.

    Workers are shared by every call: tasks join one queue (`run()` before deferred work) and each
    answer reaches its task as soon as it arrives. A worker that dies fails only the task it was
    running (`WorkerCrashed`) and is replaced. On a timeout or a cancellation the workers running the
    call's unfinished tasks are killed with their process groups and replaced; what else they held
    goes back to the queue. Workers die with the server, even in the middle of a task.

    Args:
        workers: how many worker processes (default: the CPUs this process may use).
        options: worker recycling, idle timeout, memory ceiling, initializer and preload (default: none).
    """

    name = "process"
    pickles = True

    def __init__(self, workers: int | None = None, options: ProcessOptions | None = None) -> None:
        if options is not None and not isinstance(options, ProcessOptions):
            raise ConfigurationError(f"options must be a ProcessOptions, not {type(options).__name__}")
        self.workers: int = check_workers("workers", workers) or default_workers()
        self.options = options or ProcessOptions()
        initializer = self.options.initializer
        self._config = {
            "preload": list(self.options.preload),
            "initializer": dumps(initializer) if initializer is not None else None,
            "idle_timeout": self.options.idle_timeout,
        }
        self._levels = Levels() if self.options.forward_logs else None
        self._init_frame = self._build_init_frame()
        self._pool = self._new_pool()

    def _build_init_frame(self) -> bytes:
        # sys.path as it is when the pool starts, not when the driver was built: an app may extend it
        # between the two, and cwd and the environment are the ones of the moment a worker starts too.
        config: dict[str, object] = {**self._config, "sys_path": list(sys.path)}
        config["log_levels"] = self._levels.current() if self._levels is not None else None
        return protocol.frame(protocol.INIT, pickle.dumps(config))

    def _new_pool(self) -> Pool:
        return Pool(
            self.workers,
            self._spawn,
            name=self.name,
            max_tasks_per_worker=self.options.max_tasks_per_worker,
            over_memory=self._over_memory if self.options.max_worker_memory is not None else None,
            cancel_grace=self.options.cancel_grace,
            start_timeout=self.options.start_timeout,
            levels=self._levels,
        )

    @property
    def pids(self) -> list[int]:
        """The process ids of the current workers (for tests, metrics and the curious)."""
        return sorted(worker.pid for worker in self._pool.workers)

    async def start(self) -> None:
        """Start every worker and wait until all of them are ready; after `aclose()`, start afresh.

        Raises:
            WorkerStartFailed: a worker failed to start (its initializer raised, say).
        """
        if self._pool.closed or self._pool.pid != os.getpid():
            # After aclose(), or in a process forked from the one that made the pool (gunicorn --preload):
            # the parent's workers are the parent's, so this process starts workers of its own.
            self._pool = self._new_pool()
        self._init_frame = self._build_init_frame()
        await self._pool.start()

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        """Run the tasks on the pool; see `Driver.execute`."""
        await self._pool.execute(tasks, outcomes, background=False)

    def prepare(self, tasks: list[Task]) -> list[Task]:
        """Pickle deferred tasks once, when `defer()` accepts them: the workers run their state of then.

        Each on its own (plain cloudpickle, not through the function cache, which belongs to the pool's
        loop while `defer()` may be called from any thread): one task that would not pickle later can
        never sink the others of its request.
        """
        return [dataclasses.replace(task, prepared=Payload(dumps_task(task), ())) for task in tasks]

    async def execute_deferred(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        """Run deferred tasks on the pool: behind `run()` tasks, on at most ``workers - 1`` workers.

        A deferred task that has waited `DEFERRED_WAIT` seconds (2) takes the next free worker even
        ahead of `run()` tasks; while draining (see `set_draining`), deferred tasks use every worker.
        """
        await self._pool.execute(tasks, outcomes, background=True)

    def set_draining(self, draining: bool) -> None:
        """Say that shutdown's drain has begun (or ended): deferred tasks may then use every worker."""
        self._pool.set_draining(draining)

    def stats(self) -> Stats:
        """Return the pool's workers, queue and counters (task time: dispatch to answer, in the parent)."""
        return self._pool.stats()

    async def _spawn(self) -> Worker:
        init_frame = self._init_frame
        return await run_in_spawn_thread(lambda: _start_worker(init_frame))

    def _over_memory(self, worker: Worker) -> bool:
        rss, ceiling = _rss(worker.pid), self.options.max_worker_memory
        return rss is not None and ceiling is not None and rss > ceiling

    async def aclose(self) -> None:
        """Stop every worker: close their pipes, give them a moment to exit, then kill what is left."""
        await self._pool.aclose()


def _start_worker(init_frame: bytes) -> Worker:
    """Start one worker process and hand it its configuration (runs in the spawn thread)."""
    task_read, to_worker = os.pipe()
    from_worker, result_write = os.pipe()
    try:
        protocol.grow_pipe(to_worker)
        process = subprocess.Popen(
            [sys.executable, _WORKER_SCRIPT, str(task_read), str(result_write), str(os.getpid())],
            pass_fds=(task_read, result_write),
            stdin=subprocess.DEVNULL,
            process_group=0,  # its own group: stopping it stops what its tasks started
        )
    except BaseException:
        for fd in (to_worker, from_worker):
            os.close(fd)
        raise
    finally:
        os.close(task_read)
        os.close(result_write)
    worker = Worker(process.pid, from_worker, to_worker, popen=process)
    # Starting the interpreter takes tens of milliseconds; hand it its configuration now so that it is
    # ready by the time somebody needs it. What does not fit in the pipe goes through the writer.
    try:
        written = os.write(to_worker, init_frame)
    except (BlockingIOError, BrokenPipeError):
        written = 0
    worker.outbox += init_frame[written:]
    return worker


def create(settings: Settings) -> ProcessDriver:
    """Build the driver from a facade's settings."""
    return ProcessDriver(settings.workers, settings.options_for(ProcessOptions))
