"""The measurements of `bench/overhead.py`: the same closures through every peer, side by side.

Every peer gets 2 workers, is warmed up before it is timed, and runs the very same callables
(`functools.partial`s of functions in `bench._work`, which every peer pickles by reference). Our
drivers also run the lambda spelling of the same work — lambdas defined in this module calling a
function of another, the shape of an app's code — which the process driver sends through its
function cache (code once per worker, state every call); the "lambda / partial" lines check that
it costs about what a partial does. Timed sections interleave the peers
(the order rotates every round), so that a noisy neighbour or a frequency change hurts all of them
alike.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.to_process
import loky
import psutil
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from starlette_concurrency import Concurrency, ConcurrencyMiddleware, ProcessOptions

from . import _work
from ._stats import fmt, machine, median, percentile, table, verdict

Fns = list[Callable[[], Any]]
Runner = Callable[[Fns], Awaitable[list[Any]]]
MIB = 1024 * 1024
WORKERS = 2
OUR_DRIVERS = ("process", "fork", "sync")


@dataclass(eq=False)
class Peer:
    """One way of running a list of closures at the same time, and what it measured."""

    name: str
    run: Runner
    ours: bool = False
    lambdas: bool = False  # run the lambda spelling of the work (ours only)
    latency: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


@dataclass
class StartUp:
    """Start-up of one pool of 2 workers, and the memory of its idle workers."""

    name: str
    start: list[float] = field(default_factory=list)  # until the pool says it is ready (ours only)
    ready: list[float] = field(default_factory=list)  # until both workers have answered a task
    distinct: bool = True  # both probe tasks ran on different workers, every time
    rss: list[float] = field(default_factory=list)  # per worker
    uss: list[float] = field(default_factory=list)  # per worker
    error: str | None = None


# The work --------------------------------------------------------------------------------------


def two(lambdas: bool) -> Fns:
    if lambdas:
        return [lambda: _work.add(1, 2), lambda: _work.add(3, 4)]
    return [partial(_work.add, 1, 2), partial(_work.add, 3, 4)]


def many(count: int, lambdas: bool) -> Fns:
    if lambdas:
        return [lambda i=i: _work.add(i, 1) for i in range(count)]  # type: ignore[misc]
    return [partial(_work.add, i, 1) for i in range(count)]


def cpu_bound(loops: int, lambdas: bool) -> Fns:
    if lambdas:
        return [lambda: _work.burn(loops), lambda: _work.burn(loops)]
    return [partial(_work.burn, loops), partial(_work.burn, loops)]


# The peers -------------------------------------------------------------------------------------


def run_ours(concurrency: Concurrency) -> Runner:
    async def run(fns: Fns) -> list[Any]:
        return await concurrency.run(fns)

    return run


def run_executor(executor: concurrent.futures.Executor) -> Runner:
    """One `run_in_executor` per closure, gathered: what an asyncio user writes for a list of closures."""

    async def run(fns: Fns) -> list[Any]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(executor, fn) for fn in fns)))

    return run


def run_executor_map(executor: concurrent.futures.Executor) -> Runner:
    """`Executor.map` with a chunksize like ours (n / (4 x workers), at most 128), from a thread."""

    async def run(fns: Fns) -> list[Any]:
        chunksize = max(1, min(128, len(fns) // (4 * WORKERS)))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: list(executor.map(_work.call, fns, chunksize=chunksize)))

    return run


def run_to_process(limiter: anyio.CapacityLimiter) -> Runner:
    """One `anyio.to_process.run_sync` per closure in a task group; the limiter caps it at 2 workers."""

    async def run(fns: Fns) -> list[Any]:
        results: list[Any] = [None] * len(fns)

        async def one(index: int, fn: Callable[[], Any]) -> None:
            results[index] = await anyio.to_process.run_sync(fn, limiter=limiter)

        async with anyio.create_task_group() as tg:
            for index, fn in enumerate(fns):
                tg.start_soon(one, index, fn)
        return results

    return run


# Steady state: latency, throughput, CPU-bound speedup ------------------------------------------


async def timed(run: Runner, fns: Fns) -> float:
    start = time.perf_counter()
    await run(fns)
    return time.perf_counter() - start


def rotated(peers: Sequence[Peer], turn: int) -> list[Peer]:
    turn %= len(peers)
    return [*peers[turn:], *peers[:turn]]


async def steady_state(args: argparse.Namespace, loops: int, unavailable: dict[str, str]) -> list[Peer]:
    async with AsyncExitStack() as stack:
        peers: list[Peer] = []
        for driver in OUR_DRIVERS:
            if driver in unavailable:
                continue
            concurrency = Concurrency(driver, workers=WORKERS, env_file=None)
            try:
                await stack.enter_async_context(concurrency)
                if await concurrency.run(two(lambdas=False)) != [3, 7]:
                    raise RuntimeError("wrong results")
            except Exception as exc:
                unavailable[driver] = f"{type(exc).__name__}: {exc}"
                continue
            peers.append(Peer(f"{driver} (partial)", run_ours(concurrency), ours=True))
            peers.append(Peer(f"{driver} (lambda)", run_ours(concurrency), ours=True, lambdas=True))
        # What log forwarding (on by default) costs a call that logs nothing: the same pool without it.
        quiet = Concurrency("process", workers=WORKERS, env_file=None, options=ProcessOptions(forward_logs=False))
        await stack.enter_async_context(quiet)
        peers.append(Peer("process, logs not forwarded (lambda)", run_ours(quiet), ours=True, lambdas=True))
        ppe = concurrent.futures.ProcessPoolExecutor(WORKERS)
        stack.callback(ppe.shutdown)
        loky_pool = loky.ProcessPoolExecutor(WORKERS)
        stack.callback(loky_pool.shutdown)
        peers += [
            Peer("ProcessPoolExecutor", run_executor(ppe)),
            Peer("loky", run_executor(loky_pool)),
            Peer("anyio.to_process", run_to_process(anyio.CapacityLimiter(WORKERS))),
        ]
        mapped = Peer("ProcessPoolExecutor.map", run_executor_map(ppe))

        # Warm every pool up: all workers started, every import done, every code path taken once.
        for peer in [*peers, mapped]:
            for _ in range(20):
                await peer.run(two(peer.lambdas))
            await peer.run(many(200, peer.lambdas))

        print(f"latency: {args.iterations} calls of run() with two trivial closures per peer ...", flush=True)
        gc.collect()
        rounds = math.ceil(args.iterations / args.block)
        for turn in range(rounds):
            for peer in rotated(peers, turn):
                fns = two(peer.lambdas)
                for _ in range(args.block):
                    peer.latency.append(await timed(peer.run, fns))

        print(f"throughput: {args.repeats} calls of {args.tasks} tiny closures per peer ...", flush=True)
        with_map = [*peers, mapped]
        for turn in range(args.repeats):
            for peer in rotated(with_map, turn):
                # A fork per task manages a few hundred tasks a second: give it fewer, and fewer times.
                forks = peer.name.startswith("fork")
                if forks and turn >= args.fork_repeats:
                    continue
                count = args.fork_tasks if forks else args.tasks
                fns = many(count, peer.lambdas)
                gc.collect()
                peer.throughput.append(count / await timed(peer.run, fns))
        peers.append(mapped)

        print(f"CPU-bound: {args.cpu_repeats} calls of two {args.cpu_ms:g} ms closures per peer ...", flush=True)
        sequential = Peer("one after the other, in-process", run_ours(Concurrency("sync", env_file=None)))
        for turn in range(args.cpu_repeats):
            for peer in rotated([sequential, *peers[:-1]], turn):
                fns = cpu_bound(loops, peer.lambdas)
                if peer is sequential:
                    start = time.perf_counter()
                    for fn in fns:
                        fn()
                    peer.cpu.append(time.perf_counter() - start)
                else:
                    peer.cpu.append(await timed(peer.run, fns))
        return [sequential, *peers]


# Hosting: the same call where a lifespan hosts the facade and where nothing does ----------------


def asgi_app(concurrency: Concurrency) -> ASGIApp:
    """A minimal endpoint behind the middleware that runs two trivial closures per request."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        await concurrency.run(two(lambdas=False))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return ConcurrencyMiddleware(endpoint, concurrency=concurrency, cancel_on_disconnect=False)


