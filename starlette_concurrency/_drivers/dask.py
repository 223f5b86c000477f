"""The `dask` driver: tasks run on a Dask distributed cluster (one at an address, or an embedded LocalCluster).

```
 run([t0 … tn])                          DaskDriver (asyncio)                          cluster
 ──────────────                          ────────────────────                          ───────
 pickle every task (cloudpickle; nothing is submitted if one fails)
 client.map(_run_pickled, payloads, key=[unique keys]) ──── one graph update ───▶ scheduler ──▶ worker thread:
                                                                                  unpickle, call, run a coroutine
                                                                                  to completion, frame the outcome
 as_completed: whichever futures finished ◀─────────────────── status ──────────
 gather them, one round trip per batch    ◀─────────────────── RESULT frames ───  (the process driver's frames)
 outcome[i] = decode(frame); KilledWorker → WorkerCrashed
 cancelled → client.cancel(futures): queued tasks are dropped; a running coroutine task is
             cancelled inside its worker; a running plain function finishes, its result dropped
```

A task travels as the same cloudpickle payload the process driver sends, wrapped in a call of the
module-level `_run_pickled` (which the workers import by reference, so they need this package). The
worker encodes the outcome exactly as the process driver's worker does (`_wire/outcome.py`), so
exceptions keep their type and worker traceback, and those that cannot round-trip come back as
`RemoteError`. Every task gets a unique key: Dask would otherwise merge identical closures into one task
(``pure=True``).

The embedded cluster talks TLS with certificates made in memory at `start()` (`Security.temporary()`) and
handed only to our client and, through the nannies' spawn pipes, to its workers: another process on the
machine (any uid) cannot connect to it, let alone run code there. An external cluster gets whatever
`distributed.Security` the caller passes, or the `CONCURRENCY_DASK_TLS_*` files.

The embedded cluster's scratch space is the driver's own: a directory made at `start()` with
`tempfile.mkdtemp` (mode 0700, under Dask's ``temporary-directory`` or the system's temp dir), handed to
the scheduler, the nannies and the workers as their ``local_directory``, and removed at `aclose()`.
distributed's default is a fixed path in the shared temp dir (``/tmp/dask-scratch-space``) that it
reuses if it exists and puts first on ``sys.path`` of every process of the cluster, this one included:
a local user who made it first could plant modules there.

`distributed` is imported here only, when the driver is chosen; it runs on asyncio alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import re
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._config import Settings, check_workers, default_workers
from .._exceptions import ConcurrencyClosed, ConcurrencyError, ConfigurationError, WorkerCrashed
from .._options import DaskOptions
from .._pickling import decode_outcome, dumps_task, remote_exception
from .._stats import Stats, TaskCounters
from .._tasks import Outcome, Task
from .._wire import outcome as wire_outcome, protocol
from ._dask_security import (
    ADDRESS,
    SECURE_SCHEMES,
    TLS_CA,
    TLS_CERT,
    TLS_KEY,
    check_address,
    check_cryptography,
    check_security,
    security_from_environment,
)
from .base import Driver

__all__ = ["DaskDriver"]

_POLL = 0.05  # seconds between two looks, in a worker, at whether a running coroutine task was cancelled
_INSTALL_HINT = "pip install 'starlette-concurrency[dask]'"


def _import_distributed() -> ModuleType:
    try:
        import distributed
    except ImportError as exc:
        raise ConfigurationError(
            f"the 'dask' driver needs Dask distributed, which is not installed ({exc}); {_INSTALL_HINT}"
        ) from exc
    return distributed


def _require_asyncio() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigurationError(
            "the 'dask' driver runs on asyncio only (Dask distributed is built on it); "
            "serve the app with asyncio, or choose another driver"
        ) from None


class DaskDriver(Driver):
    """Run tasks on a Dask distributed cluster, through an asynchronous `distributed.Client`.

    With an address the driver connects to that scheduler; the workers must run the same Python
    version and have this package and the app's own modules importable (module-level functions
    travel by reference). Without one it starts an embedded `LocalCluster` of worker processes
    (one thread each) in `start()` and closes it in `aclose()`.

    Each task is one Dask task with a unique key, so identical closures are never merged. A worker
    that dies while running a task makes Dask retry it elsewhere up to the scheduler's
    ``distributed.scheduler.allowed-failures``; past that the task fails with `WorkerCrashed`.

    On a timeout or a cancellation the call's futures are cancelled: tasks not yet running never
    run, and a running coroutine task is cancelled inside its worker. What Dask cannot do is
    interrupt a thread: a plain function already running goes on to its end, and its result is
    dropped. Runs on asyncio only; on trio, `start()` raises `ConfigurationError`.

    The embedded cluster speaks TLS with certificates made in memory for it at `start()`, known only
    to this driver's client and its workers: nobody else on the machine can connect to it. Its scratch
    directory is private too (made at `start()`, mode 0700, removed at `aclose()`). For an
    external cluster give `DaskOptions.security`, or set ``CONCURRENCY_DASK_TLS_CA_FILE``,
    ``CONCURRENCY_DASK_TLS_CERT`` (and ``CONCURRENCY_DASK_TLS_KEY`` unless the certificate file holds
    the key); without either, Dask's own ``distributed.comm.tls`` configuration applies.

    Args:
        options: the scheduler's address (none: an embedded cluster) and the TLS settings to reach it.
        workers: worker processes of the embedded cluster (default: the CPU count); ignored with an
            address, where the cluster decides.
        variables: where to read the ``CONCURRENCY_DASK_TLS_*`` variables (default: `os.environ`; the
            facade passes `Settings.variables`, which adds its `.env` file).

    Raises:
        ConfigurationError: Dask distributed is not installed (or `cryptography`, for the embedded
            cluster); `workers` is not positive; the address is not one distributed can connect to;
            the TLS settings are unusable (a missing or invalid file, named by its variable) or do
            not fit the address.
    """

    name = "dask"
    pickles = True

    def __init__(
        self,
        options: DaskOptions | None = None,
        *,
        workers: int | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> None:
        distributed = self._distributed = _import_distributed()
        if options is not None and not isinstance(options, DaskOptions):
            raise ConfigurationError(f"options must be a DaskOptions, not {type(options).__name__}")
        self.options = options = options or DaskOptions()
        self.address = None if options.address is None else check_address(options.address)
        self.workers: int = check_workers("workers", workers) or default_workers()
        security, origin = options.security, "DaskOptions.security"
        if security is None:
            security = security_from_environment(distributed, os.environ if variables is None else variables)
            origin = f"{TLS_CA} / {TLS_CERT}"
        if security is not None:
            check_security(security, self.address, origin)
        elif self.address is None:
            check_cryptography()
        client_tls = (security if security is not None else distributed.Security()).get_tls_config_for_role("client")
        if self.address is not None and self.address.startswith(SECURE_SCHEMES) and not client_tls["cert"]:
            raise ConfigurationError(
                f"{ADDRESS} {self.address!r} is a tls:// address, but no client certificate is configured: "
                f"give DaskOptions(security=distributed.Security(...)) or set {TLS_CA}, {TLS_CERT} and {TLS_KEY}"
            )
        self.security: Any = security
        self._counters = TaskCounters()
        self._unfinished = 0  # tasks of this driver submitted to the cluster and not finished
        self._client: Any = None
        self._cluster: Any = None
        self._scratch: str | None = None  # the embedded cluster's private scratch directory, while it runs
        self._closed = False

    @property
    def client(self) -> Any:
        """The `distributed.Client` once started (``None`` before), to inspect the cluster with."""
        return self._client

    async def start(self) -> None:
        """Connect to the scheduler, starting the embedded cluster first when there is no address.

        Raises:
            ConfigurationError: the event loop is not asyncio.
            ConcurrencyError: the scheduler could not be reached.
        """
        _require_asyncio()
        self._closed = False
        if self._client is not None:
            return
        distributed = self._distributed
        cluster = scratch = None
        security = self.security
        try:
            if self.address is None:
                # Certificates for this cluster alone, in memory: the nannies hand them to the workers they
                # spawn over their private pipes, and a process without them cannot even finish a handshake.
                security = await anyio.to_thread.run_sync(distributed.Security.temporary)  # an RSA key: ~0.1 s of CPU
                scratch = _private_scratch()
                cluster = await distributed.LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    scheduler_port=0,
                    dashboard_address="127.0.0.1:0",  # the default, 8787, may be taken: a second cluster, a proxy
                    security=security,
                    asynchronous=True,
                    local_directory=scratch,  # the nannies' and the workers'
                    scheduler_kwargs={"local_directory": scratch},
                )
            # Not the default client: the app may have one of its own, and `dask.compute` would pick ours.
            client = await distributed.Client(
                cluster or self.address, security=security, asynchronous=True, set_as_default=False
            )
        except OSError as exc:
            await self._close(None, cluster, scratch)
            where = f"the dask scheduler at {self.address}" if self.address else "the embedded dask cluster"
            raise ConcurrencyError(f"cannot reach {where}: {exc}") from exc
        except BaseException:
            await self._close(None, cluster, scratch)
            raise
        self._client, self._cluster, self._scratch = client, cluster, scratch

    @property
    def scratch_directory(self) -> str | None:
        """The embedded cluster's private scratch directory while it runs (``None``: none, or an external cluster)."""
        return self._scratch

    def prepare(self, tasks: list[Task]) -> list[Task]:
        """Pickle deferred tasks once, when `defer()` accepts them: the cluster runs their state of then."""
        return [dataclasses.replace(task, prepared=dumps_task(task)) for task in tasks]

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        """Run the tasks on the cluster; see `Driver.execute`."""
        if self._closed:
            raise ConcurrencyClosed("this dask driver has been closed")
        if self._client is None:
            await self.start()
        payloads = []
        for index, task in enumerate(tasks):
            payloads.append(task.prepared if isinstance(task.prepared, bytes) else dumps_task(task))
            if index % 512 == 511:
                await anyio.lowlevel.checkpoint()
        client = self._client
        keys = [f"concurrency-{_name(task)}-{uuid.uuid4().hex}" for task in tasks]
        futures = client.map(_run_pickled, payloads, key=keys, pure=False)
        index_of = {future.key: index for index, future in enumerate(futures)}
        unfinished = len(futures)
        self._unfinished += unfinished
        try:
            done = self._distributed.as_completed(futures, loop=client.loop)
            async for first in done:
                batch = [first, *done.next_batch(block=False)]
                for future, outcome, seconds in await self._outcomes(batch, tasks, index_of):
                    outcomes[index_of[future.key]] = outcome
                    self._counters.record(outcome, seconds)
                    unfinished -= 1
                    self._unfinished -= 1
        except BaseException:
            self._counters.timed_out += unfinished
            with anyio.CancelScope(shield=True):
                await client.cancel(futures, reason="the starlette-concurrency call was cancelled or timed out")
            raise
        finally:
            self._unfinished -= unfinished

    def stats(self) -> Stats:
        """Return a snapshot of the cluster's workers and of this driver's tasks; cheap, no I/O.

        `workers` is the cluster's worker count as the client last heard it from the scheduler (every
        2 s, ``distributed.client.scheduler-info-interval``). The client cannot tell without asking
        the scheduler which of its tasks are running, so `busy` and `queued` are an estimate: this
        driver's unfinished tasks up to the cluster's thread count are counted busy, the rest queued
        (other clients' tasks on a shared cluster are not seen). Run times are measured in the
        workers. `worker_restarts` stays 0: Dask's nannies replace workers out of the client's sight.
        """
        workers = threads = 0
        if self._client is not None:
            info = self._client.scheduler_info()  # an asynchronous client returns its cached copy: no I/O
            known = info.get("workers") or {}
            workers = int(info.get("n_workers", len(known)))
            threads = int(info.get("total_threads", sum(int(w.get("nthreads", 1)) for w in known.values())))
        busy = min(self._unfinished, threads)
        return self._counters.snapshot(self.name, workers=workers, busy=busy, queued=self._unfinished - busy)

    async def _outcomes(
        self, batch: list[Any], tasks: Sequence[Task], index_of: dict[Any, int]
    ) -> list[tuple[Any, Outcome, float | None]]:
        """Fetch the results of a batch of finished futures in one round trip; decode them, with their run times."""
        finished = [future for future in batch if future.status in ("finished", "lost")]
        answers: dict[Any, tuple[bytes, bytes, float]] = {}
        if finished:
            try:
                answers = dict(zip([f.key for f in finished], await self._client.gather(finished), strict=True))
            except Exception:  # a result was lost between finishing and the gather: take them one by one
                answers = {}
        result: list[tuple[Any, Outcome, float | None]] = []
        for future in batch:
            task = tasks[index_of[future.key]]
            if future.key in answers:
                result.append((future, *_decode(answers[future.key], task)))
                continue
            try:
                result.append((future, *_decode(await future, task)))
            except Exception as exc:
                result.append((future, Outcome(error=await self._translate(exc, future, task)), None))
        return result

    async def _translate(self, exc: Exception, future: Any, task: Task) -> BaseException:
        """Turn what Dask raised for a task's future into the error the caller sees."""
        distributed = self._distributed
        if isinstance(exc, distributed.KilledWorker):
            crashed = WorkerCrashed(f"the dask workers running {task.label} died: {exc}")
            crashed.__cause__ = exc
            return crashed
        if future.status == "cancelled":
            return ConcurrencyError(f"the dask cluster cancelled {task.label}: {exc}")
        # `_run_pickled` itself failed: most likely this package is not importable on the worker.
        frames = await future.traceback()
        text = "".join(traceback.format_tb(frames)) if frames is not None else ""
        error = remote_exception(exc, f"Traceback (most recent call last):\n{text}{type(exc).__name__}: {exc}\n")
        error.add_note(f"(the dask worker could not run {task.label}; is starlette-concurrency installed there?)")
        return error

    async def aclose(self) -> None:
        """Close the client, and the embedded cluster if the driver started one."""
        if self._closed:
            return
        self._closed = True
        client, cluster, scratch = self._client, self._cluster, self._scratch
        self._client = self._cluster = self._scratch = None
        await self._close(client, cluster, scratch)

    @staticmethod
    async def _close(client: Any, cluster: Any, scratch: str | None = None) -> None:
        with anyio.CancelScope(shield=True):
            try:
                if client is not None:
                    await client.close()
                if cluster is not None:
                    await cluster.close()
            finally:
                if scratch is not None:  # spilled data may be large: off the event loop
                    await anyio.to_thread.run_sync(functools.partial(shutil.rmtree, scratch, ignore_errors=True))


