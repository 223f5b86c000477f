"""The orchestration of `bench/http.py`: start uvicorn, load each endpoint in turn, print the tables.

Two phases, each endpoint loaded on its own while the others idle:

1. ``run()`` under closed-loop load (`--concurrency` clients, as fast as the server answers; one
   table per value, 16 and 64 by default): ``/plain``, ``/run/ours``, ``/run/ppe``,
   ``/run/anyio``, in an order that rotates each round. Then the mixed-load row: ``/run/ours``
   again while `bench/loadgen.py` keeps the pool busy with deferred CPU work (``/defer`` at
   `--mixed-rate` requests a second), compared with its idle p50.
2. deferred work under open-loop load (`--rate` requests a second, on a fixed schedule, latency
   measured from when each request was due): ``/plain``, ``/defer``, ``/background``. Between
   endpoints the script waits until the server has finished the deferred work, and reports how
   long that took. wrk cannot pace requests, so this phase always uses `bench/loadgen.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from ._stats import fmt, machine, median, table, verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ENDPOINTS = ["/plain", "/run/ours", "/run/ppe", "/run/anyio"]
DEFER_ENDPOINTS = ["/plain", "/defer", "/background"]
CLEARLY_BETTER = 0.75  # "a clearly better p99": at most this fraction of BackgroundTasks'


@dataclass
class Measured:
    endpoint: str
    runs: list[dict[str, float]] = field(default_factory=list)
    drains: list[float] = field(default_factory=list)

    def get(self, key: str) -> float:
        return median([run[key] for run in self.runs if not math.isnan(run.get(key, math.nan))])

    def total(self, key: str) -> float:
        return sum(run.get(key, 0) for run in self.runs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(port: int, defer_ms: float) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "uvicorn", "bench._http_app:app", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "warning", "--no-access-log", "--lifespan", "on"]
    env = {**os.environ, "BENCH_DEFER_MS": str(defer_ms), "PYTHONPATH": ROOT}
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/plain", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    stop_server(server)
    raise RuntimeError("the server did not start within 30 s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.send_signal(signal.SIGINT)  # a graceful shutdown: the lifespan drains and stops the pools
    try:
        server.wait(timeout=45)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def drain(base: str, timeout: float) -> float:
    """Wait until the server has no deferred work left; return how long that took (NaN: it did not)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        pending = httpx.get(f"{base}/stats", timeout=5).json()
        if pending["deferred"] == 0 and pending["background"] == 0:
            return time.perf_counter() - start
        time.sleep(0.02)
    return math.nan


def httpx_load(url: str, args: argparse.Namespace, *, rate: float = 0.0) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.loadgen", url, "--warmup", str(args.warmup)]
    if rate:
        command += ["--rate", str(rate), "--duration", str(args.defer_duration)]
    else:
        command += ["--concurrency", str(args.connections), "--duration", str(args.duration)]
    output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=180).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_load(url: str, args: argparse.Namespace) -> dict[str, float]:
    base = ["wrk", "-t1", f"-c{args.connections}"]
    subprocess.run([*base, f"-d{max(1, round(args.warmup))}s", url], check=True, capture_output=True, timeout=60)
    output = subprocess.run(
        [*base, f"-d{max(1, round(args.duration))}s", "--latency", url],
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout

    def latency(percent: str) -> float:
        found = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
        return float(found[1]) * _UNITS[found[2]] if found else math.nan

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    requests = re.search(r"(\d+) requests in", output)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "requests": float(requests[1]) if requests else math.nan,
        "errors": (float(errors[1]) if errors else 0)
        + (sum(map(float, socket_errors.groups())) if socket_errors else 0),
        "rps": float(rps[1]) if rps else math.nan,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "max_ms": math.nan,
    }


def ratio(a: float, b: float) -> str:
    return fmt(a / b) + "x" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def load(url: str, args: argparse.Namespace, generator: str) -> dict[str, float]:
    return wrk_load(url, args) if generator == "wrk" else httpx_load(url, args)


def mixed(base: str, args: argparse.Namespace, generator: str) -> dict[str, float]:
    """Load ``/run/ours`` while deferred CPU work (``/defer`` at `--mixed-rate`) keeps the pool busy."""
    seconds = args.warmup + args.duration + 3
    command = [sys.executable, "-m", "bench.loadgen", base + "/defer", "--rate", str(args.mixed_rate)]
    command += ["--duration", f"{seconds:g}", "--warmup", "0"]
    background = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # let the deferred work fill the pool first
        return load(base + "/run/ours", args, generator)
    finally:
        background.wait(timeout=seconds + 60)
        drain(base, args.drain_timeout)


