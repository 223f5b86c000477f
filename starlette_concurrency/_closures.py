"""The function cache: closures sent to a worker at about the cost of partials.

cloudpickle sends a lambda, a closure or a `__main__` function *by value*: its code object, its
globals, its names — for every call, although a server sends the same few functions millions of
times. This module splits such a function in two:

- the **skeleton**, what cannot change between two calls of the same function: the code object, the
  module's identity (`__name__`, `__package__`, `__file__`, `__path__` of its globals), and the globals
  it reads that are modules, or functions and classes sent by reference. It is pickled once, named by
  a key (a number never reused), and sent once to each worker;
- the **state**, what can change, pickled on every call: closure cells, `__defaults__`,
  `__kwdefaults__`, `__dict__` (`__wrapped__`...), names when they differ from the skeleton's, and the
  *values* of the other globals it reads.

```
   parent                                                 worker
   ──────                                                 ──────
   ClosureCache.dumps(obj) ──▶ Payload(data, skeletons)
   WorkerMirror.prepare(skeletons) ──▶ definitions blob ─▶ WorkerStore.load_definitions(blob)
   (one mirror per worker: what it was sent, in order)     (forget evicted keys, add new skeletons)
   payload.data ──────────────────────────────────────────▶ WorkerStore.load(data) → the objects
```

Frames reach a worker in the order they were sent, so a mirror and its worker's store stay in
lock-step; a worker never evicts on its own, and a new worker gets a new mirror and an empty store.

Before every use, the parent checks that a function still matches its skeleton (same code object,
same module identity, each by-reference global still the same object and still importable by that
name, names that were absent still absent); anything else gets a new skeleton, so nothing is stale.
A skeleton too large to cache, or one that fails to build, leaves the function to cloudpickle's own
by-value path. Recursion (a function in its own cells, a method of a class defined in a function)
goes through pickle's memo exactly as in cloudpickle: the function is rebuilt with empty cells, then
its state fills them.

Functions and classes that cloudpickle sends by name (a module's functions, `functools.partial`)
are remembered as such across dumps, each with a cheap test that it still would (same object under
the same name, its module still the one imported under its name, not registered to go by value), so
that cloudpickle's lookup runs once per function, not once per task.

This module is the parent's side: the cache and its pickler. What it knows of one function (its
record, its per-call state, the by-name tests) is `_closure_records.py`. The mirror and the store
live in `_wire/closure_store.py`, which imports only the standard library, so that the worker, started by
path, loads it without the package.
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import itertools
import pickle
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
from cloudpickle import cloudpickle as _cp

from ._closure_records import SUPPORTED, Record, function_state, reference_check, split_globals
from ._context import reduce_variable
from ._locations import code_reduce, dumps as located_dumps
from ._wire.closure_store import WORKER_BYTES, WORKER_ENTRIES, Skeleton, WorkerMirror, WorkerStore, check_bounds

__all__ = ["ClosureCache", "Payload", "Skeleton", "WorkerMirror", "WorkerStore"]

# Bounds: skeletons are a code object and a few names (a lambda's is ~300 bytes).
MAX_SKELETON_BYTES = 1 << 20  # larger ones are not cached: such a function takes cloudpickle's path
PARENT_ENTRIES, PARENT_BYTES = 4096, 64 << 20
NAMED_ENTRIES = 4096  # functions and classes remembered to pickle by name


class Payload:
    """Pickled objects and the skeletons a worker must hold before it can load them."""

    __slots__ = ("data", "skeletons")

    def __init__(self, data: bytes, skeletons: tuple[Skeleton, ...]) -> None:
        self.data = data
        self.skeletons = skeletons

    @property
    def keys(self) -> tuple[int, ...]:
        """The keys of the skeletons the payload names."""
        return tuple(skeleton.key for skeleton in self.skeletons)


class ClosureCache:
    """Pickle objects so that the functions cloudpickle sends by value travel as skeleton + state.

    One per pool. Thread-safe.

    Args:
        max_entries: how many skeletons to keep.
        max_bytes: how many bytes of pickled skeletons to keep.

    Raises:
        ValueError: a bound is not a positive int.
    """

    def __init__(self, *, max_entries: int = PARENT_ENTRIES, max_bytes: int = PARENT_BYTES) -> None:
        check_bounds(max_entries, max_bytes)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._records: OrderedDict[tuple[int, int], Record] = OrderedDict()
        self._bytes = 0
        self._keys = itertools.count()
        self._lock = threading.Lock()
        self._local = threading.local()
        # id → (function or class, test): found to pickle by name (cloudpickle asks its module, which costs
        # as much as the rest of a small task's dump); the test says cheaply that it still does.
        self.named: dict[int, tuple[Any, Callable[[], bool]]] = {}

    def __len__(self) -> int:
        return len(self._records)

    @property
    def nbytes(self) -> int:
        """Bytes of pickled skeletons kept."""
        return self._bytes

    def dumps(self, obj: Any) -> Payload:
        """Pickle `obj` (protocol 5), every by-value function in it as a key and its state.

        Returns:
            The pickle and the skeletons it names.

        Raises:
            pickle.PicklingError, TypeError...: whatever cloudpickle raises for an unpicklable object.
        """
        # One pickler per thread, reused: making one costs as much as pickling a small task. A dump
        # nested in another (an object's __reduce__ calling dumps) gets a fresh one.
        current: _Pickler | None = getattr(self._local, "pickler", None)
        if current is not None and current.table_size != len(copyreg.dispatch_table):
            current = self._local.pickler = None  # a reducer was registered since (copyreg.pickle)
        if current is not None and not current.busy:
            pickler = current
        else:
            pickler = _Pickler(io.BytesIO(), self)
            if current is None:
                self._local.pickler = pickler
        pickler.busy = True
        try:
            pickler.dump(obj)
            return Payload(pickler.file.getvalue(), tuple(pickler.used.values()) if pickler.used else ())
        except BaseException:
            if getattr(self._local, "pickler", None) is pickler:
                self._local.pickler = None  # a failed dump may leave it in any state: start afresh
            raise
        finally:
            pickler.reset()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Within the block, this thread's dumps remember which functions and classes go by reference.

        A call pickles its tasks one by one (each may go to another worker), and most of what a dump
        costs is cloudpickle asking, for the same `partial` class and the same module function, whether
        they are importable by name. A batch asks once per object. Keep a batch short and free of
        awaits: a module attribute reassigned while it is open would not be seen.
        """
        current: _Pickler | None = getattr(self._local, "pickler", None)
        if current is None or current.busy:
            current = self._local.pickler = _Pickler(io.BytesIO(), self)
        current.by_reference = {}
        try:
            yield
        finally:
            current.by_reference = None

    def remember_name(self, obj: Any) -> None:
        """Remember that a module-level function or class pickles by name, with a cheap test that it still does."""
        check = reference_check(obj)
        if check is None:
            return
        if len(self.named) >= NAMED_ENTRIES:
            self.named.clear()  # a server pickles the same few: an overflow means churn, start afresh
        self.named[id(obj)] = (obj, check)  # held, so that its id is not reused

    def mirror(self, *, max_entries: int = WORKER_ENTRIES, max_bytes: int = WORKER_BYTES) -> WorkerMirror:
        """Make the parent's record of what one new worker holds (it holds nothing yet)."""
        return WorkerMirror(max_entries=max_entries, max_bytes=max_bytes)

    def _record(self, ident: tuple[int, int], func: types.FunctionType) -> Record:
        record = self._records.get(ident)
        if record is not None and record.matches(func):
            with contextlib.suppress(KeyError):  # evicted by another thread meanwhile: still valid here
                self._records.move_to_end(ident)
            return record
        record = Record(func, None, split_globals(func))
        skeleton_data = _dump_skeleton(func, record)
        if len(skeleton_data) <= MAX_SKELETON_BYTES:
            record.skeleton = Skeleton(next(self._keys), skeleton_data)
        with self._lock:
            old = self._records.pop(ident, None)
            if old is not None and old.skeleton is not None:
                self._bytes -= len(old.skeleton.data)
            self._records[ident] = record
            if record.skeleton is not None:
                self._bytes += len(record.skeleton.data)
            while len(self._records) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._records.popitem(last=False)
                if evicted.skeleton is not None:
                    self._bytes -= len(evicted.skeleton.data)
        return record


