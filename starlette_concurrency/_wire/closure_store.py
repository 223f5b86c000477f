"""Both ends of the function cache's definitions (`_closures.py` explains the cache).

The parent keeps a `WorkerMirror` per worker, which decides what the worker must hold and writes the
definitions blob; the worker's `WorkerStore` applies the blobs in the order they come and loads
payloads. Both live here so that the blob is written and read in one file.

Only the standard library is imported here, so that the worker, started by path, can load this file
without the package root; cloudpickle is imported by pickle itself, when a skeleton names it.
"""

from __future__ import annotations

import builtins
import io
import pickle
import types
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

__all__ = ["REBUILD", "WORKER_BYTES", "WORKER_ENTRIES", "Skeleton", "WorkerMirror", "WorkerStore", "check_bounds"]

# How a payload names the rebuilding of a cached function (module, name): pickled by reference to a
# stand-in in `_closures.py`, answered here by the store's unpickler.
REBUILD = ("starlette_concurrency._closures", "_rebuild_function")
_MARK = REBUILD[0].encode()  # a pickle that names the stand-in holds this string as it is
WORKER_ENTRIES, WORKER_BYTES = 1024, 32 << 20  # what one worker may hold


class Skeleton:
    """What a worker needs once per function shape: a key and the pickled skeleton."""

    __slots__ = ("data", "key")

    def __init__(self, key: int, data: bytes) -> None:
        self.key = key
        self.data = data


class WorkerMirror:
    """The parent's exact record of the skeletons one worker holds, in least-recently-used order.

    Args:
        max_entries: how many skeletons the worker may hold.
        max_bytes: how many bytes of pickled skeletons the worker may hold.

    Raises:
        ValueError: a bound is not a positive int.
    """

    def __init__(self, *, max_entries: int = WORKER_ENTRIES, max_bytes: int = WORKER_BYTES) -> None:
        check_bounds(max_entries, max_bytes)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._sent: OrderedDict[int, int] = OrderedDict()  # key → size
        self._bytes = 0
        self._forget: list[int] = []  # evicted, to be told with the next definitions

    def __len__(self) -> int:
        return len(self._sent)

    def __contains__(self, key: object) -> bool:
        return key in self._sent

    def prepare(self, skeletons: Iterable[Skeleton]) -> bytes:
        """Return the definitions the worker needs before the payload naming `skeletons`, as sent.

        Call it when composing the frame for this worker, and send the blob before the payload;
        b"" means the worker needs nothing.
        """
        sent = self._sent
        new: list[tuple[int, bytes]] = []
        named: set[int] = set()
        for skeleton in skeletons:
            named.add(skeleton.key)
            if skeleton.key in sent:
                sent.move_to_end(skeleton.key)
            else:
                sent[skeleton.key] = len(skeleton.data)
                self._bytes += len(skeleton.data)
                new.append((skeleton.key, skeleton.data))
        # The keys this payload names are now the most recent: evict from the other end, never them
        # (a payload naming more than the bound is loaded whole; the next one trims the excess).
        while sent and (len(sent) > self.max_entries or self._bytes > self.max_bytes):
            key = next(iter(sent))
            if key in named:
                break
            self._bytes -= sent.pop(key)
            self._forget.append(key)
        if not new and not self._forget:
            return b""
        forget, self._forget = tuple(self._forget), []
        return pickle.dumps((forget, tuple(new)), pickle.HIGHEST_PROTOCOL)


