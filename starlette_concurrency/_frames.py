"""The caller's side of the frames workers and forked children write (format in `_worker.py`)."""

from __future__ import annotations

from ._worker import HEADER

__all__ = ["FrameBuffer", "grow_pipe"]


def grow_pipe(fd: int) -> None:
    """Enlarge a result pipe: fewer wake-ups for large results (Linux only; best effort)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):  # pragma: no cover - platform dependent
        pass


class FrameBuffer:
    """Bytes read from a result pipe, cut into (tag, body) frames as they complete."""

    __slots__ = ("_buffer", "_start")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the first unread frame begins

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next(self) -> tuple[bytes, bytes] | None:
        """Return the next complete frame, or None until more bytes arrive."""
        buffer, start = self._buffer, self._start
        if len(buffer) - start < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(buffer, start)
        end = start + HEADER.size + size
        if len(buffer) < end:
            if start:  # make room at the front before a large frame accumulates behind it
                del buffer[:start]
                self._start = 0
            return None
        tag = bytes(buffer[start + HEADER.size : start + HEADER.size + 1])
        body = bytes(buffer[start + HEADER.size + 1 : end])
        if end == len(buffer):
            buffer.clear()
            self._start = 0
        else:
            self._start = end
        return tag, body
