"""A stand-alone worker for tests/test_closures.py: only `_wire/closure_store.py`, loaded by path, and stdlib.

    python tests/closure_worker.py PATH_OF_closure_store.py ROOT

Reads frames from stdin — a 4-byte length and a pickled (definitions blob, payload data) — loads and
calls each function of the payload (awaiting a coroutine), and answers on stdout with a frame holding
a pickled (status, results or error, the store's keys, whether the package root was imported).
"""

from __future__ import annotations

import asyncio
import importlib.util
import pickle
import struct
import sys
from typing import Any

HEADER = struct.Struct("!I")


def main() -> None:
    sys.path.insert(0, sys.argv[2])  # the repository root: `tests.closure_targets` imports from there
    spec = importlib.util.spec_from_file_location("standalone_closure_store", sys.argv[1])
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    store = module.WorkerStore()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while header := stdin.read(HEADER.size):
        blob, data = pickle.loads(stdin.read(HEADER.unpack(header)[0]))
        answer: tuple[Any, ...]
        try:
            store.load_definitions(blob)
            answer = ("ok", [_call(fn) for fn in store.load(data)])
        except Exception as exc:
            answer = ("error", f"{type(exc).__name__}: {exc}")
        keys = sorted(store._skeletons)
        body = pickle.dumps((*answer, keys, "starlette_concurrency" in sys.modules))
        stdout.write(HEADER.pack(len(body)) + body)
        stdout.flush()


def _call(fn: Any) -> Any:
    value = fn()
    if asyncio.iscoroutine(value):
        value = asyncio.run(value)
    return value


if __name__ == "__main__":
    main()
