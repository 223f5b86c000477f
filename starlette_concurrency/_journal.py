"""The journal: deferred tasks written to an SQLite file before they start, so that a crash loses none.

A facade with a journal (``Concurrency(journal="deferred.db")``) writes each accepted deferred batch
(the tasks' pickled callables, their labels, the request's method and path) in one transaction before
the batch starts, and deletes each entry once its task has finished. Whatever is left in the file
after a crash (SIGKILL, OOM kill, power cut) is replayed by the next facade that starts on it.

Ownership: each facade writes its entries under its own owner id and a lease (`LEASE` seconds) that it
renews while alive. An entry may be claimed by another facade only once its owner is gone: the lease
has expired, or the owner was a process of this machine that no longer exists. A claim is one
``UPDATE ... WHERE`` in an immediate transaction, so two processes never claim the same entry.

Poison: an entry claimed `max_attempts` times without finishing (it crashed its worker or the
server each time; a start that ended in an exception the task raised does not count), or whose
callable no longer unpickles (its function was renamed by a deploy), is
moved to the ``dead`` table with the reason; ``python -m starlette_concurrency journal PATH`` lists,
retries and purges them.

Retries (``defer(fn, retries=3)``): an entry keeps its allowance and backoff, how many times its task
raised (``failures``) and when its next retry is due (``not_before``); a claim takes only due entries,
so a retry waiting at a crash runs at the next start once its backoff has passed.

`Journal` is the whole interface (append, claim, done, dead, renew, release), so that another store
could stand behind it later. Every method blocks for one small transaction; a lock serialises the
threads of one process, SQLite's locking the processes sharing the file.
"""

from __future__ import annotations

import enum
import os
import socket
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ._exceptions import ConfigurationError

__all__ = ["LEASE", "SCHEMA_VERSION", "Entry", "Journal", "NewEntry", "PayloadKind"]

#: The version of the file's layout this release writes; a file of a newer one is refused, not misread.
SCHEMA_VERSION = 2

#: Seconds an owner's claim on its entries lasts unless renewed (it renews every third of it).
LEASE = 30.0

# How long a statement waits for another process's write lock before it fails.
_BUSY_TIMEOUT_MS = 5000

_FIRST_COLUMNS = "id, created, driver, kind, payload, label, task_key, function, call, method, path, attempts, user_key"
_COLUMNS = f"{_FIRST_COLUMNS}, retries, backoff, failures"

