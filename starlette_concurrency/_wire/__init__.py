"""What a worker process runs, and the wire between it and the server: standard library only.

- `worker.py`: the `process` driver's worker loop (started by path: ``python …/_wire/worker.py``).
- `protocol.py`: the frames both ends write and read (tags, framing, the TASKS layout).
- `outcome.py`: how a task's end (value, exception, a result that will not pickle) becomes an answer,
  for the worker, the fork driver's child and the dask driver's worker alike.
- `closure_store.py`: the worker's end of the function cache (`_closures.py` is the server's).

Nothing here imports the package root or any third-party module, because a worker started by path
must not pay for starlette and anyio (about 30 ms and 9 MiB each). `worker.py` loads this folder as
the package ``starlette_concurrency._wire`` without importing ``starlette_concurrency`` itself, so that
these modules never take a top-level name that an app's own module could have (a `protocol.py` or
`worker.py` of the app's, whose functions a task pickles by reference).

So the modules here import names from each other (``from .protocol import frame``), never a sibling
module itself (``from . import protocol``): Python does that through ``__import__`` of the dotted
name, which imports the package root too. For the same reason what a worker must load is pickled as
``importlib.import_module(<module>)`` (see `context.py`), not as a plain reference.
"""