def asgi_runner(app: ASGIApp) -> Runner:
    scope: Scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    async def run(fns: Fns) -> list[Any]:
        await app(scope, receive, send)
        return []

    return run


async def hosting(args: argparse.Namespace) -> list[list[str]]:
    """Latency of a two-task run() on an entered facade vs one nothing hosts (issue 21: no thread hop)."""
    logging.getLogger("starlette_concurrency").setLevel(logging.ERROR)  # the no-lifespan warning, once
    entered = Concurrency("process", workers=WORKERS, env_file=None)
    lazy = Concurrency("process", workers=WORKERS, env_file=None)  # a script without `async with`
    asgi_entered = Concurrency("process", workers=WORKERS, env_file=None)
    asgi_lazy = Concurrency("process", workers=WORKERS, env_file=None)  # uvicorn --lifespan off, daphne
    async with entered, asgi_entered:
        peers = [
            Peer("script, `async with` (entered)", run_ours(entered)),
            Peer("script, nothing hosts it", run_ours(lazy)),
            Peer("ASGI app with lifespan (entered)", asgi_runner(asgi_app(asgi_entered))),
            Peer("ASGI app without lifespan", asgi_runner(asgi_app(asgi_lazy))),
        ]
        for peer in peers:
            for _ in range(50):
                await peer.run(two(lambdas=False))
        print(f"hosting: {args.iterations} calls of run() with two trivial closures per wiring ...", flush=True)
        gc.collect()
        for turn in range(math.ceil(args.iterations / args.block)):
            for peer in rotated(peers, turn):
                fns = two(lambdas=False)
                for _ in range(args.block):
                    peer.latency.append(await timed(peer.run, fns))
    await lazy.aclose()
    await asgi_lazy.aclose()
    rows = []
    for entered_peer, lazy_peer in ((peers[0], peers[1]), (peers[2], peers[3])):
        for peer in (entered_peer, lazy_peer):
            ratio = median(peer.latency) / median(entered_peer.latency)
            rows.append([peer.name, fmt(ms(median(peer.latency)) * 1000, 0), fmt(ratio) + "x"])
    return rows