def _private_scratch() -> str:
    """Make the embedded cluster's scratch directory: new, mode 0700, under Dask's ``temporary-directory``."""
    import dask.config

    return tempfile.mkdtemp(prefix="starlette-concurrency-dask-", dir=dask.config.get("temporary-directory", None))


def _decode(answer: tuple[bytes, bytes, float], task: Task) -> tuple[Outcome, float]:
    tag, body, seconds = answer
    return decode_outcome(tag, body, task), seconds


def _name(task: Task) -> str:
    # What the dashboard groups tasks by: `concurrency-report`, `concurrency-_lambda_`.
    fn = task.fn
    name = getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", None)
    return re.sub(r"[^\w.]", "_", name or type(fn).__qualname__)


# In the worker ----------------------------------------------------------------------------------


def _run_pickled(payload: bytes) -> tuple[bytes, bytes, float]:
    """Run one task in a Dask worker thread: (tag, body) of how it ended (`_wire/outcome.py`), and its time.

    Never raises.
    """
    import cloudpickle  # type: ignore[import-untyped]

    started = time.perf_counter()
    try:
        fn = cloudpickle.loads(payload)
    except BaseException as exc:
        return protocol.LOAD_FAILED, wire_outcome.describe(exc), time.perf_counter() - started
    tag, body = wire_outcome.encode(functools.partial(_call, fn), cloudpickle.dumps)
    return tag, body, time.perf_counter() - started