LABELS = {
    "/plain": "no work (reference)",
    "/run/ours": "concurrency.run()",
    "/run/ppe": "run_in_executor(ProcessPoolExecutor)",
    "/run/anyio": "anyio.to_process.run_sync",
    "/defer": "concurrency.defer()",
    "/background": "Starlette BackgroundTasks",
}


def _row(label: str, m: Measured) -> list[str]:
    """One line of a closed-loop table: label, req/s, p50, p99, errors."""
    return [label, fmt(m.get("rps"), 0), fmt(m.get("p50_ms"), 2), fmt(m.get("p99_ms"), 2), f"{m.total('errors'):.0f}"]


def report_phase1(args: argparse.Namespace, runs: dict[str, Measured], busy: Measured) -> None:
    print(f"\nrun() of two trivial closures per request, {args.connections} connections:\n")
    rows = [_row(f"{endpoint} — {LABELS[endpoint]}", m) for endpoint, m in runs.items()]
    rows.append(_row(f"/run/ours beside deferred work ({args.mixed_rate:g} x /defer per s)", busy))
    print(table(["endpoint", "req/s", "p50 ms", "p99 ms", "errors"], rows))
    ours, plain, aio = runs["/run/ours"], runs["/plain"], runs["/run/anyio"]
    print(f"\nGoals at {args.connections} connections:")
    value = ours.get("rps") / aio.get("rps")
    print(f"  {verdict(value >= 2):6}  run() req/s ≥ 2x anyio.to_process's: {fmt(value)}x")
    value = ours.get("rps") / plain.get("rps")
    print(f"  {verdict(value >= 0.7):6}  run() req/s ≥ 0.7x the no-work endpoint's: {fmt(value)}x")
    value = ours.get("p99_ms") / aio.get("p99_ms")
    print(f"  {verdict(value <= 0.8):6}  run() p99 ≤ 0.8x anyio.to_process's: {fmt(value)}x")
    value = busy.get("p50_ms") / ours.get("p50_ms")
    print(f"  {verdict(value <= 2):6}  run() p50 beside deferred work ≤ 2x its idle p50: {fmt(value)}x")