def check_bounds(max_entries: int, max_bytes: int) -> None:
    """Refuse cache bounds that are not positive ints.

    Raises:
        ValueError: naming the bound.
    """
    for name, value in (("max_entries", max_entries), ("max_bytes", max_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, not {value!r}")


class _Loaded:
    """A skeleton, unpickled once."""

    __slots__ = ("code", "data_names", "globals", "merged", "names", "nfree", "plain")

    def __init__(self, data: bytes) -> None:
        code, meta, refs, names, data_names, _submodules = pickle.loads(data)  # importing the submodules
        self.code: types.CodeType = code
        self.globals: dict[str, Any] = {**meta, **refs}
        self.names: tuple[str, str, str, str | None] = names
        self.data_names: tuple[str, ...] = data_names
        self.nfree = len(code.co_freevars)
        # Whether FunctionType gives these names by itself (it takes a string constant for __doc__).
        cells = tuple(types.CellType() for _ in range(self.nfree)) if self.nfree else None
        probe = types.FunctionType(code, self.globals, names[0], None, cells)
        self.plain = (probe.__name__, probe.__qualname__, probe.__module__, probe.__doc__) == names


class _Broken:
    """A skeleton that would not load here; loaded again by the next payload that names it.

    A module that failed to import once (a configuration not mounted yet) may import the next time, as
    it would in a fresh worker: the failure is not cached for the worker's life.
    """

    __slots__ = ("data", "error")

    def __init__(self, data: bytes, error: Exception) -> None:
        self.data = data
        self.error = error


class WorkerStore:
    """The skeletons a worker was sent, by key, and the loader of payloads that name them.

    Not thread-safe: one store serves one worker's main loop.
    """

    def __init__(self) -> None:
        self._skeletons: dict[int, _Loaded | _Broken] = {}
        # What one load shares: the payload's globals dicts (by the parent's numbering), which
        # skeletons' globals are in them already, and the functions between rebuild and restore.
        self._groups: dict[int, dict[str, Any]] = {}
        self._merged: set[tuple[int, int]] = set()
        # Pickle writes a function's state right after the function, so the functions its state
        # holds are rebuilt and restored in between: a stack.
        self._building: list[tuple[_Loaded, types.FunctionType]] = []
        self._last_merged: tuple[int, int] | None = None  # the last of _merged: a group of lambdas repeats it
        self._restore_state = self._restore  # bound once, not once per function
        rebuild, find_class = self._rebuild, pickle.Unpickler.find_class

        class Unpickler(pickle.Unpickler):
            # A class per store, so that loading a payload sets up nothing but the unpickler: a
            # payload is often one task, and this fixed part is most of what it costs.
            def find_class(self, module: str, name: str) -> Any:
                if module == REBUILD[0] and name == REBUILD[1]:
                    return rebuild
                return find_class(self, module, name)

        self._unpickler = Unpickler

    def __len__(self) -> int:
        return len(self._skeletons)

    def __contains__(self, key: object) -> bool:
        return key in self._skeletons

    def load_definitions(self, blob: bytes | memoryview) -> None:
        """Apply a definitions blob from this worker's mirror: forget what it evicted, add what it sent.

        A skeleton that will not load here (its module does not import, say) is kept as that error,
        so that the store stays in step with the mirror; each payload that names it tries it again.

        Args:
            blob: what `WorkerMirror.prepare` returned (b"": nothing to do).
        """
        if not blob:
            return
        forget, new = pickle.loads(blob)
        for key in forget:
            self._skeletons.pop(key, None)
        for key, data in new:
            try:
                self._skeletons[key] = _Loaded(data)
            except Exception as exc:
                self._skeletons[key] = _Broken(data, exc)

    def load(self, data: bytes) -> Any:
        """Unpickle a payload's data, rebuilding its cached functions from their skeletons.

        Args:
            data: `Payload.data`, after the definitions it needs were loaded.

        Returns:
            The object that was pickled.

        Raises:
            pickle.UnpicklingError: it names a skeleton this worker was never sent.
            Exception: whatever unpickling raises, or the error of a skeleton that did not load here.
        """
        if _MARK not in data:  # no cached function in it (a partial, say): plain pickle is faster
            return pickle.loads(data)
        try:
            return self._unpickler(io.BytesIO(data)).load()
        finally:
            if self._groups:
                self._groups.clear()
                self._merged.clear()
                self._building.clear()
            self._last_merged = None

    def _rebuild(self, key: int, group: int) -> types.FunctionType:
        skeleton = self._skeletons.get(key)
        if skeleton is None:
            raise pickle.UnpicklingError(f"function skeleton {key} was never sent to this worker")
        if isinstance(skeleton, _Broken):
            broken = skeleton
            try:
                skeleton = self._skeletons[key] = _Loaded(broken.data)
            except Exception as exc:
                broken.error = exc
                raise
        g = self._groups.get(group)
        if g is None:
            # Fresh globals for every payload, shared by its functions that shared them in the parent,
            # as cloudpickle makes them: what a task writes to its globals does not reach the next one.
            g = self._groups[group] = {"__builtins__": builtins.__dict__}
        merged = (group, key)
        if merged != self._last_merged and merged not in self._merged:  # once per payload is enough
            self._merged.add(merged)
            g.update(skeleton.globals)
        self._last_merged = merged
        # Cells start empty and are filled by restore, once pickle's memo knows the function: a
        # function in its own cells (recursion) finds itself there.
        closure = tuple(types.CellType() for _ in range(skeleton.nfree)) if skeleton.nfree else None
        func = types.FunctionType(skeleton.code, g, skeleton.names[0], None, closure)
        # Pickle's BUILD calls the object's __setstate__, found in the function's own __dict__: one
        # global fewer to look up per payload than a state setter of its own. Restore removes it.
        func.__dict__["__setstate__"] = self._restore_state
        self._building.append((skeleton, func))
        return func

    def _restore(self, state: tuple[Any, ...]) -> None:
        skeleton, func = self._building.pop()
        del func.__dict__["__setstate__"]
        names, defaults, kwdefaults, attributes, annotations, cells, empty, values, _submodules = state
        if names is not None or not skeleton.plain:
            func.__name__, func.__qualname__, func.__module__, func.__doc__ = names or skeleton.names
        if defaults is not None:
            func.__defaults__ = defaults
        if kwdefaults is not None:
            func.__kwdefaults__ = kwdefaults
        if attributes:
            func.__dict__.update(attributes)
        if annotations:
            func.__annotations__ = annotations
        if cells is not None:
            assert func.__closure__ is not None
            if empty is None:
                for cell, value in zip(func.__closure__, cells):  # noqa: B905 - the code says how many
                    cell.cell_contents = value
            else:
                for index, (cell, value) in enumerate(zip(func.__closure__, cells)):  # noqa: B905
                    if index not in empty:
                        cell.cell_contents = value
        if values:
            func.__globals__.update(zip(skeleton.data_names, values))  # noqa: B905 - as many as names