def report_hosting(rows: list[list[str]]) -> None:
    print()
    print(table(["wiring (process driver)", "run(2) p50 µs", "vs entered"], rows))
    print("\nGoals (issue 21, no thread hop when nothing hosts the facade):")
    for label, row in (("script without `async with`", rows[1]), ("ASGI app without lifespan", rows[3])):
        measured = float(row[2].rstrip("x"))
        print(f"  {verdict(measured <= 1.2):6}  {label}: run(2) ≤ 1.2x entered: {row[2]}")


# Start-up and memory ---------------------------------------------------------------------------


def memory(pids: Sequence[int], result: StartUp) -> None:
    for pid in set(pids):
        if pid == os.getpid():
            continue
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:  # a fork child has exited already
            continue
        result.rss.append(info.rss / MIB)
        result.uss.append(info.uss / MIB)


async def start_ours(driver: str, delay: float, result: StartUp) -> None:
    begin = time.perf_counter()
    async with Concurrency(driver, workers=WORKERS, env_file=None) as concurrency:
        result.start.append(time.perf_counter() - begin)
        pids = await concurrency.run([partial(_work.probe, delay)] * WORKERS)
        result.ready.append(time.perf_counter() - begin - delay)
        result.distinct &= len(set(pids)) == WORKERS
        memory(pids, result)


async def start_executor(make: Callable[[], concurrent.futures.Executor], delay: float, result: StartUp) -> None:
    begin = time.perf_counter()
    executor = make()  # ProcessPoolExecutor and loky start their workers on the first submit
    try:
        pids = await run_executor(executor)([partial(_work.probe, delay)] * WORKERS)
        result.ready.append(time.perf_counter() - begin - delay)
        result.distinct &= len(set(pids)) == WORKERS
        memory(pids, result)
    finally:
        executor.shutdown()


async def start_to_process(delay: float, result: StartUp) -> None:
    # Each trial runs in a fresh event loop, and anyio keeps its worker pool per event loop.
    begin = time.perf_counter()
    pids = await run_to_process(anyio.CapacityLimiter(WORKERS))([partial(_work.probe, delay)] * WORKERS)
    result.ready.append(time.perf_counter() - begin - delay)
    result.distinct &= len(set(pids)) == WORKERS
    memory(pids, result)


def start_up(args: argparse.Namespace, unavailable: dict[str, str]) -> list[StartUp]:
    trials: list[tuple[StartUp, Callable[[], Awaitable[None]]]] = []
    for driver in OUR_DRIVERS[:2]:
        if driver not in unavailable:
            result = StartUp(driver)
            trials.append((result, partial(start_ours, driver, args.probe, result)))
    ppe, lk, ap = StartUp("ProcessPoolExecutor"), StartUp("loky"), StartUp("anyio.to_process")
    trials.append(
        (ppe, partial(start_executor, partial(concurrent.futures.ProcessPoolExecutor, WORKERS), args.probe, ppe))
    )
    trials.append((lk, partial(start_executor, partial(loky.ProcessPoolExecutor, WORKERS), args.probe, lk)))
    trials.append((ap, partial(start_to_process, args.probe, ap)))
    print(f"start-up: {args.startups} pools of {WORKERS} workers per peer ...", flush=True)
    for turn in range(args.startups):
        for result, trial in trials[turn % len(trials) :] + trials[: turn % len(trials)]:
            gc.collect()
            try:
                anyio.run(trial)
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {exc}"
    return [result for result, _ in trials]


