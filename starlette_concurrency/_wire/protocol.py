"""The wire protocol between the parent and its workers / forked children: tags and framing, both sides.

Standard library only, and no import of the package root: the worker (`worker.py`, started by path)
imports this module without it (see `__init__.py`). What an answer's body holds is `outcome.py`.

Every frame is ``MAGIC (2 bytes) | length (4 bytes, big-endian) | tag (1 byte) | body``; the length
counts the tag and the body. The magic makes a stray byte in a pipe a protocol error at once instead
of a length that waits forever.

```
 parent → worker   INIT   pickled configuration (sys.path, initializer, preload, idle timeout)
                   TASKS  definitions blob, then entries (first task id, count, start, payload) — see tasks_frame()
                   LEVELS the levels of the server's loggers (before a worker's first TASKS, and when they change)
                   SKIP   task ids (8 bytes each) of a cancelled call: do not start them if not started yet
 worker → parent   READY  its pid                     START_FAILED  why it could not start
                   IDLE_EXIT  leaving on its idle timeout (nothing of a later frame ran)
                   OK / ERROR / REMOTE / UNPICKLABLE / LOAD_FAILED   one answer per task:
                          task id (8 bytes) | pickled result, exception or description
                   LOG  a log record: task id (8 bytes) of the task running when it was emitted | its fields
                   SKIPPED  task id (8 bytes): told to skip it, the worker never started it (one answer, in order)
                   RESEND  a group payload would not load: task id (8 bytes) | count (4 bytes);
                           none of those tasks ran, the parent sends them again one by one
```

Every answer names its task: the parent checks the id against the task it expects next from that
worker, and treats any other frame as a protocol error (the worker is killed, its tasks fail with
`WorkerCrashed`), so that a stray frame can never be taken for a task's result. A forked child of the
fork driver sends one answer without the id (its pipe serves one task).
"""

from __future__ import annotations

import struct

__all__ = [
    "ERROR",
    "HEADER",
    "IDLE_EXIT",
    "ID_SIZE",
    "INIT",
    "LEVELS",
    "LOAD_FAILED",
    "LOG",
    "OK",
    "READY",
    "REMOTE",
    "RESEND",
    "SINGLE",
    "SKIP",
    "SKIPPED",
    "SLOW_IMPORT",
    "START_FAILED",
    "TASKS",
    "UNPICKLABLE",
    "FrameBuffer",
    "ProtocolError",
    "answer",
    "answer_id",
    "frame",
    "grow_pipe",
    "parse_tasks",
    "read_frame",
    "resend_body",
    "skip_body",
    "split_resend",
    "split_skip",
    "tasks_frame",
]

MAGIC = b"\xc7\x0c"
HEADER = struct.Struct("!2sI")  # magic, length of tag + body
_ID = struct.Struct("!Q")
_COUNT = struct.Struct("!I")
_ENTRY = struct.Struct("!QIII")  # first task id, count, start in the payload's list (or SINGLE), payload length
SINGLE = 0xFFFFFFFF  # an entry's start when its payload is one callable, not a list of them

# Parent → worker.
INIT = b"C"  # body: pickled configuration
TASKS = b"T"  # body: see tasks_frame()
SKIP = b"K"  # body: task ids (8 bytes each) not to start; see skip_body()
LEVELS = b"V"  # body: pickled {logger name: level} of the server's loggers ("" is the root); see _logs.py

# Worker → parent.
READY = b"R"  # start-up done; body: the worker's pid
START_FAILED = b"F"  # instead of READY; body: pickled (type name, str, traceback)
IDLE_EXIT = b"I"  # leaving because no task came within the idle timeout; nothing of a later frame ran
OK = b"O"  # the task returned; body: pickled value
ERROR = b"E"  # the task raised; body: pickled (exception, formatted traceback)
REMOTE = b"X"  # the task raised something that would not round-trip; body: pickled (type name, str, traceback)
UNPICKLABLE = b"S"  # the task returned something that would not pickle; body: pickled (type name, str, traceback)
LOAD_FAILED = b"L"  # the task itself would not unpickle here; body: pickled (type name, str, traceback)
SKIPPED = b"N"  # the task was to be skipped and never started; body: its id (8 bytes)
RESEND = b"P"  # a group payload would not load; body: first task id (8 bytes), count (4 bytes); none of them ran
SLOW_IMPORT = b"W"  # before the first answer: loading the first task took long; body: "<seconds> <module>,<module>…"
LOG = b"G"  # a log record emitted in the worker; body: task id (8 bytes) of the task running then | pickled fields
ANSWERS = frozenset((OK, ERROR, REMOTE, UNPICKLABLE, LOAD_FAILED))


class ProtocolError(Exception):
    """A frame that the other side could not have written: a stray or corrupted byte in a pipe."""


def frame(tag: bytes, body: bytes) -> bytes:
    """Frame a message: magic, length, tag, body."""
    return HEADER.pack(MAGIC, len(body) + 1) + tag + body


def answer(tag: bytes, task_id: int, body: bytes) -> bytes:
    """Frame a worker's answer for one task."""
    return HEADER.pack(MAGIC, len(body) + 1 + _ID.size) + tag + _ID.pack(task_id) + body


ID_SIZE = _ID.size


def answer_id(body: bytes) -> int:
    """Return the task id an answer's body names (its payload starts at ``ID_SIZE``).

    Raises:
        ProtocolError: the body is too short to name a task.
    """
    if len(body) < _ID.size:
        raise ProtocolError("an answer too short to name its task")
    task_id: int = _ID.unpack_from(body)[0]
    return task_id


