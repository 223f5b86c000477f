"""The load generator of `bench/loadgen.py` (see there); `bench/http.py` runs it in its own process."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio
import httpx

from ._stats import median, percentile

MAX_DURATION = 120.0  # seconds
MAX_REQUESTS = 1_000_000
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    late: int = 0
    sent: int = 0

    def summary(self, seconds: float) -> dict[str, float]:
        count = len(self.latencies)
        return {
            "requests": count,
            "errors": self.errors,
            "late": self.late,
            "seconds": seconds,
            "rps": count / seconds if seconds else math.nan,
            "p50_ms": median(self.latencies) * 1000,
            "p99_ms": percentile(self.latencies, 0.99) * 1000,
            "max_ms": max(self.latencies, default=math.nan) * 1000,
        }


async def request(client: httpx.AsyncClient, url: str, due: float, measured: bool, result: Result) -> None:
    try:
        response = await client.get(url)
        ok = response.status_code == 200
    except httpx.HTTPError:
        ok = False
    if measured:
        if ok:
            result.latencies.append(time.perf_counter() - due)
        else:
            result.errors += 1


async def closed_loop(args: argparse.Namespace, client: httpx.AsyncClient, result: Result) -> float:
    start = time.perf_counter()
    measure_from = start + float(args.warmup)
    end = measure_from + float(args.duration)

    async def user() -> None:
        while (now := time.perf_counter()) < end and result.sent < MAX_REQUESTS:
            result.sent += 1
            await request(client, args.url, now, now >= measure_from, result)

    async with anyio.create_task_group() as tg:
        for _ in range(args.concurrency):
            tg.start_soon(user)
    return min(time.perf_counter(), end) - measure_from


async def open_loop(args: argparse.Namespace, client: httpx.AsyncClient, result: Result) -> float:
    interval = 1 / args.rate
    start = time.perf_counter()
    measure_from = start + args.warmup
    total = min(MAX_REQUESTS, int((args.warmup + args.duration) * args.rate))
    in_flight = 0

    async def tracked(due: float, measured: bool) -> None:
        nonlocal in_flight
        in_flight += 1
        try:
            await request(client, args.url, due, measured, result)
        finally:
            in_flight -= 1

    async with anyio.create_task_group() as tg:
        for index in range(total):
            due = start + index * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            measured = due >= measure_from
            if in_flight >= args.max_in_flight:
                result.late += measured
                continue
            result.sent += 1
            tg.start_soon(tracked, due, measured)
    return float(args.duration)


async def run(args: argparse.Namespace) -> dict[str, float]:
    result = Result()
    limits = httpx.Limits(max_connections=args.max_in_flight if args.rate else args.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        loop = open_loop if args.rate else closed_loop
        seconds = await loop(args, client, result)
    return result.summary(seconds)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="HTTP load against a local server; prints one JSON line.")
    parser.add_argument("url")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--concurrency", type=int, default=16, help="closed loop: concurrent clients")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second (0: closed loop)")
    parser.add_argument("--max-in-flight", type=int, default=256, help="open loop: pending requests at most")
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in LOCAL_HOSTS:
        parser.error("only a server on 127.0.0.1 / localhost may be loaded")
    if not 0 < args.duration + args.warmup <= MAX_DURATION:
        parser.error(f"warmup + duration must be within (0, {MAX_DURATION:g}] seconds")
    if args.concurrency < 1 or args.rate < 0 or args.max_in_flight < 1:
        parser.error("concurrency and max-in-flight must be at least 1, rate not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    print(json.dumps(anyio.run(run, parse(argv))))
    return 0
