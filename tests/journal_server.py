"""A server process for the journal's tests: ``python -m tests.journal_server MODE JOURNAL OUT BACKEND``.

``crash``: defers 3 quick tasks (one request each) and waits until they have finished, then defers 4 slow
ones (see `journal_targets.slow`), prints ``READY`` once one has started, and waits to be killed.
``retry``: defers `journal_targets.flaky` (key ``order-9``, 2 retries, a backoff of 2 s) whose first
attempt fails, prints ``READY`` once the journal has counted that failure, and waits to be killed.
``replay``: starts a facade on the journal and exits once the journal holds no entry (it replays them).
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import sys
from pathlib import Path
from typing import Any

import anyio

from starlette_concurrency import Concurrency
from tests import journal_targets


def deferred_in_request(concurrency: Concurrency, task: functools.partial[None], **terms: Any) -> None:
    batch = concurrency.request_batch(method="POST", path="/orders")
    token = batch.activate()
    concurrency.defer(task, **terms)
    batch.deactivate(token)
    batch.finish(True)


def failures(journal: str) -> int:
    with contextlib.closing(sqlite3.connect(journal)) as db:
        return int(db.execute("SELECT coalesce(sum(failures), 0) FROM entries").fetchone()[0])


def remaining(journal: str) -> int:
    with contextlib.closing(sqlite3.connect(journal)) as db:  # a connection's own `with` does not close it
        return int(db.execute("SELECT count(*) FROM entries").fetchone()[0])


async def main(mode: str, journal: str, out: str) -> None:
    concurrency = Concurrency(workers=2, journal=journal, max_pending_deferred=3, env_file=None)
    async with concurrency:
        if mode == "crash":
            for number in range(3):
                deferred_in_request(concurrency, functools.partial(journal_targets.record, out, "quick", number))
            await concurrency.wait_deferred(60)
            with anyio.fail_after(60):
                while remaining(journal):  # noqa: ASYNC110 - removed a tenth of a second after they finish
                    await anyio.sleep(0.05)
            for number in range(3):
                deferred_in_request(concurrency, functools.partial(journal_targets.slow, out, number))
            with anyio.fail_after(60):
                while "start" not in Path(out).read_text():  # noqa: ASYNC110 - another process writes it
                    await anyio.sleep(0.05)
            print("READY", flush=True)
            await anyio.sleep(600)
        elif mode == "retry":
            task = functools.partial(journal_targets.flaky, out, "retry", 1)
            deferred_in_request(concurrency, task, key="order-9", retries=2, backoff=2.0)
            with anyio.fail_after(60):
                while not failures(journal):  # noqa: ASYNC110 - written by the facade's thread
                    await anyio.sleep(0.02)
            print("READY", flush=True)
            await anyio.sleep(600)
        else:
            with anyio.fail_after(120):
                while remaining(journal):  # noqa: ASYNC110 - other processes' work
                    await anyio.sleep(0.1)
            await concurrency.wait_deferred(60)
            stats = concurrency.stats()
            print(f"REPLAYED {stats.replayed} PENDING {stats.journal_pending} DEAD {stats.journal_dead}", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], backend=sys.argv[4])
