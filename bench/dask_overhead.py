"""Per-task overhead of `Concurrency(driver="dask").run()` next to a raw `distributed.Client` on the same cluster.

    .venv/bin/python bench/dask_overhead.py [--calls 200] [--tasks 500] [--rounds 5]

One embedded LocalCluster (2 worker processes, 1 thread each) serves both sides in the same run:
a raw asynchronous `Client` (`submit(fn, pure=False)` then `await`, and `map` + `gather`), and the
facade connected to the same scheduler. Both run the same `functools.partial` of a module-level
function, which pickles by reference. Rounds interleave the two sides (the order alternates), and
each figure is the median over the rounds.

- latency: one task per call, calls one after the other: the fixed cost of a call.
- batch: `--tasks` tasks in one call: what each task costs when a call has many.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable

from starlette_concurrency import DaskOptions

# `python bench/dask_overhead.py` puts bench/ first on sys.path; import the helpers as the `bench` package.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_BENCH), *(p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH)]

WORKERS = 2


async def _time_per_task(run: Callable[[], Awaitable[object]], tasks: int) -> float:
    start = time.perf_counter()
    await run()
    return (time.perf_counter() - start) / tasks


async def measure(calls: int, tasks: int, rounds: int) -> None:
    import distributed

    from bench import _work
    from bench._stats import fmt, machine, median, table
    from starlette_concurrency import Concurrency

    fn = functools.partial(_work.add, 1, 2)
    cluster = await distributed.LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=WORKERS,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",
        asynchronous=True,
    )
    client = await distributed.Client(cluster, asynchronous=True, set_as_default=False)  # type: ignore[no-untyped-call]
    concurrency = Concurrency(driver="dask", options=DaskOptions(address=cluster.scheduler_address), env_file=None)
    try:
        async with concurrency:

            async def raw_submit_one() -> None:
                for _ in range(calls):
                    assert await client.submit(fn, pure=False) == 3

            async def ours_one() -> None:
                for _ in range(calls):
                    assert await concurrency.run(fn) == 3

            async def raw_submit_many() -> None:
                futures = [client.submit(fn, pure=False) for _ in range(tasks)]
                assert await client.gather(futures) == [3] * tasks

            async def raw_map_many() -> None:
                futures = client.map(_work.call, [fn] * tasks, pure=False)
                assert await client.gather(futures) == [3] * tasks

            async def ours_many() -> None:
                assert await concurrency.run([fn] * tasks) == [3] * tasks

            cases: dict[str, list[tuple[str, Callable[[], Awaitable[None]], int]]] = {
                "latency (1 task per call)": [
                    ("raw client.submit", raw_submit_one, calls),
                    ("Concurrency.run", ours_one, calls),
                ],
                f"batch ({tasks} tasks per call)": [
                    ("raw client.submit", raw_submit_many, tasks),
                    ("raw client.map", raw_map_many, tasks),
                    ("Concurrency.run", ours_many, tasks),
                ],
            }
            samples: dict[tuple[str, str], list[float]] = {}
            for peers in cases.values():  # warm-up: imports in the workers, connections, the first graph
                for _, run, _ in peers:
                    await run()
            for round_ in range(rounds):
                for case, peers in cases.items():
                    for name, run, count in peers if round_ % 2 == 0 else peers[::-1]:
                        samples.setdefault((case, name), []).append(await _time_per_task(run, count))
    finally:
        await client.close()
        await cluster.close()  # type: ignore[misc]  # typed as "maybe awaitable": asynchronous=True makes it one

    rows = []
    for case, peers in cases.items():
        baseline = median(samples[(case, "raw client.submit")])
        for name, _, _ in peers:
            per_task = median(samples[(case, name)])
            rows.append(
                [
                    case,
                    name,
                    fmt(per_task * 1e6, 0, " µs"),
                    fmt((per_task - baseline) * 1e6, 0, " µs") if name != "raw client.submit" else "",
                    fmt(per_task / baseline, 2, "x"),
                ]
            )
    print(f"Dask per-task overhead: {WORKERS} worker processes x 1 thread, median of {rounds} rounds")
    print(machine())
    print()
    print(table(["case", "how", "per task", "overhead vs submit", "ratio vs submit"], rows))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="calls of one task each, per round (latency)")
    parser.add_argument("--tasks", type=int, default=500, help="tasks in the one call of a round (batch)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the median is reported")
    args = parser.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    asyncio.run(measure(args.calls, args.tasks, args.rounds))
    return 0


if __name__ == "__main__":  # the cluster's workers are spawned and re-run this module: keep the guard
    sys.exit(main())
