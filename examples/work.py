"""The slow, independent things the example app does. Module-level, so workers import them by name."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

METRICS_LOG = Path(os.environ.get("EXAMPLE_METRICS_LOG", Path(__file__).with_name("metrics.log")))


def count_rows(table: str) -> dict[str, int]:
    """Pretend to be a slow `SELECT count(*)`: 300 ms of waiting, a deterministic answer."""
    time.sleep(0.3)
    return {"count": sum(map(ord, table)) * 7, "pid": os.getpid()}


def count_primes(limit: int) -> dict[str, int]:
    """CPU-bound work: the number of primes below `limit`, by trial division."""
    count = sum(1 for n in range(2, limit) if all(n % d for d in range(2, int(n**0.5) + 1)))
    return {"count": count, "pid": os.getpid()}


def report(metric: str, value: float, delay: float = 0.2) -> None:
    """Send a metric somewhere slow (here: append to a log file, after a 200 ms 'network' delay)."""
    time.sleep(delay)
    line = json.dumps({"metric": metric, "value": value, "pid": os.getpid(), "at": time.time()})
    with METRICS_LOG.open("a") as log:
        log.write(line + "\n")
