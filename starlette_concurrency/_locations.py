"""Code objects that keep their file name when pickled, so that a worker's traceback names the user's line.

(Our picklers also send a context variable as where a worker finds it: see `_context.reduce_variable`.)

cloudpickle sends a lambda, a closure or a `__main__` function by value: its code object is rebuilt in
the worker. From 3.1.2 on, cloudpickle rebuilds it with the file name ``"<dynamic-code>"`` (so that its
payloads do not depend on where a function was defined); 3.0 to 3.1.1 kept the real one. A traceback in a worker then
reads ``File "<dynamic-code>", line 5, in <lambda>``, with no source line, where the user expects the
route's file. Our picklers reduce code objects with cloudpickle's own reducer and put the real file
name back: the worker's frames name the file and line, and `traceback` reads the source line from the
file through `linecache` (workers run on the server's machine; a Dask worker elsewhere shows the
file and line without the source). Line numbers were never lost: the line table travels as it is.
"""

from __future__ import annotations

import io
import pickle
import types
from collections import ChainMap
from contextvars import ContextVar
from typing import Any, ClassVar

import cloudpickle  # type: ignore[import-untyped]

from ._context import reduce_variable

__all__ = ["code_reduce", "dumps", "located_pickler"]

_cloudpickle_code_reduce = cloudpickle.Pickler.dispatch_table[types.CodeType]


def code_reduce(code: types.CodeType) -> tuple[Any, ...]:
    """Reduce a code object as cloudpickle does, keeping its file name.

    cloudpickle's reducer rebuilds it with ``types.CodeType(*args)``, `args` in the constructor's
    order; where it put its placeholder instead of the file name, the real one is put back.
    """
    reduced: tuple[Any, ...] = _cloudpickle_code_reduce(code)
    if _PLACEHOLDER is None:
        return reduced  # cloudpickle keeps the file name (before 3.1.2)
    index, placeholder = _PLACEHOLDER
    args = reduced[1]
    if args[index] != placeholder:  # pragma: no cover - defensive: a reducer we did not probe
        return reduced
    return (reduced[0], (*args[:index], code.co_filename, *args[index + 1 :]), *reduced[2:])


def _placeholder() -> tuple[int, str] | None:
    """Where cloudpickle's reducer puts its placeholder for the file name, and which; found once on a probe."""
    probe = (lambda: None).__code__.replace(co_filename="\0probe")
    args = _cloudpickle_code_reduce(probe)[1]
    if "\0probe" in args:  # pragma: no cover - cloudpickle before 3.1.2: nothing to put back
        return None
    # The placeholder: the one string argument that is neither the name nor the qualified name.
    names = {probe.co_name, getattr(probe, "co_qualname", probe.co_name)}
    found = [(i, value) for i, value in enumerate(args) if isinstance(value, str) and value not in names]
    return found[0] if len(found) == 1 else None


_PLACEHOLDER = _placeholder()


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    # Ours first, then cloudpickle's ChainMap of its reducers and copyreg's (live: a reducer registered
    # later counts). A class attribute: the C pickler reads its table once, in __init__.
    dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
        {types.CodeType: code_reduce, ContextVar: reduce_variable}, cloudpickle.Pickler.dispatch_table
    )


def located_pickler(file: io.BytesIO) -> Any:
    """Make a cloudpickle pickler (protocol 5) whose code objects keep their file name."""
    return _Pickler(file, protocol=pickle.HIGHEST_PROTOCOL)


def dumps(obj: Any) -> bytes:
    """Pickle like `cloudpickle.dumps` (protocol 5), code objects keeping their file name."""
    file = io.BytesIO()
    located_pickler(file).dump(obj)
    return file.getvalue()
