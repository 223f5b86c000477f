"""Deferred work: each request's batch, the batches under way, and the drain at shutdown.

A middleware (ASGI or WSGI) opens a `RequestBatch` per request with `Concurrency.request_batch()`
and activates it around the app: `defer()` appends to the active batch (a ContextVar, shared with
the tasks and threads the request spawns). Once the response has been sent the middleware calls
`finish()`, which hands the batch to `DeferredWork` to run on the facade's host loop (with a journal,
`commit()` first: see below). That is the whole interface between a middleware and the facade.

`DeferredWork` keeps count of what was accepted and not yet finished, runs each batch (the one
place deferred tasks reach a driver), logs failures and drops by name with structured fields, and
drains at shutdown. With a journal (see `_journal`) it writes each batch there before it starts — a
request's before its response ends: the middleware calls `commit()` before sending the last part,
waits for the journal's writer thread, sends, then `finish()` starts what was written — and settles
each entry once the batch has finished: done (it ran, or raised), dead (it would not load
in the worker, or crashed its worker `max_attempts` times), or left pending for the next start (the
drain stopped it, or the process is exiting).

Each task travels with its `Terms`: its `defer(key=...)`, its retries and backoff, and which attempt
it is. A task that raises with retries left runs again after its backoff, as a batch of its own that
stays counted (pending) meanwhile; with a journal its entry records the failure first, so a retry
waiting at a crash runs at the next start. Every attempt runs with its `Deferral` set (see
`_context.carry_deferral`), which the task reads with `current_deferral()`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import anyio.to_thread

from . import _tracing as tracing
from ._closures import Payload
from ._context import carry_deferral
from ._drivers.base import Driver
from ._exceptions import ConcurrencyClosed, DeferralRejected, WorkerCrashed
from ._journal import Entry, Journal, NewEntry, PayloadKind
from ._pickling import TaskLoadFailed
from ._tasks import NOT_STARTED, Outcome, Task, function_name

__all__ = ["Deferred", "DeferredWork", "DisconnectWatch", "Gate", "HostStopping", "RequestBatch"]

logger = logging.getLogger("starlette_concurrency")

# What the log line of a task that did not run adds when its journal entry stays for the next start.
_KEPT = "; it stays in the journal and runs at the next start"

# How many batches the journal's writer thread writes in one transaction at most.
_WRITE_GROUP = 256

# How long a response's end waits for the journal to write its request's batch (see `RequestBatch.commit`). A
# write that fails (a full disk) ends the wait at once; one that waits for another process's lock, after 5 s.
_JOURNAL_WAIT = 30.0

# How often a drain or `wait_deferred()` looks at the count: batches settle from any thread, and no
# anyio primitive may be shared across the loops that call these.
_POLL = 0.01


class HostStopping(ConcurrencyClosed):
    """Raised when work begins on a host whose drain is over (it is closing its drivers)."""


@dataclass(frozen=True, slots=True)
class Terms:
    """What `defer()` said of one task, and how far it has come."""

    key: str | None = None  # `defer(fn, key=...)`: no other task of that key runs while this one is pending
    retries: int = 0  # `defer(retries=...)`: how many times it runs again after raising
    backoff: float = 0.0  # seconds before its first retry, doubling at each one
    attempt: int = 1  # which start this is, from 1 (a retry, and a run again after a crash, each add one)
    failures: int = 0  # how many of its starts ended in an exception it raised

    def retried(self) -> Terms:
        """The terms of its next attempt, after it raised."""
        return replace(self, attempt=self.attempt + 1, failures=self.failures + 1)

    @property
    def delay(self) -> float:
        """Seconds to wait before this attempt: none for a first run, else the backoff, doubled per retry."""
        return self.backoff * 2 ** (self.failures - 1) if self.failures else 0.0


_PLAIN = Terms()


def _keys(terms: Sequence[Terms]) -> list[str | None]:
    return [term.key for term in terms]


@dataclass(frozen=True, slots=True)
class Deferred:
    """One `defer()` call: its tasks, the driver to run them on, whether errors also run them, its terms."""

    driver: str
    tasks: list[Task]
    always: bool
    terms: Terms = _PLAIN

    @property
    def key(self) -> str | None:
        return self.terms.key


class DisconnectWatch(Protocol):
    """What `run()` needs from a request to stop its call when the client goes away."""

    def applies(self) -> bool:
        """Tell whether the current task can watch this request (same event loop thread)."""

    async def watch(self, scope: anyio.CancelScope) -> None:
        """Cancel `scope` when the client disconnects; return or be cancelled otherwise."""


class RequestBatch:
    """What one request deferred, in call order; started once its response has been sent.

    Attributes:
        method: the request's method, for logs.
        path: the request's path, for logs.
        disconnect: how `run()` learns that the client went away (set by the ASGI middleware).
    """

    def __init__(self, work: DeferredWork, method: str | None, path: str | None) -> None:
        self.method = method
        self.path = path
        self.disconnect: DisconnectWatch | None = None
        self._work = work
        self._entries: list[Deferred] = []
        self._calls = 0  # defer() calls joined so far
        self._lock = threading.Lock()
        self._outcome: bool | None = None  # None while the request is open; then whether it succeeded
        self._gate: Gate | None = None  # what `commit()` wrote, handed over by `finish()`
        work.opened(self)

    def activate(self) -> Token[RequestBatch | None]:
        """Make `defer()` in this context join this batch; pass the token to `deactivate()`."""
        return self._work.current.set(self)

    def deactivate(self, token: Token[RequestBatch | None]) -> None:
        """Undo `activate()`."""
        self._work.current.reset(token)

    def add(self, entry: Deferred) -> None:
        """Join a `defer()` call to the batch, or start it at once if the response is already out."""
        with self._lock:
            self._calls += 1
            if self._calls > 1:  # its keys repeat the first call's: its labels say which call
                entry = replace(entry, tasks=[replace(task, call=self._calls) for task in entry.tasks])
            outcome = self._outcome
            if outcome is None:
                self._entries.append(entry)
                return
        # Deferred after the response (from a BackgroundTask, a streaming generator's tail): it
        # follows the fate of its request.
        self._work.start([entry], outcome, self)

    def commit(self, succeeded: bool) -> Gate | None:
        """With a journal, write what will run before the response ends: call it just before its last part goes out.

        Writes what `finish(succeeded)` would start (all of it if the request `succeeded`, the
        ``always`` tasks otherwise) to the journal, in the writer thread's next transaction, and
        keeps it for `finish()`, which starts it without writing it again. Once committed, the work
        runs even if the response's end then fails to go out: it is in the journal, which would run
        it after a crash anyway. What is deferred after this call is written by `finish()`, as
        without a commit.

        Returns:
            The gate to wait for (``wait()`` or ``wait_async()``) before sending the last part: open
            once the work is in the journal (or its write failed: logged, it then runs unjournaled);
            ``None`` if there is nothing to wait for (no journal, nothing that will run, already
            committed or finished).
        """
        if self._work.journal is None:
            return None
        with self._lock:
            if self._outcome is not None or self._gate is not None:
                return None
            entries, self._entries = self._entries, []
            self._gate = gate = Gate()
        self._work.start(entries, succeeded, self, gate)
        return gate.sealed()

    def finish(self, succeeded: bool) -> None:
        """Start the batch: all of it if the request `succeeded`, the ``always`` tasks otherwise.

        Idempotent: the first call decides (what `commit()` wrote runs in any case). Returns at once;
        the work runs on the facade's loop.
        """
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = succeeded
            entries, self._entries = self._entries, []
            gate = self._gate
        self._work.closed(self)
        self._work.start(entries, succeeded, self)
        if gate is not None:
            gate.release()

    def abandon(self) -> list[Task]:
        """Drop what the batch holds (the facade is shutting down while the request is open); count it out."""
        with self._lock:
            entries, self._entries = self._entries, []
            self._outcome = False
            gate = self._gate
        if gate is not None:  # committed: in the journal, and counted as launched; the drain decides its fate
            gate.release()
        tasks = [task for entry in entries for task in entry.tasks]
        if tasks:
            self._work.settle_skipped(len(tasks))
        self._work.release_keys([entry.key for entry in entries])
        return tasks


@dataclass(eq=False)
class _Running:
    """A deferred batch under way: what shutdown cancels when the drain time runs out."""

    driver: str
    tasks: Sequence[Task]
    origin: RequestBatch | None
    outcomes: list[Outcome | None]
    started: float = field(default_factory=time.monotonic)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    abandoned_because: str | None = None  # set by the drain when it stops the batch
    logged: set[int] = field(default_factory=set)  # tasks whose fate was logged already (timed out, could not run)
    entries: list[int | None] | None = None  # each task's journal entry (None: not journaled)
    kept: set[int] = field(default_factory=set)  # tasks logged as not run whose entries stay in the journal
    terms: list[Terms] | None = None  # each task's terms (None: all plain); its key is held until it settles
    waiting: bool = False  # a retry waiting for its backoff: its start is not counted in the journal yet

    def each_terms(self) -> list[Terms]:
        """Each task's terms (plain ones when the batch was given none)."""
        return self.terms or [_PLAIN] * len(self.tasks)