def _call(fn: Callable[[], Any]) -> Any:
    value = fn()
    if hasattr(value, "__await__"):
        # Worker threads have no event loop of their own, so each coroutine task gets a fresh one.
        return asyncio.run(_until_cancelled(value))
    return value


async def _until_cancelled(awaitable: Awaitable[Any]) -> Any:
    """Await the task, cancelling it as soon as its Dask key is released (the caller cancelled it)."""
    task = asyncio.ensure_future(awaitable)
    released = _release_probe()
    while released is not None:
        done, _ = await asyncio.wait({task}, timeout=_POLL)
        if done:
            break
        if released():
            task.cancel()
            break
    return await task


def _release_probe() -> Callable[[], bool] | None:
    try:
        from distributed import get_worker

        worker = get_worker()
        key = worker.get_current_task()
    except Exception:  # not in a Dask worker (a test calling `_run_pickled` directly)
        return None

    def released() -> bool:
        # Read-only look at the worker's state from the task's thread: a dict lookup, atomic under the GIL.
        state = worker.state.tasks.get(key)
        return state is None or state.state in ("cancelled", "released", "forgotten")

    return released


def create(settings: Settings) -> DaskDriver:
    """Build the driver from a facade's settings.

    Raises:
        ConfigurationError: Dask distributed is not installed, the address or the TLS settings are invalid.
    """
    return DaskDriver(settings.options_for(DaskOptions), workers=settings.workers, variables=settings.variables)