def _dump_skeleton(func: types.FunctionType, record: Record) -> bytes:
    skeleton = (
        func.__code__,
        dict(record.meta),
        {name: value for name, value, _ in record.refs},
        record.names,
        record.data_names,
        record.submodules,  # unpickling them imports them in the worker
    )
    return located_dumps(skeleton)  # the code keeps its file name: the worker's traceback names it


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with by-value functions reduced to (key, state) when the cache can vouch for them."""

    def __init__(self, file: io.BytesIO, cache: ClosureCache) -> None:
        # A plain dict of cloudpickle's reducers and copyreg's, instead of cloudpickle's ChainMap of
        # them: the C pickler looks every object's type up in it, which in a ChainMap is Python code
        # raising KeyError (for a `partial`, say), in a dict a C lookup. Read once, here, by the C
        # pickler; a reducer registered later makes `ClosureCache.dumps` build a new pickler.
        self.table_size = len(copyreg.dispatch_table)
        self.dispatch_table = dict(cloudpickle.Pickler.dispatch_table)  # the ChainMap's precedence
        self.dispatch_table[types.CodeType] = code_reduce  # by-value code keeps its file name (see _locations)
        self.dispatch_table[ContextVar] = reduce_variable  # as where a worker finds it (see _context)
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.file = file
        self.cache = cache
        self.busy = False
        self.used: dict[int, Skeleton] = {}
        self.groups: dict[int, int] = {}  # id(__globals__) → index: functions sharing globals share them there too
        self.checked: dict[tuple[int, int], Record] = {}  # checked once per payload
        # The last function reduced by its skeleton: code, globals, record, (key, group). Held (code and
        # globals), so that a later function with the same two is the same function's kin.
        self.last: tuple[types.CodeType, dict[str, Any], Record, tuple[int, int]] | None = None
        # Within ClosureCache.batch(): id → the function or class found to go by reference (held, so
        # that its id is not reused meanwhile).
        self.by_reference: dict[int, Any] | None = None

    def reset(self) -> None:
        """Forget the last dump (its bytes, memo and bookkeeping), as a new pickler would."""
        self.file.seek(0)
        self.file.truncate()
        self.clear_memo()
        if self.globals_ref:  # cloudpickle's: functions share globals within one dump only
            self.globals_ref.clear()
        if self.used:
            self.used.clear()
            self.groups.clear()
        if self.checked:
            self.checked.clear()
        self.last = None
        self.busy = False

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is not types.FunctionType:
            if not issubclass(kind, type):
                return NotImplemented  # what cloudpickle's reducer_override says of it (a partial, say), sooner
            return self._class(obj)
        if not SUPPORTED:
            return super().reducer_override(obj)
        # A name with "<" in it (<lambda>, <locals>, <listcomp>) is not a module attribute (pickle's own
        # lookup refuses "<locals>"; the others only setattr() could make): no need to ask.
        if "<" not in obj.__qualname__ and self._by_name(obj):
            return NotImplemented  # as cloudpickle does: pickle's own reference to module.qualname
        last = self.last
        if last is not None and last[0] is obj.__code__ and last[1] is obj.__globals__:
            record, args = last[2], last[3]  # the same function as the one before (a group of lambdas)
        else:
            ident = (id(obj.__code__), id(obj.__globals__))
            checked = self.checked.get(ident)
            if checked is not None and checked.code is obj.__code__:
                record = checked
            else:
                try:
                    record = self.checked[ident] = self.cache._record(ident, obj)
                except Exception:
                    return super().reducer_override(obj)  # cloudpickle's path raises the real error, if any
            skeleton = record.skeleton
            if skeleton is None:
                return super().reducer_override(obj)
            self.used[skeleton.key] = skeleton
            args = (skeleton.key, self.groups.setdefault(id(obj.__globals__), len(self.groups)))
            self.last = (obj.__code__, obj.__globals__, record, args)
        # The state is applied by pickle's BUILD, after the memo knows the function (see WorkerStore).
        return (_rebuild_function, args, function_state(obj, record))

    def _known(self, obj: Any) -> bool:
        """Whether `obj` was found to pickle by name in this batch, or (still true) in an earlier dump."""
        known = self.by_reference
        if known is not None and known.get(id(obj)) is obj:
            return True
        named = self.cache.named.get(id(obj))
        if named is not None and named[0] is obj and named[1]():
            if known is not None:
                known[id(obj)] = obj
            return True
        return False

    def _found_by_name(self, obj: Any) -> None:
        self.cache.remember_name(obj)
        if self.by_reference is not None:
            self.by_reference[id(obj)] = obj

    def _by_name(self, obj: types.FunctionType) -> bool:
        """Whether a function pickles by name (a module function), as cloudpickle would find."""
        if self._known(obj) or obj is _rebuild_function:  # the stand-in: once per payload, then pickle's memo
            return True
        if _cp._should_pickle_by_reference(obj):
            self._found_by_name(obj)
            return True
        return False

    def _class(self, obj: type) -> Any:
        if self._known(obj):
            return NotImplemented
        reduced = super().reducer_override(obj)
        if reduced is NotImplemented:  # a class cloudpickle sends by name
            self._found_by_name(obj)
        return reduced


def _rebuild_function(key: int, group: int) -> Any:
    """Stand-in for a worker store's rebuild: a plain unpickler cannot load a cached function."""
    raise pickle.UnpicklingError(f"function skeleton {key} can only be loaded by a WorkerStore")