class Gate:
    """A request's batch committed before its response's end: each part starts once written and released.

    The journal's writer thread reports each part (a batch per driver) written; the middleware waits
    for that (`wait()`, `wait_async()`), sends the response's end, then releases the gate. Whichever of the two
    comes second for a part hands it over: the work starts after the response, and never waits for a
    write that the response stopped waiting for.
    """

    def __init__(self) -> None:
        self.written = threading.Event()
        self._lock = threading.Lock()
        self._parts = 1  # the commit's own hold: not written before every part has been queued
        self._ready: list[Callable[[], None]] = []  # parts written, waiting for the release
        self._released = False
        self._wakers: list[Callable[[], None]] = []  # called once every part is written

    def add(self) -> None:
        """Count in a part queued for the writer."""
        with self._lock:
            self._parts += 1

    def wrote(self, hand_over: Callable[[], None] | None) -> None:
        """A part is written (``None``: nothing of it is left to run); hand it over now if released."""
        with self._lock:
            now = hand_over is not None and self._released
            if hand_over is not None and not now:
                self._ready.append(hand_over)
            self._parts -= 1
            written = self._parts == 0
        if now:
            assert hand_over is not None
            hand_over()
        if written:
            with self._lock:
                self.written.set()
                wakers, self._wakers = self._wakers, []
            for wake in wakers:
                wake()

    def sealed(self) -> Gate | None:
        """Every part is queued: the gate to wait for, or ``None`` if nothing was queued (or all is written)."""
        self.wrote(None)
        return None if self.written.is_set() else self

    def wait(self) -> None:
        """Block until every part is written (a WSGI server's thread); bounded, see `_log_late`."""
        if not self.written.wait(_JOURNAL_WAIT):
            _log_late()

    async def wait_async(self) -> None:
        """Wait until every part is written, without blocking the loop or taking a thread; bounded."""
        token = anyio.lowlevel.current_token()
        done = anyio.Event()

        def wake() -> None:  # on the writer's thread: the loop sets the event
            with contextlib.suppress(BaseException):  # the loop has ended: nobody waits any more
                token.backend_class.run_sync_soon(done.set, (), token.native_token)

        with self._lock:  # `wrote()` sets `written` under it: no wake is lost between the two
            waiting = not self.written.is_set()
            if waiting:
                self._wakers.append(wake)
        if not waiting:
            return
        with anyio.move_on_after(_JOURNAL_WAIT) as late:
            await done.wait()
        if late.cancelled_caught:
            _log_late()

    def release(self) -> None:
        """The response's end is out (or will never be): start what is written, and the rest once it is."""
        with self._lock:
            self._released = True
            ready, self._ready = self._ready, []
        for hand_over in ready:
            hand_over()


