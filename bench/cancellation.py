"""Cancellation: many short run() calls on 2 process workers, 4 in 5 of them cancelled a few ms in.

    .venv/bin/python bench/cancellation.py [--duration 5] [--rounds 2]

The measurements live in `bench/_cancellation.py`.
"""

from __future__ import annotations

import os
import sys

# `python bench/cancellation.py` puts bench/ first on sys.path, where bench/http.py would shadow the
# standard library's `http` package; import the benchmarks as the `bench` package instead.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_BENCH), *(p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH)]

if __name__ == "__main__":
    from bench._cancellation import main

    sys.exit(main())
