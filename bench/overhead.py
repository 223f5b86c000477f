"""Overhead of starlette-concurrency against ProcessPoolExecutor, loky and anyio.to_process, in one run.

    .venv/bin/python bench/overhead.py [--iterations 1000] [--tasks 2000] [--cpu-ms 250] ...

The measurements live in `bench/_overhead.py`. This launcher stays import-light on purpose: loky
and anyio.to_process start their workers by re-running the main module, and a heavy one would
bill them for imports that are ours, not theirs.
"""

from __future__ import annotations

import os
import sys

# `python bench/overhead.py` puts bench/ first on sys.path, where bench/http.py would shadow the
# standard library's `http` package; import the benchmarks as the `bench` package instead.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_BENCH), *(p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH)]

if __name__ == "__main__":
    from bench._overhead import main

    sys.exit(main())