def report(args: argparse.Namespace, generator: str, runs: dict[str, Measured], deferred: dict[str, Measured]) -> None:
    print()
    print(machine())
    print(
        f"uvicorn (1 process, asyncio, h11), every pool 2 workers. Phase 1: {generator}, closed loop, "
        f"{args.concurrency} connections, {args.duration:g} s per endpoint after {args.warmup:g} s of warm-up, "
        f"median of {args.rounds} round(s). Phase 2: bench/loadgen.py, open loop at {args.rate:g} requests/s "
        f"for {args.defer_duration:g} s, deferred work 2 x {args.defer_ms:g} ms of CPU per request."
    )
    if args.load_at_start > 0.5:
        print(f"WARNING: the machine was busy before the run (load average {args.load_at_start:.2f}).")
    print("\nrun() of two trivial closures per request:\n")
    rows = [_row(f"{endpoint} — {LABELS[endpoint]}", m) for endpoint, m in runs.items()]
    print(table(["endpoint", "req/s", "p50 ms", "p99 ms", "errors"], rows))
    ours, ppe, aio = runs["/run/ours"], runs["/run/ppe"], runs["/run/anyio"]
    print("\nours / peer:\n")
    print(
        table(
            ["metric", "run_in_executor(PPE)", "anyio.to_process"],
            [
                [
                    "req/s (higher is better)",
                    ratio(ours.get("rps"), ppe.get("rps")),
                    ratio(ours.get("rps"), aio.get("rps")),
                ],
                [
                    "p50 (lower is better)",
                    ratio(ours.get("p50_ms"), ppe.get("p50_ms")),
                    ratio(ours.get("p50_ms"), aio.get("p50_ms")),
                ],
                [
                    "p99 (lower is better)",
                    ratio(ours.get("p99_ms"), ppe.get("p99_ms")),
                    ratio(ours.get("p99_ms"), aio.get("p99_ms")),
                ],
            ],
        )
    )

    print(f"\nDeferred work, open loop at {args.rate:g} requests/s:\n")
    rows = [
        [
            f"{endpoint} — {LABELS[endpoint]}",
            fmt(m.get("rps"), 0),
            fmt(m.get("p50_ms"), 2),
            fmt(m.get("p99_ms"), 2),
            fmt(m.get("max_ms"), 2),
            f"{m.total('errors'):.0f} / {m.total('late'):.0f}",
            fmt(median(m.drains), 2),
        ]
        for endpoint, m in deferred.items()
    ]
    print(table(["endpoint", "req/s", "p50 ms", "p99 ms", "max ms", "errors / late", "work done after (s)"], rows))
    print("\nwork done after: once the load stopped, how long the server still needed to finish the deferred work.")
    plain, defer, background = deferred["/plain"], deferred["/defer"], deferred["/background"]
    print("\nGoals:")
    p50 = defer.get("p50_ms") / plain.get("p50_ms")
    print(f"  {verdict(p50 <= 1.2):6}  defer() p50 ≤ 1.2x the same endpoint without deferred work: {fmt(p50)}x")
    p99 = defer.get("p99_ms") / background.get("p99_ms")
    print(
        f"  {verdict(p99 <= CLEARLY_BETTER):6}  defer() p99 clearly better (≤ {CLEARLY_BETTER}x) than "
        f"BackgroundTasks': {fmt(p99)}x"
    )


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="phase 1: measured seconds per endpoint")
    parser.add_argument(
        "--concurrency", default="16,64", help="phase 1: concurrent connections, a comma-separated list"
    )
    parser.add_argument("--mixed-rate", type=float, default=50.0, help="phase 1: /defer requests/s of the mixed row")
    parser.add_argument("--rounds", type=int, default=2, help="phase 1: rounds over the endpoints")
    parser.add_argument("--rate", type=float, default=100.0, help="phase 2: requests per second")
    parser.add_argument("--defer-duration", type=float, default=15.0, help="phase 2: measured seconds per endpoint")
    parser.add_argument("--defer-ms", type=float, default=4.0, help="phase 2: CPU time of each deferred closure")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for deferred work")
    parser.add_argument(
        "--loadgen",
        choices=["httpx", "wrk", "auto"],
        default="httpx",
        help="phase 1 load generator: bench/loadgen.py (default), wrk, or wrk when installed",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    args.load_at_start = os.getloadavg()[0]
    wrk = shutil.which("wrk")
    generator = "bench/loadgen.py (httpx)"
    if args.loadgen == "wrk" and wrk is None:
        print("wrk is not installed: falling back to bench/loadgen.py")
    if args.loadgen in ("wrk", "auto") and wrk is not None:
        generator = "wrk"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"starting uvicorn on {base} ...", flush=True)
    server = start_server(port, args.defer_ms)
    phase1: list[tuple[argparse.Namespace, dict[str, Measured], Measured]] = []
    try:
        for connections in [int(value) for value in str(args.concurrency).split(",")]:
            args = argparse.Namespace(**{**vars(args), "connections": connections})
            runs = {endpoint: Measured(endpoint) for endpoint in RUN_ENDPOINTS}
            busy = Measured("/run/ours")
            for turn in range(args.rounds):
                order = RUN_ENDPOINTS[turn % len(RUN_ENDPOINTS) :] + RUN_ENDPOINTS[: turn % len(RUN_ENDPOINTS)]
                for endpoint in order:
                    print(f"phase 1, {connections} connections, round {turn + 1}: {endpoint} ...", flush=True)
                    runs[endpoint].runs.append(load(base + endpoint, args, generator))
                print(f"phase 1, {connections} connections, round {turn + 1}: mixed ...", flush=True)
                busy.runs.append(mixed(base, args, generator))
            phase1.append((args, runs, busy))
        deferred = {endpoint: Measured(endpoint) for endpoint in DEFER_ENDPOINTS}
        for endpoint in DEFER_ENDPOINTS:
            print(f"phase 2: {endpoint} at {args.rate:g} requests/s ...", flush=True)
            drain(base, args.drain_timeout)
            deferred[endpoint].runs.append(httpx_load(base + endpoint, args, rate=args.rate))
            deferred[endpoint].drains.append(drain(base, args.drain_timeout))
    finally:
        stop_server(server)
    report(args, generator, runs, deferred)
    for one_args, one_runs, one_busy in phase1:
        report_phase1(one_args, one_runs, one_busy)
    return 0
