"""What the journal costs a deferred task: the write when its request finishes, and the removal after.

    .venv/bin/python bench/journal.py [--requests 2000] [--repeats 5]

Prints the median, over `--repeats` rounds, of the microseconds per deferred task that the accepting
loop spends in `defer()` + `RequestBatch.finish()` of `--requests` requests each deferring 1 (then 10)
`functools.partial` tasks, on the process driver, with and without a journal (side by side, the order
rotated each round), and of the time per task from the first `defer()` until every task has
finished (the pool's throughput, which the journal's writer thread shares the CPUs with); then the
journal's own `append()` and `done()` calls alone. Then the replay of `--replay` entries
(100,000) left by a gone process: how long the facade takes to start, the latency of `run()` calls
while the replay goes on, and how long the replay takes. Last, with ``--http`` (needs wrk), the
requests/s of the ``/defer`` endpoint of `bench/http.py`'s app (two deferred closures per request, of
``--defer-ms`` each) under ``wrk -c16``, served by uvicorn without and with ``CONCURRENCY_JOURNAL``,
alternating, `--http-rounds` rounds of `--http-seconds`. The journal is a file in a temporary
directory on the disk that holds /tmp.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import anyio

# `python bench/journal.py` puts bench/ first on sys.path, where bench/http.py would shadow the standard
# library's `http` package: import the benchmarks as the `bench` package instead.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_BENCH), *(p for p in sys.path if os.path.abspath(p or os.curdir) != _BENCH)]

from bench import _work  # noqa: E402
from starlette_concurrency import Concurrency  # noqa: E402
from starlette_concurrency._journal import Journal, NewEntry, PayloadKind  # noqa: E402
from starlette_concurrency._pickling import dumps_task  # noqa: E402
from starlette_concurrency._tasks import Task  # noqa: E402


def accept(concurrency: Concurrency, requests: int, per_request: int) -> float:
    """Seconds per deferred task spent in defer() and finish() on this thread."""
    task = functools.partial(_work.add, 1, 2)
    began = time.perf_counter()
    for _ in range(requests):
        batch = concurrency.request_batch(method="POST", path="/orders")
        token = batch.activate()
        concurrency.defer([task] * per_request)
        batch.deactivate(token)
        batch.finish(True)
    return (time.perf_counter() - began) / (requests * per_request)


def store_alone(path: str, requests: int, per_request: int) -> tuple[float, float]:
    """Seconds per task of Journal.append (one transaction per request) and Journal.done (the same)."""
    journal = Journal(path)
    payload = dumps_task(Task(0, functools.partial(_work.add, 1, 2)))
    entry = NewEntry(
        "process", PayloadKind.PAYLOAD, payload, "task 0 (partial(add))", "0", "partial(add)", 0, "POST", "/orders"
    )
    began = time.perf_counter()
    ids = [journal.append([entry] * per_request) for _ in range(requests)]
    appended = time.perf_counter() - began
    began = time.perf_counter()
    for batch in ids:
        journal.done([entry_id for entry_id in batch if entry_id is not None])
    done = time.perf_counter() - began
    journal.close()
    return appended / (requests * per_request), done / (requests * per_request)


async def replay(directory: str, count: int) -> None:
    """Start a facade on a journal holding `count` entries of a gone process; time what it does meanwhile."""
    path = os.path.join(directory, "replay.db")
    journal = Journal(path)
    payload = dumps_task(Task(0, functools.partial(_work.add, 1, 2)))
    entry = NewEntry(
        "process", PayloadKind.PAYLOAD, payload, "task 0 (partial(add))", "0", "partial(add)", 0, None, None
    )
    for first in range(0, count, 1000):
        journal.append([entry] * min(1000, count - first))
    journal.release()
    journal.close()
    concurrency = Concurrency(workers=2, journal=path, env_file=None)
    began = time.perf_counter()
    async with concurrency:
        started = time.perf_counter()
        latencies = []
        for _ in range(20):
            before = time.perf_counter()
            await concurrency.run(functools.partial(_work.add, 2, 3))
            latencies.append(time.perf_counter() - before)
            await anyio.sleep(0.05)
        during = concurrency.stats().replayed
        while concurrency.stats().journal_pending or concurrency.stats().deferred_pending:  # noqa: ASYNC110
            await anyio.sleep(0.05)
        finished = time.perf_counter()
    print(
        f"replay of {count} entries: start {started - began:.2f} s; run() meanwhile median "
        f"{statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms ({during} replayed by "
        f"then); all replayed {finished - started:.1f} s after the start"
    )


def http(directory: str, rounds: int, seconds: float, defer_ms: float) -> None:
    """Requests/s of /defer under wrk, without and with a journal, alternating."""
    import re
    import subprocess

    from bench._http import free_port, start_server, stop_server

    rates: dict[str, list[float]] = {"without journal": [], "with journal": []}
    for number in range(rounds):
        for name in rates if number % 2 == 0 else list(rates)[::-1]:
            path = os.path.join(directory, f"http-{number}.db")
            if name == "with journal":
                os.environ["CONCURRENCY_JOURNAL"] = path
            else:
                os.environ.pop("CONCURRENCY_JOURNAL", None)
            port = free_port()
            server = start_server(port, defer_ms)
            try:
                url = f"http://127.0.0.1:{port}/defer"
                subprocess.run(["wrk", "-t2", "-c16", "-d1s", url], check=True, capture_output=True)  # warm-up
                output = subprocess.run(
                    ["wrk", "-t2", "-c16", f"-d{seconds:g}s", url], check=True, capture_output=True, text=True
                ).stdout
                match = re.search(r"Requests/sec:\s+([0-9.]+)", output)
                assert match is not None, output
                rates[name].append(float(match.group(1)))
            finally:
                stop_server(server)
    os.environ.pop("CONCURRENCY_JOURNAL", None)
    without, with_journal = (statistics.median(values) for values in rates.values())
    print(
        f"/defer under wrk -c16 ({rounds} rounds of {seconds:g} s, medians): {without:.0f} requests/s without "
        f"journal, {with_journal:.0f} with: {with_journal / without:.2f}x (goal >= 0.8x: "
        f"{'MET' if with_journal >= 0.8 * without else 'MISSED'}); per round: {rates}"
    )


async def main(requests: int, repeats: int, replayed: int) -> None:
    directory = tempfile.mkdtemp(prefix="journal-bench-")
    plain = Concurrency(workers=2, env_file=None)
    durable = Concurrency(workers=2, journal=os.path.join(directory, "deferred.db"), env_file=None)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {requests} requests per round, {repeats} rounds")
    async with plain, durable:
        for per_request in (1, 10):
            times: dict[str, list[float]] = {"without journal": [], "with journal": []}
            totals: dict[str, list[float]] = {"without journal": [], "with journal": []}
            for round_number in range(repeats):
                order = [("without journal", plain), ("with journal", durable)]
                for name, concurrency in order if round_number % 2 else order[::-1]:
                    began = time.perf_counter()
                    times[name].append(accept(concurrency, requests, per_request))
                    await concurrency.wait_deferred(600)
                    totals[name].append((time.perf_counter() - began) / (requests * per_request))
            base, journaled = (statistics.median(values) * 1e6 for values in times.values())
            base_total, journaled_total = (statistics.median(values) * 1e6 for values in totals.values())
            print(
                f"{per_request:>2} task(s)/request: defer()+finish() on the caller's loop {base:6.1f} µs/task without "
                f"journal, {journaled:6.1f} with; accepted to finished {base_total:6.1f} µs/task without, "
                f"{journaled_total:6.1f} with (+{journaled_total - base_total:.1f} µs)"
            )
    for per_request in (1, 10):
        rounds = [store_alone(os.path.join(directory, f"alone-{per_request}.db"), requests, per_request)]
        rounds += [store_alone(os.path.join(directory, f"alone-{per_request}.db"), requests, per_request)]
        append = statistics.median(appended for appended, _ in rounds) * 1e6
        done = statistics.median(removed for _, removed in rounds) * 1e6
        print(
            f"{per_request:>2} task(s)/request: Journal.append {append:6.1f} µs/task, Journal.done {done:6.1f} µs/task"
        )
    if replayed:
        await replay(directory, replayed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--replay", type=int, default=100_000)
    parser.add_argument("--http", action="store_true", help="also measure /defer of bench/http.py's app with wrk")
    parser.add_argument("--http-rounds", type=int, default=3)
    parser.add_argument("--http-seconds", type=float, default=5.0)
    parser.add_argument("--defer-ms", type=float, default=0.01, help="CPU time of each deferred closure of /defer")
    options = parser.parse_args()
    anyio.run(main, options.requests, options.repeats, options.replay)
    if options.http:
        http(tempfile.mkdtemp(prefix="journal-http-"), options.http_rounds, options.http_seconds, options.defer_ms)
