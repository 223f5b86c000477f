"""What the function cache knows of one function, and what it sends of it at every call.

A function's `Record` says what must still hold for its skeleton (code and names, sent to a worker
once) to be reused: the module metadata and by-reference globals it was made with, still the same
objects, still going by reference. `function_state` is what is sent every time (cells, defaults, data
globals). `reference_check` is the cheap test that a module, function or class still pickles by
reference. `_closures.py` explains the cache as a whole.
"""

from __future__ import annotations

import itertools
import sys
import types
from collections.abc import Callable
from typing import Any

from cloudpickle import cloudpickle as _cp  # type: ignore[import-untyped]

from ._wire.closure_store import Skeleton

__all__ = ["SUPPORTED", "Record", "by_value", "function_state", "reference_check", "split_globals"]

META = ("__package__", "__name__", "__path__", "__file__")  # what cloudpickle keeps of a function's module
ABSENT = object()
# cloudpickle's own tests of what it sends by reference (private, so checked): where one is missing,
# every function takes cloudpickle's path.
HELPERS = (
    "_PICKLE_BY_VALUE_MODULES",
    "_extract_code_globals",
    "_find_imported_submodules",
    "_is_registered_pickle_by_value",
    "_lookup_module_and_qualname",
    "_should_pickle_by_reference",
)
SUPPORTED = all(hasattr(_cp, name) for name in HELPERS)


class Record:
    """Parent side: a function's skeleton and what must still hold for it to be reused."""

    __slots__ = ("absent", "code", "data_names", "meta", "modules_len", "names", "refs", "skeleton", "submodules")

    def __init__(self, func: types.FunctionType, skeleton: Skeleton | None, split: Split) -> None:
        self.code = func.__code__  # held, so that the id in the record's dict key is not reused
        self.names = (func.__name__, func.__qualname__, func.__module__, func.__doc__)
        self.skeleton = skeleton  # None: too large to cache; cloudpickle's path
        self.meta, self.refs, self.absent, self.data_names, self.submodules, self.modules_len = split

    def matches(self, func: types.FunctionType) -> bool:
        """Whether `func` still has this record's skeleton (its code is this one: the record's key says so)."""
        g = func.__globals__
        for name, value in self.meta:
            if g.get(name, ABSENT) is not value:
                return False
        for name, value, check in self.refs:
            if g.get(name, ABSENT) is not value or not check():
                return False
        for name in self.absent:
            if name in g:
                return False
        for name in self.data_names:
            if name not in g:
                return False
        if self.modules_len is not None and len(sys.modules) != self.modules_len:
            # A submodule of a package the function uses may have been imported since.
            modules = [value for _, value, _ in self.refs if isinstance(value, types.ModuleType)]
            if tuple(_cp._find_imported_submodules(self.code, modules)) != self.submodules:
                return False
            self.modules_len = len(sys.modules)
        return True


Split = tuple[
    tuple[tuple[str, Any], ...],
    tuple[tuple[str, Any, Callable[[], bool]], ...],
    tuple[str, ...],
    tuple[str, ...],
    tuple[types.ModuleType, ...],
    "int | None",
]


def split_globals(func: types.FunctionType) -> Split:
    """Sort the globals `func` reads: module identity, by-reference, absent, data."""
    g = func.__globals__
    meta = tuple((name, g[name]) for name in META if name in g)
    refs: list[tuple[str, Any, Callable[[], bool]]] = []
    absent: list[str] = []
    data: list[str] = []
    for name in _cp._extract_code_globals(func.__code__):
        value = g.get(name, ABSENT)
        if value is ABSENT:
            absent.append(name)
            continue
        check = reference_check(value)
        if check is None:
            data.append(name)
        else:
            refs.append((name, value, check))
    modules = [value for _, value, _ in refs if isinstance(value, types.ModuleType)]
    submodules = tuple(_cp._find_imported_submodules(func.__code__, modules))
    packages = any(getattr(module, "__package__", None) for module in modules)
    return meta, tuple(refs), tuple(absent), tuple(data), submodules, len(sys.modules) if packages else None


def reference_check(value: Any) -> Callable[[], bool] | None:
    """For a value cloudpickle sends by reference, a cheap test that it still would; else None.

    A module: still the one imported under its name. A module-level function or class: still the same
    object under the same name in that module, the module still the one imported under its name (what
    cloudpickle's own lookup asks). Neither registered to go by value since. A nested name gets
    cloudpickle's full test.
    """
    if isinstance(value, types.ModuleType):
        if not _cp._should_pickle_by_reference(value):
            return None
        name = value.__name__
        return lambda: sys.modules.get(name) is value and not by_value(value)
    if not isinstance(value, types.FunctionType | type):
        return None
    found = _cp._lookup_module_and_qualname(value)
    if found is None or _cp._is_registered_pickle_by_value(found[0]):
        return None
    module: types.ModuleType = found[0]
    qualname: str = found[1]
    if "." in qualname:
        return lambda: _cp._should_pickle_by_reference(value)  # a nested name: the full test
    name, namespace = module.__name__, module.__dict__
    return lambda: namespace.get(qualname) is value and sys.modules.get(name) is module and not by_value(module)


def by_value(module: types.ModuleType) -> bool:
    """Whether `module` was registered with `cloudpickle.register_pickle_by_value` (cheap when none is)."""
    return bool(_cp._PICKLE_BY_VALUE_MODULES) and bool(_cp._is_registered_pickle_by_value(module))


def function_state(func: types.FunctionType, record: Record) -> tuple[Any, ...]:
    names = (func.__name__, func.__qualname__, func.__module__, func.__doc__)
    g = func.__globals__
    values = tuple([g[name] for name in record.data_names]) if record.data_names else ()
    cells: tuple[Any, ...] | None = None
    empty: list[int] = []
    closure = func.__closure__
    if closure is not None:
        try:
            cells = tuple([cell.cell_contents for cell in closure])
        except ValueError:  # a variable not bound yet (called before the enclosing `def` ran, say)
            cells = tuple(cell_contents(cell, index, empty) for index, cell in enumerate(closure))
    submodules: Any = ()
    if values or cells:
        loose = [value for value in itertools.chain(values, cells or ()) if isinstance(value, types.ModuleType)]
        if loose:  # modules passed as data: cloudpickle imports the submodules the code reaches through them
            submodules = _cp._find_imported_submodules(func.__code__, loose)
    return (
        None if names == record.names else names,
        func.__defaults__,
        func.__kwdefaults__,
        func.__dict__ or None,
        func.__annotations__ or None,
        cells,
        tuple(empty) or None,
        values,
        submodules,
    )


def cell_contents(cell: types.CellType, index: int, empty: list[int]) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a variable not bound yet (the function is called before its closure's `def` ran)
        empty.append(index)
        return None