# What version 2 added (retries), with the defaults an entry of version 1 gets.
_RETRY_COLUMNS = (
    "retries INTEGER NOT NULL DEFAULT 0, backoff REAL NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0"
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    driver TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    label TEXT NOT NULL,
    task_key TEXT NOT NULL,
    function TEXT NOT NULL,
    call INTEGER NOT NULL,
    method TEXT,
    path TEXT,
    attempts INTEGER NOT NULL,
    user_key TEXT UNIQUE,
    {_RETRY_COLUMNS},
    not_before REAL NOT NULL DEFAULT 0,
    owner TEXT NOT NULL,
    lease_expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_owner ON entries (owner, lease_expires);
CREATE TABLE IF NOT EXISTS dead (
    {_FIRST_COLUMNS.replace("id,", "id INTEGER PRIMARY KEY,", 1)},
    {_RETRY_COLUMNS},
    reason TEXT NOT NULL,
    died REAL NOT NULL
);
"""


class PayloadKind(enum.Enum):
    """How an entry's payload is handed back to its driver."""

    PAYLOAD = "payload"  # the process driver's `Payload` (its bytes, no skeletons)
    BYTES = "bytes"  # plain cloudpickle bytes (the dask driver)


@dataclass(frozen=True, slots=True)
class NewEntry:
    """A deferred task to write: what it takes to run it again, and to name it."""

    driver: str
    kind: PayloadKind
    payload: bytes
    label: str
    task_key: str  # the key's repr
    function: str  # the callable's short name
    call: int
    method: str | None
    path: str | None
    user_key: str | None = None
    retries: int = 0  # `defer(retries=...)`: how many times it runs again after raising
    backoff: float = 0.0  # seconds before the first retry, doubling at each one


@dataclass(frozen=True, slots=True)
class Entry:
    """An entry read back from the journal (pending or dead)."""

    id: int
    created: float
    driver: str
    kind: PayloadKind
    payload: bytes
    label: str
    task_key: str
    function: str
    call: int
    method: str | None
    path: str | None
    attempts: int  # starts counted so far (a crash's restart and a retry each add one)
    user_key: str | None
    retries: int = 0
    backoff: float = 0.0
    failures: int = 0  # how many of its starts ended in an exception the task raised
    reason: str | None = None  # dead entries only

    @classmethod
    def of(cls, row: Sequence[Any], reason: str | None = None) -> Entry:
        label, task_key, function, call, method, path, attempts, user_key, retries, backoff, failures = row[5:16]
        return cls(
            row[0],
            row[1],
            row[2],
            PayloadKind(row[3]),
            bytes(row[4]),
            label,
            task_key,
            function,
            call,
            method,
            path,
            attempts,
            user_key,
            retries,
            backoff,
            failures,
            reason,
        )


@dataclass(frozen=True, slots=True)
class Claim:
    """What one `claim()` took: entries to run, and entries it moved to the dead table (with the reason)."""

    entries: list[Entry]
    dead: list[tuple[Entry, str]]
    next_due: float | None = None  # when the first retry left by a gone owner that waits for its backoff is due


def new_owner() -> str:
    """An owner id that says which machine and process it is (see `Journal.claim`)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class Journal:
    """One SQLite journal file, opened by one facade (its owner) of this process.

    Args:
        path: the file (created if missing, with its directory's write permission).
        max_attempts: how many times an entry may be started without finishing before it is dead.
        lease: seconds an owner's claim lasts unless renewed.

    Raises:
        ConfigurationError: the file cannot be opened or written, is not an SQLite database, or
            was written by a newer release; the message names the path and the remedy.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_attempts: int = 3, lease: float = LEASE) -> None:
        self.path = os.fspath(path)
        self.max_attempts = max_attempts
        self.lease = lease
        self.owner = new_owner()
        _live_owners.add(self.owner)
        self.pending = 0  # entries in the file (all owners), as of the last count or change
        self.dead_count = 0
        self.holding = False  # whether this owner renews its lease (between `hold()` and `release()`)
        self.failure: str | None = None  # why the last write of a batch failed (a full disk), until one succeeds
        self._lock = threading.Lock()
        self._finished: list[int] = []  # entries whose tasks finished, not yet removed (see `flush`)
        self._finished_lock = threading.Lock()
        self._db = self._open()
        # A facade dropped without aclose() (a test, a script) must not leave its connection to be reaped
        # open (Python 3.13 warns of it): closed when this object goes, even as part of a reference cycle.
        weakref.finalize(self, self._db.close)

    def _open(self) -> sqlite3.Connection:
        where = f"the journal {self.path!r}"
        try:
            db = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise ConfigurationError(
                f"{where} cannot be opened ({exc}); check that its directory exists and is writable by this user"
            ) from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # A commit survives a crash of the process without an fsync; only a power cut may lose the last ones.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                # Statement by statement: executescript() would commit the transaction first.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) == 1:  # written before retries: add their columns, with the defaults of none
                    for column in _RETRY_COLUMNS.split(", "):
                        db.execute(f"ALTER TABLE entries ADD COLUMN {column}")
                        db.execute(f"ALTER TABLE dead ADD COLUMN {column}")
                    db.execute("ALTER TABLE entries ADD COLUMN not_before REAL NOT NULL DEFAULT 0")
                    db.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION),))
                elif int(row[0]) > SCHEMA_VERSION:
                    raise ConfigurationError(
                        f"{where} was written by a newer release of starlette-concurrency (schema version {row[0]}, "
                        f"this release reads up to {SCHEMA_VERSION}); upgrade this app, or give it another journal file"
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except ConfigurationError:
            db.close()
            raise
        except (sqlite3.Error, ValueError) as exc:
            db.close()
            if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
                remedy = "it is not a journal (corrupt, or another file): move it aside and start again"
            else:
                remedy = "check that the file and its directory are writable by this user and the disk is not full"
            raise ConfigurationError(f"{where} cannot be used ({exc}); {remedy}") from None
        self._count(db)
        return db

    def _count(self, db: sqlite3.Connection) -> None:
        self.pending = db.execute("SELECT count(*) FROM entries").fetchone()[0]
        self.dead_count = db.execute("SELECT count(*) FROM dead").fetchone()[0]

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            self._db.close()
        _live_owners.discard(self.owner)

    # Writing -------------------------------------------------------------------------------------

    def append(self, entries: Sequence[NewEntry]) -> list[int | None]:
        """Write a batch in one transaction, owned by this facade, counted as started once.

        The same transaction removes the entries noted finished since the last one (see `done_later`).

        Returns:
            Each entry's id, in order; ``None`` for an entry whose `user_key` is already pending
            (it is not written: the earlier one stands).

        Raises:
            sqlite3.Error: the write failed (a full disk...); nothing of the batch was written.
        """
        expires = time.time() + self.lease
        ids: list[int | None] = []
        with self._lock:
            with self._finished_lock:
                finished, self._finished = self._finished, []
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                removed = db.executemany("DELETE FROM entries WHERE id = ?", [(done,) for done in finished]).rowcount
                for entry in entries:
                    cursor = db.execute(
                        "INSERT OR IGNORE INTO entries (created, driver, kind, payload, label, task_key, function, "
                        "call, method, path, attempts, user_key, retries, backoff, owner, lease_expires) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
                        (
                            time.time(),
                            entry.driver,
                            entry.kind.value,
                            entry.payload,
                            entry.label,
                            entry.task_key,
                            entry.function,
                            entry.call,
                            entry.method,
                            entry.path,
                            entry.user_key,
                            entry.retries,
                            entry.backoff,
                            self.owner,
                            expires,
                        ),
                    )
                    ids.append(cursor.lastrowid if cursor.rowcount else None)
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                with self._finished_lock:
                    self._finished[:0] = finished
                if isinstance(exc, sqlite3.Error):
                    self.failure = str(exc)
                raise
            self.pending += sum(1 for entry_id in ids if entry_id is not None) - max(0, removed)
            self.failure = None
        return ids

    def probe(self) -> None:
        """After a failed write, try one (of a few KiB, committed, then deleted): clear `failure` if it works."""
        with self._lock:
            db = self._db
            try:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('probe', hex(randomblob(4096)))")
                db.execute("DELETE FROM meta WHERE name = 'probe'")
            except sqlite3.Error as exc:
                self.failure = str(exc)
            else:
                self.failure = None

    def done_later(self, ids: Iterable[int]) -> None:
        """Note finished entries, to be removed by the next `flush()` (group commit; never waits for the file)."""
        with self._finished_lock:
            self._finished.extend(ids)

    @property
    def unflushed(self) -> bool:
        """Whether finished entries wait for `flush()`."""
        return bool(self._finished)

    def flush(self) -> None:
        """Remove the entries noted finished since the last flush, in one transaction."""
        with self._finished_lock:
            ids, self._finished = self._finished, []
        try:
            self.done(ids)
        except BaseException:
            with self._finished_lock:
                self._finished[:0] = ids  # the next flush tries again
            raise

    def done(self, ids: Iterable[int]) -> None:
        """Remove finished entries, in one transaction."""
        rows = [(entry_id,) for entry_id in ids]
        if not rows:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                removed = db.executemany("DELETE FROM entries WHERE id = ?", rows).rowcount
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.pending = max(0, self.pending - max(0, removed))

    def dead(self, entry_id: int, reason: str) -> None:
        """Move an entry to the dead table with `reason` (it is never run again unless retried)."""
        with self._lock:
            self._bury(entry_id, reason)

    def _bury(self, entry_id: int, reason: str) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                f"INSERT OR REPLACE INTO dead ({_COLUMNS}, reason, died) "
                f"SELECT {_COLUMNS}, ?, ? FROM entries WHERE id = ?",
                (reason, time.time(), entry_id),
            )
            moved = db.execute("DELETE FROM entries WHERE id = ?", (entry_id,)).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if moved:
            self.pending = max(0, self.pending - 1)
            self.dead_count += 1

    def unstarted(self, ids: Iterable[int]) -> None:
        """Take back the start counted for entries that provably never began (the drain stopped them first)."""
        rows = [(entry_id,) for entry_id in ids]
        if rows:
            with self._lock:
                self._db.executemany("UPDATE entries SET attempts = max(0, attempts - 1) WHERE id = ?", rows)

    def restart(self, entry_id: int) -> int | None:
        """Count one more start of an entry whose worker died under it, unless it had `max_attempts` already.

        Returns:
            The attempt it starts now, or ``None`` when it has been started `max_attempts` times (bury it).
        """
        with self._lock:
            row = self._db.execute("SELECT attempts, failures FROM entries WHERE id = ?", (entry_id,)).fetchone()
            if row is None or row[0] - row[1] >= self.max_attempts:
                return None
            self._db.execute("UPDATE entries SET attempts = attempts + 1 WHERE id = ?", (entry_id,))
        return int(row[0]) + 1

    def retry_later(self, entry_id: int, delay: float) -> None:
        """Count a failure of an entry's task (it raised); its retry is due in `delay` seconds.

        Until then no other owner claims it; if this one is gone by then, whoever claims it runs the retry.
        Its start is counted when it begins (`started`), or by the claim.
        """
        with self._lock:
            self._db.execute(
                "UPDATE entries SET failures = failures + 1, not_before = ? WHERE id = ?",
                (time.time() + delay, entry_id),
            )

    def started(self, ids: Iterable[int]) -> None:
        """Count a start of entries whose retry begins now (see `retry_later`)."""
        rows = [(entry_id,) for entry_id in ids]
        if rows:
            with self._lock:
                self._db.executemany("UPDATE entries SET attempts = attempts + 1 WHERE id = ?", rows)

    # Ownership -----------------------------------------------------------------------------------

    def claim(self, limit: int) -> Claim:
        """Take up to `limit` entries whose owner is gone, in one transaction; count a start of each.

        An owner is gone when its lease has expired, or when it was a process of this machine that
        no longer runs (a restart after a crash replays at once). A retry whose backoff has not passed
        waits. Entries already started `max_attempts` times (not counting starts that ended in an
        exception the task raised) are moved to the dead table instead.
        """
        now = time.time()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                where, parameters = self._unowned(now)
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM entries WHERE {where} ORDER BY id LIMIT ?", (*parameters, limit)
                ).fetchall()
                ids = [(row[0],) for row in rows]
                db.executemany(
                    "UPDATE entries SET owner = ?, lease_expires = ?, attempts = attempts + 1 WHERE id = ?",
                    [(self.owner, now + self.lease, entry_id) for (entry_id,) in ids],
                )
                waiting, parameters = self._unowned(now, due=False)
                next_due = db.execute(f"SELECT min(not_before) FROM entries WHERE {waiting}", parameters).fetchone()[0]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        entries: list[Entry] = []
        dead: list[tuple[Entry, str]] = []
        for row in rows:
            entry = Entry.of(row)
            attempts = entry.attempts + 1
            if attempts - entry.failures > self.max_attempts:
                reason = (
                    f"started {entry.attempts} times without finishing (it crashed its worker or the server "
                    f"each time; max_attempts is {self.max_attempts})"
                )
                self.dead(entry.id, reason)
                dead.append((entry, reason))
            else:
                entries.append(replace(entry, attempts=attempts))
        return Claim(entries, dead, next_due)

    def hold(self) -> None:
        """Begin renewing this owner's lease (the facade serves)."""
        with self._lock:
            self.holding = True

    def claimable(self) -> int:
        """Count the entries `claim()` could take now (for the log line of a replay)."""
        with self._lock:
            where, parameters = self._unowned(time.time())
            return int(self._db.execute(f"SELECT count(*) FROM entries WHERE {where}", parameters).fetchone()[0])

    def _unowned(self, now: float, *, due: bool = True) -> tuple[str, tuple[object, ...]]:
        """The condition of entries whose owner is gone (under the lock), and its parameters.

        `due`: those that may run now; else those that wait for their retry's backoff.
        """
        host = socket.gethostname()
        owners = [
            row[0]
            for row in self._db.execute(
                "SELECT DISTINCT owner FROM entries WHERE lease_expires >= ? AND owner != ?", (now, self.owner)
            )
        ]
        gone = [owner for owner in owners if _local_process_gone(owner, host)]
        gone_clause = f" OR owner IN ({','.join('?' * len(gone))})" if gone else ""
        backoff = "not_before <= ?" if due else "not_before > ?"
        return f"owner != ? AND {backoff} AND (lease_expires < ?{gone_clause})", (self.owner, now, now, *gone)

    def renew(self) -> None:
        """Extend this owner's lease on its entries (unless released); recount the entries for `stats()`."""
        with self._lock:
            if self.holding:
                self._db.execute(
                    "UPDATE entries SET lease_expires = ? WHERE owner = ?", (time.time() + self.lease, self.owner)
                )
            self._count(self._db)

    def release(self) -> None:
        """Give up this owner's entries (clean close): the next facade to start claims them at once."""
        with self._lock:
            self.holding = False
            self._db.execute("UPDATE entries SET lease_expires = 0 WHERE owner = ?", (self.owner,))

    def reown(self) -> None:
        """Take a new owner id (a forked child must not renew its parent's entries)."""
        self._lock = threading.Lock()
        self._finished_lock = threading.Lock()
        self._finished = []
        self.owner = new_owner()
        _live_owners.add(self.owner)
        self._db = self._open()

    # Operating (the CLI) ---------------------------------------------------------------------------

    def entries(self) -> list[tuple[Entry, str, float]]:
        """List pending entries, each with its owner and lease expiry."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS}, owner, lease_expires FROM entries ORDER BY id").fetchall()
        return [(Entry.of(row), row[16], row[17]) for row in rows]

    def dead_entries(self) -> list[Entry]:
        """List dead entries, each with its reason."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS}, reason FROM dead ORDER BY id").fetchall()
        return [Entry.of(row, reason=row[16]) for row in rows]

    def retry(self, entry_id: int) -> bool:
        """Move a dead entry back to pending (attempts and failures reset; the next facade to start runs it).

        Returns:
            Whether there was such a dead entry.
        """
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                afresh = _COLUMNS.replace("attempts", "0").replace("failures", "0")
                moved = db.execute(
                    f"INSERT INTO entries ({_COLUMNS}, owner, lease_expires) "
                    f"SELECT {afresh}, '', 0 FROM dead WHERE id = ?",
                    (entry_id,),
                ).rowcount
                db.execute("DELETE FROM dead WHERE id = ?", (entry_id,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return bool(moved)

    def purge(self) -> int:
        """Delete every dead entry; return how many."""
        with self._lock:
            return int(self._db.execute("DELETE FROM dead").rowcount)


# The owners of the journals this process has open.
_live_owners: set[str] = set()


def _local_process_gone(owner: str, host: str) -> bool:
    """Whether `owner` was a process of this machine that no longer exists (a reused pid: not gone, wait)."""
    parts = owner.split(":")
    if len(parts) < 3:
        return False
    owner_host, pid_text = ":".join(parts[:-2]), parts[-2]
    if owner_host != host or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        # Another facade of this process (alive), or an earlier process of the same pid: a container's
        # pid 1 restarted.
        return owner not in _live_owners
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
