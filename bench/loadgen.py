"""A small HTTP load generator on httpx, for when wrk is not installed (and for paced load, which wrk cannot do).

    .venv/bin/python bench/loadgen.py http://127.0.0.1:8000/plain --concurrency 16 --duration 5
    .venv/bin/python bench/loadgen.py http://127.0.0.1:8000/defer --rate 100 --duration 8

Closed loop (default): `--concurrency` clients, each sending its next request as soon as the last
one answered; it measures the highest request rate the server sustains. Open loop (`--rate`):
requests start on a fixed schedule whatever the server does, and each latency is measured from the
moment its request was due, so a stalled server cannot hide its stalls by slowing the client down.

Prints one JSON object: requests, errors, seconds, rps, p50_ms, p99_ms, max_ms (and late, in open
loop: requests that could not even start because `--max-in-flight` were pending). Only talks to
127.0.0.1 / localhost, for a bounded time and a bounded number of requests.
"""

from __future__ import annotations

import os
import sys

# `python bench/loadgen.py` puts bench/ first on sys.path, where bench/http.py would shadow the
# standard library's `http` package, which httpx imports.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_BENCH), *(p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH)]

if __name__ == "__main__":
    from bench._loadgen import main

    sys.exit(main())