def tasks_frame(definitions: bytes, entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """Frame tasks for a worker: an opaque definitions blob, then its entries.

    The definitions blob is what the worker must load before the payloads (the function skeletons
    it lacks, see `_closures.py`). Each entry is (first task id, count, start, payload): with start
    `SINGLE`, the payload is one pickled callable and count is 1; otherwise it is a pickled list of
    callables (a group, pickled in one dump), of which the entry's tasks are ``[start:start + count]``,
    with the ids ``first, first + 1, ...``.
    """
    parts = [_COUNT.pack(len(definitions)), definitions, _COUNT.pack(len(entries))]
    for task_id, count, start, payload in entries:
        parts.append(_ENTRY.pack(task_id, count, start, len(payload)))
        parts.append(payload)
    return frame(TASKS, b"".join(parts))


def parse_tasks(body: bytes) -> tuple[bytes, list[tuple[int, int, int, bytes]]]:
    """Invert `tasks_frame`: return the definitions blob and the (first id, count, start, payload) entries.

    Raises:
        ProtocolError: the body is not a TASKS body.
    """
    try:
        view = memoryview(body)
        (size,) = _COUNT.unpack_from(view, 0)
        offset = _COUNT.size + size
        definitions = bytes(view[_COUNT.size : offset])
        (count,) = _COUNT.unpack_from(view, offset)
        offset += _COUNT.size
        entries = []
        for _ in range(count):
            task_id, tasks, start, size = _ENTRY.unpack_from(view, offset)
            offset += _ENTRY.size
            if tasks < 1 or (start == SINGLE and tasks != 1):
                raise ProtocolError(f"a malformed TASKS frame: an entry of {tasks} tasks from {start}")
            entries.append((task_id, tasks, start, bytes(view[offset : offset + size])))
            offset += size
    except struct.error as exc:
        raise ProtocolError(f"a malformed TASKS frame: {exc}") from None
    if offset != len(body):
        raise ProtocolError("a malformed TASKS frame: trailing bytes")
    return definitions, entries


def resend_body(task_id: int, count: int) -> bytes:
    """The body of a RESEND frame: the first task id and how many tasks of the group to send again."""
    return _ID.pack(task_id) + _COUNT.pack(count)


def split_resend(body: bytes) -> tuple[int, int]:
    """Return (first task id, count) of a RESEND body.

    Raises:
        ProtocolError: the body is not a RESEND body.
    """
    if len(body) != _ID.size + _COUNT.size:
        raise ProtocolError("a malformed RESEND frame")
    return _ID.unpack_from(body)[0], _COUNT.unpack_from(body, _ID.size)[0]


def skip_body(task_ids: list[int]) -> bytes:
    """The body of a SKIP frame: the ids of tasks not to start."""
    return b"".join(map(_ID.pack, task_ids))


def split_skip(body: bytes) -> list[int]:
    """Return the task ids of a SKIP body.

    Raises:
        ProtocolError: the body is not a SKIP body.
    """
    if not body or len(body) % _ID.size:
        raise ProtocolError("a malformed SKIP frame")
    return [task_id for (task_id,) in _ID.iter_unpack(body)]


def grow_pipe(fd: int) -> None:
    """Enlarge a pipe: fewer wake-ups for large frames (Linux only; best effort)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):  # pragma: no cover - platform dependent
        pass


def read_frame(fd: int) -> tuple[bytes, bytes] | None:
    """Read one frame from a blocking fd; None at EOF (the other side is gone).

    Raises:
        ProtocolError: the bytes are not a frame.
    """
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    magic, size = HEADER.unpack(header)
    if magic != MAGIC or size == 0:
        raise ProtocolError("a frame without the protocol's magic")
    data = _read_exactly(fd, size)
    if data is None:
        return None
    return data[:1], data[1:]


def _read_exactly(fd: int, size: int) -> bytes | None:
    # Unbuffered on purpose: the worker's idle timeout selects on the fd, which must not hide buffered frames.
    import os

    first = os.read(fd, size)
    if len(first) == size:
        return first
    data = bytearray(first)
    while first and len(data) < size:
        first = os.read(fd, size - len(data))
        data += first
    return bytes(data) if len(data) == size else None


_TAGS = [bytes((byte,)) for byte in range(256)]  # a frame's tag without slicing it out


class FrameBuffer:
    """Bytes read from a pipe, cut into (tag, body) frames as they complete."""

    __slots__ = ("_buffer", "_start")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the first unread frame begins

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next(self) -> tuple[bytes, bytes] | None:
        """Return the next complete frame, or None until more bytes arrive.

        Raises:
            ProtocolError: the bytes at the front are not a frame.
        """
        buffer, start = self._buffer, self._start
        if len(buffer) - start < HEADER.size:
            return None
        magic, size = HEADER.unpack_from(buffer, start)
        if magic != MAGIC or size == 0:
            raise ProtocolError("a frame without the protocol's magic")
        end = start + HEADER.size + size
        if len(buffer) < end:
            if start:  # make room at the front before a large frame accumulates behind it
                del buffer[:start]
                self._start = 0
            return None
        tag = _TAGS[buffer[start + HEADER.size]]
        body = bytes(memoryview(buffer)[start + HEADER.size + 1 : end])  # one copy (a slice, then bytes(), is two)
        if end == len(buffer):
            buffer.clear()
            self._start = 0
        else:
            self._start = end
        return tag, body