def _log_late() -> None:
    """Say that a response stopped waiting for the journal (bounded: it never hangs on the journal).

    Nothing is lost but durability: the batch is written whenever the journal answers, and starts once it is.
    """
    logger.warning(
        "the journal did not write a request's deferred work within %s s: its response goes out first, and a "
        "crash before the write loses that work",
        _JOURNAL_WAIT,
    )


@dataclass(eq=False)
class _Unwritten:
    """A batch waiting for the journal's writer thread: written, then handed to the host (or to its gate)."""

    driver: str
    tasks: list[Task]
    origin: RequestBatch | None
    join: bool
    terms: list[Terms] | None
    gate: Gate | None = None


# What the writer hands over of a batch: its tasks to run, their journal entries (None: unjournaled), their terms.
_Written = tuple[list[Task], list[int | None] | None, list[Terms] | None]

Submit = Callable[[Callable[[], Coroutine[Any, Any, None]], Callable[[BaseException], None], bool, int], None]


class DeferredWork:
    """Accepted deferred tasks of one facade: counted, run, drained.

    Every accepted task has exactly one fate, decided in one place: it ran (and failed or not, logged
    if it failed), it was skipped (its request failed), or it is logged by name as not run — dropped
    (it could not be handed to a host) or abandoned (stopped by the drain, or by its loop's end), saying
    whether it was still queued or already under way. Never two of them.

    Args:
        max_pending: how many tasks may be pending at once (``None``: no bound).
        timeout: how long one batch may run, in seconds (``None``: no limit).
        driver: returns the started driver of a name, on the host loop.
        submit: starts a coroutine function in the background on the host loop, from any thread,
            without waiting, or calls its second argument with the reason it cannot.
    """

    def __init__(
        self,
        max_pending: int | None,
        timeout: float | None,
        driver: Callable[[str], Awaitable[Driver]],
        submit: Submit,
    ) -> None:
        self.current: ContextVar[RequestBatch | None] = ContextVar("starlette_concurrency.batch", default=None)
        self.pending = 0  # accepted and not yet settled; includes open requests' tasks
        self.launched = 0  # handed to the host and not yet settled
        self._max_pending = max_pending
        self._timeout = timeout
        self._driver = driver
        self._submit = submit
        self._lock = threading.Lock()  # defer() is called from any thread
        self._open: set[RequestBatch] = set()
        self._keys: set[str] = set()  # keys of `defer(key=...)` tasks accepted and not settled
        self._running: set[_Running] = set()
        self._stop_reason = ""  # why a batch that begins on a stopping host does not run (for its log line)
        self.journal: Journal | None = None  # set by the runtime when the facade has one
        self._writes: list[_Unwritten] = []  # batches waiting for the journal's writer thread
        self._writes_ready = threading.Condition()
        self._writer: threading.Thread | None = None
        self.replayed = 0  # journal entries of earlier runs (or gone owners) handed to a host

    def opened(self, batch: RequestBatch) -> None:
        with self._lock:
            self._open.add(batch)

    def closed(self, batch: RequestBatch) -> None:
        with self._lock:
            self._open.discard(batch)

    def reserve(self, count: int) -> None:
        """Count tasks in before they are accepted (the caller has checked that the facade accepts work).

        Raises:
            DeferralRejected: `max_pending_deferred` would be exceeded.
        """
        with self._lock:
            limit = self._max_pending
            if limit is not None and self.pending + count > limit:
                raise DeferralRejected(
                    f"defer() of {count} task(s) refused: {self.pending} deferred task(s) are already pending "
                    f"and max_pending_deferred is {limit}; run the work inline, retry later or answer 503"
                )
            self.pending += count

    def hold_key(self, key: str) -> bool:
        """Take a `defer(key=...)` key for a task about to be accepted; False if a task of that key is pending."""
        with self._lock:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True

    def release_keys(self, keys: Sequence[str | None]) -> None:
        """Let tasks of these keys be deferred again (theirs have settled)."""
        with self._lock:
            self._keys.difference_update(key for key in keys if key is not None)

    def settle_skipped(self, count: int) -> None:
        """Count out tasks that will not be launched (their request's batch was abandoned)."""
        self._settle(count, launched=False)

    def _settle(self, count: int, launched: bool) -> None:
        with self._lock:
            if count > self.pending or (launched and count > self.launched):  # pragma: no cover - a bug
                logger.error("deferred work counted out twice: %d task(s)", count)
            self.pending = max(0, self.pending - count)
            if launched:
                self.launched = max(0, self.launched - count)

    def start(
        self, entries: list[Deferred], succeeded: bool, origin: RequestBatch | None, gate: Gate | None = None
    ) -> None:
        """Launch what a finished request deferred (everything, or only ``always`` entries); `gate`: see `commit()`."""
        chosen: dict[str, tuple[list[Task], list[Terms]]] = {}
        skipped: list[Deferred] = []
        for entry in entries:
            if succeeded or entry.always:
                tasks, terms = chosen.setdefault(entry.driver, ([], []))
                tasks.extend(entry.tasks)
                terms.extend([entry.terms] * len(entry.tasks))
            else:
                skipped.append(entry)
        if skipped:
            tracing.end(
                [task for entry in skipped for task in entry.tasks],
                [None] * sum(len(entry.tasks) for entry in skipped),
                "not run: its request failed",
            )
            self._settle(sum(len(entry.tasks) for entry in skipped), launched=False)
            self.release_keys([entry.key for entry in skipped])
        for driver, (tasks, terms) in chosen.items():
            self.launch(
                driver, tasks, origin, terms=None if all(term == _PLAIN for term in terms) else terms, gate=gate
            )

    def launch(
        self,
        driver: str,
        tasks: list[Task],
        origin: RequestBatch | None,
        *,
        join: bool = True,
        entries: list[int | None] | None = None,
        terms: list[Terms] | None = None,
        delay: float = 0.0,
        gate: Gate | None = None,
    ) -> None:
        """Hand accepted tasks to the host loop without waiting; if that is impossible, log each by name.

        `join`: a host that drains takes them into its drain (a request's batch, accepted before the
        drain); otherwise they wait for the next host. `entries`: the tasks' journal entries when they
        are replayed or run again; otherwise, with a journal, the journal's writer thread writes them
        first (see `_write_loop`) and hands them over then. `terms`: each task's terms (its key is
        released when it settles). `delay`: seconds to wait before they start (a retry's backoff).
        `gate`: a request's `commit()`; written tasks start when it is released.
        """
        with self._lock:
            self.launched += len(tasks)  # now, written or not: a drain waits for them
        if entries is None and self.journal is not None:
            if gate is not None:
                gate.add()
            with self._writes_ready:
                self._writes.append(_Unwritten(driver, tasks, origin, join, terms, gate))
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._write_loop, name="starlette-concurrency-journal", daemon=True
                    )
                    self._writer.start()
                self._writes_ready.notify()
            return
        if gate is not None:  # no journal after all (a forked child's failed reopen): after the response all the same
            gate.add()
            gate.wrote(functools.partial(self._hand_over, driver, tasks, origin, join, entries, terms, delay))
            return
        self._hand_over(driver, tasks, origin, join, entries, terms, delay)

    def _hand_over(
        self,
        driver: str,
        tasks: list[Task],
        origin: RequestBatch | None,
        join: bool,
        entries: list[int | None] | None,
        terms: list[Terms] | None,
        delay: float = 0.0,
    ) -> None:
        async def run() -> None:
            await self.run_batch(driver, tasks, origin, entries, terms, delay)

        def failed(exc: BaseException) -> None:
            tracing.end(tasks, [None] * len(tasks), "could not be started")
            for index, task in enumerate(tasks):
                logger.error(
                    "deferred %s dropped (not run): it could not be started (%s)%s",
                    task.label,
                    exc,
                    _KEPT if entries is not None and entries[index] is not None else "",
                    extra=_extra(task, driver, origin),
                )
            self._settle(len(tasks), launched=True)
            if terms is not None:
                self.release_keys(_keys(terms))

        self._submit(run, failed, join, len(tasks))

    def _write_loop(self) -> None:
        """The journal's writer thread: write what waits in one transaction (group commit), then hand it over.

        Off the event loops: a request's batch costs its loop an append to a list; a transaction costs
        what a few of them do, whatever the number of requests it writes.
        """
        while True:
            with self._writes_ready:
                while not self._writes:
                    self._writes_ready.wait()
                group, self._writes = self._writes[:_WRITE_GROUP], self._writes[_WRITE_GROUP:]
            try:
                written = self._write(group)
            except Exception:  # never lose the batches: run them unjournaled, and say so
                logger.exception("the journal's writer failed; %d batch(es) run unjournaled", len(group))
                written = [(batch.tasks, None, batch.terms) for batch in group]
            for batch, (tasks, entries, terms) in zip(group, written, strict=True):
                hand_over = (
                    functools.partial(self._hand_over, batch.driver, tasks, batch.origin, batch.join, entries, terms)
                    if tasks
                    else None
                )
                if batch.gate is not None:  # its response's end waits for the write; the work, for that end
                    batch.gate.wrote(hand_over)
                elif hand_over is not None:
                    hand_over()

    def _write(self, group: list[_Unwritten]) -> list[_Written]:
        """Write batches to the journal in one transaction; on failure log it and run them unjournaled.

        Returns:
            Per batch, the tasks to run, their entries and keys: without those whose key is already
            pending in the journal (another process's, or left by an earlier run).
        """
        journal = self.journal
        assert journal is not None
        new: list[NewEntry] = []
        positions: list[tuple[int, int]] = []  # (batch, task) of each new entry
        for number, batch in enumerate(group):
            origin = batch.origin
            method, path = (origin.method, origin.path) if origin is not None else (None, None)
            for index, task in enumerate(batch.tasks):
                prepared = task.prepared
                if isinstance(prepared, Payload) and not prepared.skeletons:
                    kind, data = PayloadKind.PAYLOAD, prepared.data
                elif isinstance(prepared, bytes):
                    kind, data = PayloadKind.BYTES, prepared
                else:  # a driver that keeps no pickled form: nothing to replay from
                    continue
                term = batch.terms[index] if batch.terms is not None else _PLAIN
                new.append(
                    NewEntry(
                        batch.driver,
                        kind,
                        data,
                        task.label,
                        _entry_key(task.key),
                        function_name(task.fn),
                        task.call,
                        method,
                        path,
                        term.key,
                        term.retries,
                        term.backoff,
                    )
                )
                positions.append((number, index))
        unwritten: list[_Written] = [(batch.tasks, None, batch.terms) for batch in group]
        if not new:
            return unwritten
        try:
            ids = journal.append(new)
        except sqlite3.Error as exc:  # a full disk, a file removed under us: run the work anyway, and say so
            for batch in group:
                origin = batch.origin
                logger.error(
                    "deferred batch of %d task(s) could not be written to the journal %r (%s): it runs, but a "
                    "crash before it finishes loses it; free disk space or fix the file",
                    len(batch.tasks),
                    journal.path,
                    exc,
                    extra={
                        "driver": batch.driver,
                        "method": origin.method if origin is not None else None,
                        "path": origin.path if origin is not None else None,
                    },
                )
            return unwritten
        entries: list[list[int | None]] = [[None] * len(batch.tasks) for batch in group]
        for (number, index), entry_id in zip(positions, ids, strict=True):
            entries[number][index] = entry_id
        written: list[_Written] = []
        for number, batch in enumerate(group):
            terms = batch.terms
            keys = _keys(terms) if terms is not None else [None] * len(batch.tasks)
            duplicates = [
                index for index in range(len(batch.tasks)) if keys[index] is not None and entries[number][index] is None
            ]
            if not duplicates:
                written.append((batch.tasks, entries[number], terms))
                continue
            assert terms is not None  # only a key makes an entry a duplicate
            for index in duplicates:
                logger.info(
                    "deferred %s not run: a task of key %r is already pending in the journal",
                    batch.tasks[index].label,
                    keys[index],
                    extra=_extra(batch.tasks[index], batch.driver, batch.origin),
                )
            self._settle(len(duplicates), launched=True)
            self.release_keys([keys[index] for index in duplicates])
            kept = [index for index in range(len(batch.tasks)) if index not in duplicates]
            written.append(
                (
                    [batch.tasks[index] for index in kept],
                    [entries[number][index] for index in kept],
                    [terms[index] for index in kept],
                )
            )
        return written

    def replay(self, driver: str, entries: list[Entry]) -> None:
        """Run journal entries left by an earlier run (or a gone owner) as deferred work, outside any request."""
        tasks = [replay_task(entry) for entry in entries]
        terms = [
            Terms(entry.user_key, entry.retries, entry.backoff, entry.attempts, entry.failures) for entry in entries
        ]
        with self._lock:
            self.pending += len(tasks)
            self.replayed += len(tasks)
        self.launch(driver, tasks, None, join=False, entries=[entry.id for entry in entries], terms=terms)

    async def run_batch(
        self,
        driver_name: str,
        tasks: list[Task],
        origin: RequestBatch | None,
        entries: list[int | None] | None = None,
        terms: list[Terms] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Run one deferred batch (after `delay` seconds: a retry's backoff), log how it went, and never raise."""
        running = _Running(
            driver_name, tasks, origin, [None] * len(tasks), entries=entries, terms=terms, waiting=delay > 0
        )
        with self._lock:
            self._running.add(running)
        under_way = False
        unfinished = "stopped"  # what became of a task left without an outcome, for its span
        try:
            with running.scope:
                if delay:  # still pending meanwhile: a drain waits for it, or logs it as never started
                    await anyio.sleep(delay)
                    await self._count_starts(running)
                driver = await self._driver(driver_name)
                under_way = True
                with anyio.move_on_after(self._timeout or math.inf) as timeout:
                    # The one place deferred tasks reach a driver.
                    await driver.execute_deferred(_attempts(running), running.outcomes)
                if timeout.cancelled_caught:
                    unfinished = "timed out"
                    for index, (task, outcome) in enumerate(zip(tasks, running.outcomes, strict=True)):
                        if outcome is None or outcome is NOT_STARTED:
                            logger.error(
                                "deferred %s timed out after %s s %s; raise the facade's timeout or split the work",
                                task.label,
                                self._timeout,
                                "and was stopped" if outcome is None else "before it started",
                                extra=self._extra(task, running),
                            )
                            running.logged.add(index)
        except HostStopping:  # handed to a host whose drain was forced before the batch began
            running.abandoned_because = self._stop_reason or "its host stopped before it began"
        except Exception as exc:  # the batch could not run at all: pickling, a pool that cannot start...
            unfinished = f"could not run: {exc}"
            for index, (task, outcome) in enumerate(zip(tasks, running.outcomes, strict=True)):
                if outcome is None:
                    kept = entries is not None and entries[index] is not None  # not the task's fault: keep it
                    logger.error(
                        "deferred %s could not run: %s%s",
                        task.label,
                        exc,
                        _KEPT if kept else "",
                        exc_info=exc,
                        extra=self._extra(task, running),
                    )
                    running.logged.add(index)
                    if kept:
                        running.kept.add(index)
        except BaseException:
            if running.abandoned_because is None:
                running.abandoned_because = "its event loop ended (or the host was cancelled) before it finished"
            raise
        finally:
            tracing.end(tasks, running.outcomes, running.abandoned_because or unfinished)
            if self._claim(running):
                self._fates(running, under_way)

    async def _count_starts(self, running: _Running) -> None:
        """Count in the journal the start of a retry that waited for its backoff (see `Journal.retry_later`)."""
        journal, ids = self.journal, [entry for entry in running.entries or () if entry is not None]
        running.waiting = False
        if journal is not None and ids:
            try:
                await anyio.to_thread.run_sync(journal.started, ids)
            except sqlite3.Error as exc:  # its attempt count lags by one: it only ever runs sooner
                logger.error("the journal %r could not count a retry's start: %s", journal.path, exc)

    def _claim(self, running: _Running) -> bool:
        """Take a batch out of the running set: whoever does logs its fates (once)."""
        with self._lock:
            if running not in self._running:
                return False
            self._running.discard(running)
            return True

    def _fates(self, running: _Running, under_way: bool) -> None:
        """Log what became of each task of a finished batch (once), and count the batch out."""
        entries = running.entries or [None] * len(running.tasks)
        terms = running.each_terms()
        done: list[int] = []
        unstarted: list[int] = []  # entries that stay, and whose start did not happen after all
        settled: list[tuple[int, int, BaseException]] = []  # (task, entry) that crashed or would not load
        retried: list[int] = []  # tasks that raised with retries left
        for index, (task, outcome) in enumerate(zip(running.tasks, running.outcomes, strict=True)):
            entry = entries[index]
            if index in running.logged:
                if entry is not None and index not in running.kept:
                    done.append(entry)
                continue
            if outcome is None or outcome is NOT_STARTED:
                began = under_way and outcome is None  # as far as anyone can tell: it may have
                if entry is not None and not began and not running.waiting:
                    unstarted.append(entry)
                logger.error(
                    "deferred %s abandoned, %s: %s; raise drain_timeout (and the server's graceful timeout "
                    "above it) or make the task shorter%s",
                    task.label,
                    "stopped unfinished (it may have done part of its work)" if began else "never started",
                    running.abandoned_because or "it was stopped",
                    _KEPT if entry is not None else "",
                    extra={**self._extra(task, running), "under_way": began},
                )
            elif entry is not None and isinstance(outcome.error, TaskLoadFailed | WorkerCrashed):
                settled.append((index, entry, outcome.error))
            elif (
                outcome.error is not None
                and not isinstance(outcome.error, TaskLoadFailed)  # it would not load the next time either
                and terms[index].failures < terms[index].retries
            ):
                following = terms[index].retried()
                logger.warning(
                    "deferred %s failed (attempt %d): %s: %s; retry %d of %d in %.3g s",
                    task.label,
                    terms[index].attempt,
                    type(outcome.error).__qualname__,
                    outcome.error,
                    following.failures,
                    following.retries,
                    following.delay,
                    extra={**self._extra(task, running), "attempt": terms[index].attempt},
                )
                retried.append(index)
            else:
                if outcome.error is not None:
                    logger.error(
                        "deferred %s failed%s",
                        task.label,
                        f" (attempt {terms[index].attempt}; no retry left of {terms[index].retries})"
                        if terms[index].retries
                        else "",
                        exc_info=outcome.error,
                        extra=self._extra(task, running),
                    )
                if entry is not None:
                    done.append(entry)
        # Tasks to run again: after a crash (at the attempt the journal counted), or after raising.
        again = [
            (index, replace(terms[index], attempt=attempt), 0.0)
            for index, attempt in self._settle_journal(running, done, settled, unstarted, retried).items()
        ]
        for index in retried:
            following = terms[index].retried()
            again.append((index, following, following.delay))
        rerun = {index for index, _, _ in again}
        # Launched before this batch counts out: a drain, or `wait_deferred()`, never sees a count of 0 between.
        if again:
            with self._lock:
                self.pending += len(again)
        for delay in sorted({delay for _, _, delay in again}):
            chosen = [(index, term) for index, term, wait in again if wait == delay]
            self.launch(  # accepted before any drain: it joins one
                running.driver,
                [running.tasks[index] for index, _ in chosen],
                None,
                join=True,
                entries=[entries[index] for index, _ in chosen],
                terms=[term for _, term in chosen],
                delay=delay,
            )
        self.release_keys([term.key for index, term in enumerate(terms) if index not in rerun])
        self._settle(len(running.tasks), launched=True)

    def _settle_journal(
        self,
        running: _Running,
        done: list[int],
        settled: list[tuple[int, int, BaseException]],
        unstarted: list[int],
        retried: list[int],
    ) -> dict[int, int]:
        """Remove finished entries; note failures to retry; bury the poison; return crashed tasks to run again.

        Returns:
            The index of each crashed task to run again, with the attempt it starts.
        """
        journal = self.journal
        if journal is None or not (done or settled or unstarted or retried):
            return {}
        again: dict[int, int] = {}
        try:
            journal.done_later(done)  # removed by the facade's next flush, a tenth of a second later at most
            journal.unstarted(unstarted)
            terms = running.each_terms()
            for index in retried:
                entry_id = running.entries[index] if running.entries is not None else None
                if entry_id is not None:
                    journal.retry_later(entry_id, terms[index].retried().delay)
            for index, entry, error in settled:
                task = running.tasks[index]
                if isinstance(error, TaskLoadFailed):
                    reason = f"it would not load in the worker (its function renamed or removed?): {error}"
                else:
                    attempt = journal.restart(entry)
                    if attempt is not None:
                        logger.error(
                            "deferred %s crashed its worker (%s); it runs again (attempt %d of %d)",
                            task.label,
                            error,
                            attempt,
                            journal.max_attempts,
                            extra=self._extra(task, running),
                        )
                        again[index] = attempt
                        continue
                    reason = (
                        f"started {journal.max_attempts} times without finishing (max_attempts), the last time it "
                        f"crashed its worker: {error}"
                    )
                journal.dead(entry, reason)
                logger.error(
                    "deferred %s moved to the journal's dead entries (entry %d): %s; see `python -m "
                    "starlette_concurrency journal %s list`",
                    task.label,
                    entry,
                    reason,
                    journal.path,
                    extra=self._extra(task, running),
                )
        except sqlite3.Error as exc:  # the entries stay pending: run again at the next start (at least once)
            logger.error("the journal %r could not be updated (%s); its entries run again later", journal.path, exc)
        return again

    def _extra(self, task: Task, running: _Running) -> dict[str, Any]:
        extra = _extra(task, running.driver, running.origin)
        extra["duration"] = time.monotonic() - running.started
        return extra

    async def wait(self, timeout: float | None) -> None:
        """Wait until every launched batch has finished.

        Raises:
            TimeoutError: they had not after `timeout` seconds.
        """
        with anyio.fail_after(timeout):
            while self.launched:  # noqa: ASYNC110
                await anyio.sleep(_POLL)

    async def drain(
        self, drain_timeout: float, stop_accepting: Callable[[bool], bool], deadline: float | None = None
    ) -> None:
        """Wait up to `drain_timeout` for what was accepted (and what joins meanwhile); stop and log the rest.

        `stop_accepting(force)` ends the facade's acceptance of work once nothing is left, or at once
        when `force`; the drain calls it until it agrees. `deadline` (monotonic): an earlier end, when
        the drain's clock started before (at a signal).
        """
        draining, began = self.launched, time.monotonic()
        deadline = min(began + drain_timeout, deadline if deadline is not None else math.inf)
        if draining:
            logger.warning(
                "draining %d deferred task(s), for up to %.1f s",
                draining,
                max(0.0, deadline - began),
                extra={"pending": draining},
            )
        while True:
            forced = time.monotonic() >= deadline
            if stop_accepting(forced):
                break
            await anyio.sleep(_POLL)  # counts settle from any thread: no event to wait on
        reason = f"the {drain_timeout} s drain timeout ran out"
        late = 0
        if forced:
            # Batches handed to this host but not begun learn it from the driver getter (HostStopping).
            self._stop_reason = reason
            for running in list(self._running):
                late += len(running.tasks)
                running.abandoned_because = reason
                running.scope.cancel()
        with self._lock:
            still_open, self._open = list(self._open), set()
        for batch in still_open:
            for task in batch.abandon():
                logger.error(
                    "deferred %s abandoned, never started: its request had not finished when shutdown began",
                    task.label,
                    extra=_extra(task, None, batch),
                )
        # Let the stopped batches log their fates and count out before the drivers close under them; a
        # batch that does not come back in time is logged here (it is stopped with its driver just after).
        with anyio.move_on_after(10):
            while self._running:  # noqa: ASYNC110
                await anyio.sleep(_POLL)
        for running in list(self._running):
            if self._claim(running):
                running.abandoned_because = running.abandoned_because or reason
                self._fates(running, under_way=True)
        if draining or late:
            logger.info(
                "drain finished in %.2f s; %d deferred task(s) abandoned",
                time.monotonic() - began,
                late,
                extra={"duration": time.monotonic() - began, "abandoned": late},
            )

    def report_lost(self, reason: str) -> None:
        """Log every accepted task that can no longer run (the process is exiting), and count it out."""
        for running in list(self._running):
            if self._claim(running):
                running.abandoned_because = reason
                self._fates(running, under_way=True)
        with self._lock:
            still_open, self._open = list(self._open), set()
        for batch in still_open:
            for task in batch.abandon():
                logger.error(
                    "deferred %s abandoned, never started: %s",
                    task.label,
                    reason,
                    extra=_extra(task, None, batch),
                )

    def forget(self) -> None:
        """Drop every count: this is a forked child, the parent's work is not ours."""
        self._lock = threading.Lock()
        self.pending = self.launched = 0
        self._open.clear()
        self._running.clear()
        self._keys.clear()
        self._writes = []
        self._writes_ready = threading.Condition()
        self._writer = None  # threads do not survive a fork


def _attempts(running: _Running) -> list[Task]:
    """The batch's tasks as they run this time: each with its `Deferral` (see `current_deferral`)."""
    terms = running.each_terms()
    entries = running.entries or [None] * len(running.tasks)
    return [
        carry_deferral(task, (term.key, term.attempt, term.retries, entry))
        for task, term, entry in zip(running.tasks, terms, entries, strict=True)
    ]


class _StoredKey(str):
    """A task key read back from the journal: its repr is the original key's repr (for the label)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


class _Replayed:
    """The `fn` of a task rebuilt from the journal: it names the original callable; its pickle is what runs."""

    def __init__(self, name: str) -> None:
        self.__qualname__ = name

    def __call__(self) -> None:  # pragma: no cover - drivers run `prepared`
        raise RuntimeError(f"{self.__qualname__} was replayed from the journal: only its pickled form can run")


def replay_task(entry: Entry) -> Task:
    """Rebuild a task from a journal entry, its pickled callable in `prepared` (sent as it is)."""
    prepared: object = Payload(entry.payload, ()) if entry.kind is PayloadKind.PAYLOAD else entry.payload
    return Task(_StoredKey(entry.task_key), _Replayed(entry.function), prepared, entry.call)


def _entry_key(key: object) -> str:
    try:
        return repr(key)
    except Exception:
        return f"<{type(key).__name__}>"


def _extra(task: Task, driver: str | None, origin: RequestBatch | None) -> dict[str, Any]:
    extra: dict[str, Any] = {"task": task.label, "task_key": task.key}
    if driver is not None:
        extra["driver"] = driver
    if origin is not None:
        extra["method"], extra["path"] = origin.method, origin.path
    return extra
