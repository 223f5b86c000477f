"""Log forwarding under a flood: how many records a second one task's logging reaches the server with,
whether any is lost, and how `run()` calls beside it fare.

    .venv/bin/python bench/logs.py [--records 100000]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import anyio

from starlette_concurrency import Concurrency


class Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def flood(records: int) -> int:
    log = logging.getLogger("bench.flood")
    for n in range(records):
        log.info("record %d of the flood", n)
    return records


async def main(records: int) -> None:
    counter = Count()
    log = logging.getLogger("bench.flood")
    log.addHandler(counter)
    log.setLevel(logging.INFO)
    log.propagate = False
    latencies: list[float] = []
    async with Concurrency("process", workers=2, env_file=None) as concurrency:
        await concurrency.run([lambda: 1, lambda: 2])  # both workers warm

        async def probe() -> None:
            while counter.count < records:
                start = time.perf_counter()
                await concurrency.run(lambda: 1)
                latencies.append(time.perf_counter() - start)
                await anyio.sleep(0.005)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe)
            await concurrency.run(lambda: flood(records))
        seconds = time.perf_counter() - start
    latencies.sort()
    print(
        f"{counter.count:,} of {records:,} records arrived in {seconds:.2f} s: {counter.count / seconds:,.0f} a second"
    )
    if latencies:
        p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
        print(
            f"run() of one trivial task beside it ({len(latencies)} calls): "
            f"p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms"
        )
    if counter.count != records:
        sys.exit("records were lost")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    anyio.run(main, parser.parse_args().records)