# Report ----------------------------------------------------------------------------------------


def ms(seconds: float) -> float:
    return seconds * 1000


def report(args: argparse.Namespace, peers: list[Peer], starts: list[StartUp], unavailable: dict[str, str]) -> None:
    sequential, *peers = peers
    seq = median(sequential.cpu)

    def speedup(peer: Peer) -> float:
        return seq / median(peer.cpu) if peer.cpu else math.nan

    start_by_name = {start.name: start for start in starts}

    def start_of(peer: Peer) -> StartUp | None:
        return start_by_name.get(peer.name.split(" (")[0])

    rows = []
    for peer in peers:
        start = start_of(peer) if not peer.lambdas else None
        rows.append(
            [
                peer.name,
                fmt(ms(median(peer.latency)), 3),
                fmt(ms(percentile(peer.latency, 0.99)), 3),
                fmt(median(peer.throughput), 0),
                fmt(speedup(peer)),
                fmt(ms(median(start.start)), 1) if start and start.start else "",
                fmt(ms(median(start.ready)), 1) + ("" if start.distinct else " (!)") if start else "",
                fmt(max(start.rss, default=math.nan), 1) if start else "",
                fmt(max(start.uss, default=math.nan), 1) if start else "",
            ]
        )
    print()
    print(machine())
    print(
        f"{WORKERS} workers everywhere; latency over {args.iterations} calls, throughput median of "
        f"{args.repeats} calls of {args.tasks} tasks, CPU-bound median of {args.cpu_repeats} calls "
        f"(two closures of {args.cpu_ms:g} ms; in-process one after the other: {fmt(ms(seq), 0)} ms), "
        f"start-up median of {args.startups} pools. The fork driver's throughput is measured on "
        f"{args.fork_tasks} tasks, {args.fork_repeats} times."
    )
    if args.load_at_start > 0.5:
        print(
            f"WARNING: the machine was busy before the run (load average {args.load_at_start:.2f}): "
            "CPU-bound speedups and tail latencies are not trustworthy."
        )
    for driver, reason in unavailable.items():
        print(f"driver {driver!r} unavailable: {reason}")
    print()
    print(
        table(
            [
                "peer",
                "run(2) p50 ms",
                "run(2) p99 ms",
                f"{args.tasks} tasks/s",
                "CPU speedup",
                "start() ms",
                "ready ms",
                "RSS MiB/worker",
                "USS MiB/worker",
            ],
            rows,
        )
    )
    print(
        "\nready: from creating the pool until both workers have answered a task (the same probe for "
        "every peer); (!) = both probes ran on one worker.\nRSS/USS: the larger idle worker. "
        "ProcessPoolExecutor forks the benchmark process (Python 3.11 on Linux), so its RSS counts "
        "pages shared with it; USS is what each worker costs on its own."
    )
    for start in starts:
        if start.error:
            print(f"start-up of {start.name} failed: {start.error}")

    by_name = {peer.name: peer for peer in peers}
    references = [by_name[name] for name in ("ProcessPoolExecutor", "loky", "anyio.to_process")]
    for driver in ("process", "fork"):
        ours = by_name.get(f"{driver} (partial)")
        if ours is None:
            continue
        ratio_rows: list[list[str]] = []
        metrics: list[tuple[str, Callable[[Peer], float], bool]] = [
            ("run(2) p50 latency", lambda p: median(p.latency), False),
            ("run(2) p99 latency", lambda p: percentile(p.latency, 0.99), False),
            (f"{args.tasks} tasks throughput", lambda p: median(p.throughput), True),
            ("CPU-bound speedup", speedup, True),
        ]
        for label, value, higher_is_better in metrics:
            cells = []
            for peer in [*references, by_name["ProcessPoolExecutor.map"]]:
                theirs = value(peer)
                ratio = value(ours) / theirs if theirs and not math.isnan(theirs) else math.nan
                cells.append(fmt(ratio) + "x" if not math.isnan(ratio) else "n/a")
            ratio_rows.append([label + (" (higher is better)" if higher_is_better else " (lower is better)"), *cells])
        ours_start = start_by_name.get(driver)
        start_metrics: list[tuple[str, Callable[[StartUp], float]]] = [
            ("ready (lower is better)", lambda s: median(s.ready)),
            ("RSS per worker (lower is better)", lambda s: max(s.rss, default=math.nan)),
            ("USS per worker (lower is better)", lambda s: max(s.uss, default=math.nan)),
        ]
        for label, pick in start_metrics:
            cells = []
            for peer in references:
                theirs_start = start_by_name.get(peer.name)
                if ours_start is None or theirs_start is None:
                    cells.append("n/a")
                    continue
                a, b = pick(ours_start), pick(theirs_start)
                cells.append(fmt(a / b) + "x" if b and not math.isnan(a) and not math.isnan(b) else "n/a")
            ratio_rows.append([label, *cells, ""])
        print(f"\nours / peer, for the {driver} driver (partials):\n")
        print(table(["metric", *[p.name for p in references], "ProcessPoolExecutor.map"], ratio_rows))

    process = by_name.get("process (partial)")
    if process is None:
        print("\nGoals: the process driver did not run")
        return
    ppe, anyio_peer = by_name["ProcessPoolExecutor"], by_name["anyio.to_process"]
    lat = median(process.latency)
    start = start_by_name.get("process")
    goals = [
        ("run(2) latency ≤ 0.5x ProcessPoolExecutor", lat / median(ppe.latency), 0.5, False),
        # The goals of release 2 (the multiplexed pool, issue 16): a single call no worse than before it.
        ("run(2) latency ≤ 0.5x anyio.to_process", lat / median(anyio_peer.latency), 0.5, False),
        (
            f"{args.tasks} tiny closures ≥ 15x ProcessPoolExecutor throughput",
            median(process.throughput) / median(ppe.throughput),
            15.0,
            True,
        ),
        ("two CPU-bound closures ≥ 1.9x speedup", speedup(process), 1.9, True),
    ]
    if start is not None and start.ready:
        goals += [
            ("pool of 2 workers ready ≤ 150 ms", ms(median(start.ready)), 150.0, False),
            ("idle worker RSS ≤ 25 MiB", max(start.rss, default=math.nan), 25.0, False),
        ]
    print("\nGoals (process driver, partials):")
    for label, measured, bound, higher in goals:
        met = measured >= bound if higher else measured <= bound
        unit = " MiB" if "MiB" in label else " ms" if "ms" in label else "x"
        print(f"  {verdict(met):6}  {label}: {fmt(measured)}{unit}")
    lambdas = by_name.get("process (lambda)")
    if lambdas is not None:
        closures = [
            ("run(2) p50 of two lambdas ≤ 1.15x two partials", median(lambdas.latency) / lat, 1.15, False),
            (
                f"{args.tasks} lambdas ≥ 0.8x the throughput of {args.tasks} partials",
                median(lambdas.throughput) / median(process.throughput),
                0.8,
                True,
            ),
        ]
        print("\nGoals (process driver, lambda / partial, issue 10):")
        for label, measured, bound, higher in closures:
            met = measured >= bound if higher else measured <= bound
            print(f"  {verdict(met):6}  {label}: {fmt(measured)}x")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=1000, help="run() calls of two closures per peer")
    parser.add_argument("--block", type=int, default=20, help="calls per peer before the next peer's turn")
    parser.add_argument("--tasks", type=int, default=2000, help="tiny closures in one throughput call")
    parser.add_argument("--repeats", type=int, default=7, help="throughput calls per peer")
    parser.add_argument("--fork-tasks", type=int, default=200, help="tiny closures in one throughput call of fork")
    parser.add_argument("--fork-repeats", type=int, default=3, help="throughput calls of the fork driver")
    parser.add_argument("--cpu-ms", type=float, default=250.0, help="duration of one CPU-bound closure")
    parser.add_argument("--cpu-repeats", type=int, default=5, help="CPU-bound calls per peer")
    parser.add_argument("--startups", type=int, default=3, help="pools started per peer")
    parser.add_argument("--probe", type=float, default=0.3, help="seconds each start-up probe task holds its worker")
    parser.add_argument("--hosting-only", action="store_true", help="only compare hosted and unhosted wirings")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    args.load_at_start = os.getloadavg()[0]
    # When a start-up trial's event loop closes, subprocess's own clean-up may reap an anyio worker
    # before asyncio's child watcher does, which then logs a harmless "Unknown child process" warning.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    unavailable: dict[str, str] = {}
    for driver in OUR_DRIVERS:
        try:
            Concurrency(driver, workers=WORKERS, env_file=None)  # also imports the driver's module
        except Exception as exc:
            unavailable[driver] = f"{type(exc).__name__}: {exc}"
    hosted = anyio.run(hosting, args)
    if args.hosting_only:
        report_hosting(hosted)
        return 0
    loops = _work.calibrate(args.cpu_ms)
    starts = start_up(args, unavailable)
    peers = anyio.run(steady_state, args, loops, unavailable)
    report(args, peers, starts, unavailable)
    report_hosting(hosted)
    return 0
