"""HTTP benchmark: uvicorn serving the same work through starlette-concurrency and its peers.

    .venv/bin/python bench/http.py [--duration 5] [--concurrency 16] [--rate 100] [--loadgen httpx|wrk|auto]

The app is `bench/_http_app.py`, the orchestration `bench/_http.py`, the load generator
`bench/loadgen.py` (or wrk, when asked for and installed); server, load generator and this script
each run in their own process.
"""

from __future__ import annotations

import os
import sys

# `python bench/http.py` puts bench/ first on sys.path, where this very file would shadow the
# standard library's `http` package; import the benchmarks as the `bench` package instead.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_BENCH), *(p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH)]

if __name__ == "__main__":
    from bench._http import main

    sys.exit(main())
