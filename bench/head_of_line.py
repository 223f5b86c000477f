"""Head-of-line: a call of 6 x 10 ms arriving while another call's 2 s task runs, on 2 workers.

    .venv/bin/python bench/head_of_line.py [--rounds 3]

Prints the short call's latency with starlette-concurrency's pool and with ProcessPoolExecutor, and
their ratio (the goal: within 1.5x of ProcessPoolExecutor). Release 2 pipelined one short task
behind the long one: ~1.96 s against ~0.064 s.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import os
import sys
import time

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_BENCH), *(p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH)]


async def ours(rounds: int) -> float:
    from starlette_concurrency import Concurrency
    from starlette_concurrency._drivers.process import ProcessDriver

    best = float("inf")
    async with Concurrency(driver=ProcessDriver(2), env_file=None) as concurrency:
        await concurrency.run([functools.partial(time.sleep, 0.01)] * 2)  # warm
        for _ in range(rounds):
            long = asyncio.ensure_future(concurrency.run(functools.partial(time.sleep, 2.0)))
            await asyncio.sleep(0.2)
            began = time.perf_counter()
            await concurrency.run([functools.partial(time.sleep, 0.01)] * 6)
            best = min(best, time.perf_counter() - began)
            await long
    return best


def executor(rounds: int) -> float:
    best = float("inf")
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        list(pool.map(time.sleep, [0.01, 0.01]))  # warm
        for _ in range(rounds):
            long = pool.submit(time.sleep, 2.0)
            time.sleep(0.2)
            began = time.perf_counter()
            list(pool.map(time.sleep, [0.01] * 6))
            best = min(best, time.perf_counter() - began)
            long.result()
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    mine = asyncio.run(ours(rounds))
    theirs = executor(rounds)
    print(f"{'peer':<24} {'short call (s)':>15} {'ratio':>7}")
    print(f"{'starlette-concurrency':<24} {mine:>15.3f} {mine / theirs:>7.2f}")
    print(f"{'ProcessPoolExecutor':<24} {theirs:>15.3f} {1.0:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
