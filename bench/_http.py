"""The orchestration of `bench/http.py`: start uvicorn, load each endpoint in turn, print the tables.

Two phases, each endpoint loaded on its own while the others idle:

1. ``run()`` under closed-loop load (`--concurrency` clients, as fast as the server answers; one
   table per value, 16 and 64 by default): ``/plain``, ``/run/ours``, ``/run/ppe``,
   ``/run/anyio``, behind `ConcurrencyMiddleware`, and ``/bare/plain``, ``/bare/run/ours``,
   ``/bare/run/reference`` (a minimal multiplexed pool, `_reference_pool.py`) without it, in an
   order that rotates each round. Around each measured load the script reads from /proc the CPU
   time of the server process and of its children (the pools' workers, those that exited
   included), and reports both per request served. Then the mixed-load row: ``/run/ours`` again
   while `bench/loadgen.py` keeps the pool busy with deferred CPU work (``/defer`` at
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

from . import _proc
from ._stats import fmt, machine, median, table, verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ENDPOINTS = [
    "/plain",
    "/bare/plain",
    "/run/ours",
    "/bare/run/ours",
    "/bare/run/reference",
    "/run/ppe",
    "/run/anyio",
]
TASKS_PER_REQUEST = 2  # every /run endpoint runs two closures
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


def per_request(result: dict[str, float], before: _proc.Snapshot | None, server: int | None) -> dict[str, float]:
    """`result`, with the CPU microseconds the server and its children spent per request since `before`."""
    if before is None or server is None:
        return result
    server_seconds, children_seconds = _proc.spent(before, _proc.snapshot(server))
    requests = result["requests"] or math.nan
    return {**result, "server_us": server_seconds / requests * 1e6, "workers_us": children_seconds / requests * 1e6}


def httpx_load(url: str, args: argparse.Namespace, *, rate: float = 0.0, server: int | None = None) -> dict[str, float]:
    """Load `url` with bench/loadgen.py: open loop at `rate`, or closed loop (CPU measured when `server` is given)."""
    command = [sys.executable, "-m", "bench.loadgen", url]
    if rate:
        command += ["--rate", str(rate), "--duration", str(args.defer_duration), "--warmup", str(args.warmup)]
        return _loadgen(command)
    command += ["--concurrency", str(args.connections), "--warmup", "0"]
    if args.warmup > 0:  # a run of its own, so that the CPU measured is the measured load's only
        _loadgen([*command, "--duration", str(args.warmup)])
    before = _proc.snapshot(server) if server is not None else None
    return per_request(_loadgen([*command, "--duration", str(args.duration)]), before, server)


def _loadgen(command: list[str]) -> dict[str, float]:
    output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=180).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_load(url: str, args: argparse.Namespace, server: int | None = None) -> dict[str, float]:
    """Load `url` with wrk, closed loop, after a warm-up (CPU measured when `server` is given)."""
    base = ["wrk", "-t1", f"-c{args.connections}"]
    subprocess.run([*base, f"-d{max(1, round(args.warmup))}s", url], check=True, capture_output=True, timeout=60)
    before = _proc.snapshot(server) if server is not None else None
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
    result = {
        "requests": float(requests[1]) if requests else math.nan,
        "errors": (float(errors[1]) if errors else 0)
        + (sum(map(float, socket_errors.groups())) if socket_errors else 0),
        "rps": float(rps[1]) if rps else math.nan,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "max_ms": math.nan,
    }
    return per_request(result, before, server)


def ratio(a: float, b: float) -> str:
    return fmt(a / b) + "x" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def load(url: str, args: argparse.Namespace, generator: str, server: int | None = None) -> dict[str, float]:
    return wrk_load(url, args, server) if generator == "wrk" else httpx_load(url, args, server=server)


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
    "/bare/plain": "no work, no middleware",
    "/bare/run/ours": "concurrency.run(), no middleware",
    "/bare/run/reference": "reference pool (_reference_pool.py)",
    "/defer": "concurrency.defer()",
    "/background": "Starlette BackgroundTasks",
}


def _row(label: str, m: Measured) -> list[str]:
    """One line of a closed-loop table: label, req/s, p50, p99, errors."""
    return [label, fmt(m.get("rps"), 0), fmt(m.get("p50_ms"), 2), fmt(m.get("p99_ms"), 2), f"{m.total('errors'):.0f}"]


def _added(runs: dict[str, Measured], endpoint: str, baseline: str) -> float:
    """Server CPU microseconds per request `endpoint` costs over the no-work `baseline`."""
    return runs[endpoint].get("server_us") - runs[baseline].get("server_us")


def _baseline(endpoint: str) -> str:
    """The no-work endpoint behind the same middleware (or none) as `endpoint`."""
    return "/bare/plain" if endpoint.startswith("/bare/") else "/plain"


def report_cpu(args: argparse.Namespace, runs: dict[str, Measured]) -> None:
    print(f"\nCPU per request from /proc, {args.connections} connections (microseconds, medians of the rounds):\n")
    reference = runs["/bare/run/reference"]
    ref_added = _added(runs, "/bare/run/reference", "/bare/plain")
    rows = []
    for endpoint, m in runs.items():
        added = _added(runs, endpoint, _baseline(endpoint)) if "/run/" in endpoint else math.nan
        workers = m.get("workers_us")
        rows.append(
            [
                f"{endpoint} — {LABELS[endpoint]}",
                fmt(m.get("server_us"), 1),
                fmt(added, 1),
                fmt(workers, 1),
                fmt(workers / TASKS_PER_REQUEST, 1) if "/run/" in endpoint else "",
                ratio(added, ref_added) if "/run/" in endpoint else "",
                ratio(workers, reference.get("workers_us")) if "/run/" in endpoint else "",
            ]
        )
    headers = ["endpoint", "server", "server added", "workers", "workers per task"]
    print(table([*headers, "added ÷ reference", "workers ÷ reference"], rows))
    print(
        "\nserver: the uvicorn process; workers: all its child processes (every pool's workers, exited ones\n"
        "included; only the loaded endpoint's pool is busy); added: server CPU over the no-work endpoint\n"
        "behind the same middleware (/plain) or none (/bare/plain)."
    )


def report_phase1(args: argparse.Namespace, runs: dict[str, Measured], busy: Measured) -> None:
    print(f"\nrun() of two trivial closures per request, {args.connections} connections:\n")
    rows = [_row(f"{endpoint} — {LABELS[endpoint]}", m) for endpoint, m in runs.items()]
    rows.append(_row(f"/run/ours beside deferred work ({args.mixed_rate:g} x /defer per s)", busy))
    print(table(["endpoint", "req/s", "p50 ms", "p99 ms", "errors"], rows))
    ours, bare, reference = runs["/run/ours"], runs["/bare/run/ours"], runs["/bare/run/reference"]
    aio, plain = runs["/run/anyio"], runs["/plain"]
    print("\nours / peer (ours: /run/ours against the peers behind the middleware, /bare/run/ours against the")
    print("reference pool; CPU: the server's added over its no-work endpoint, the workers' per request):\n")

    def line(label: str, key: str, added: bool = False) -> list[str]:
        def value(endpoint: str) -> float:
            return _added(runs, endpoint, _baseline(endpoint)) if added else runs[endpoint].get(key)

        mine = value("/run/ours")
        cells = [ratio(mine, value("/run/ppe")), ratio(mine, value("/run/anyio"))]
        return [label, *cells, ratio(value("/bare/run/ours"), value("/bare/run/reference"))]

    print(
        table(
            ["metric", "run_in_executor(PPE)", "anyio.to_process", "reference pool"],
            [
                line("req/s (higher is better)", "rps"),
                line("p50 (lower is better)", "p50_ms"),
                line("p99 (lower is better)", "p99_ms"),
                line("server CPU added per request (lower is better)", "server_us", added=True),
                line("workers' CPU per request (lower is better)", "workers_us"),
            ],
        )
    )
    report_cpu(args, runs)
    ref_added = _added(runs, "/bare/run/reference", "/bare/plain")
    print(f"\nGoals at {args.connections} connections:")
    value = _added(runs, "/bare/run/ours", "/bare/plain") / ref_added
    print(f"  {verdict(value <= 1.2):6}  run() server CPU added per request ≤ 1.2x the reference pool's: {fmt(value)}x")
    value = _added(runs, "/run/ours", "/bare/plain") / ref_added
    print(
        f"  {verdict(value <= 1.3):6}  the same behind the middleware (over /bare/plain) ≤ 1.3x the reference's: "
        f"{fmt(value)}x"
    )
    value = bare.get("workers_us") / reference.get("workers_us")
    value_mw = ours.get("workers_us") / reference.get("workers_us")
    print(
        f"  {verdict(value <= 1.2):6}  run() workers' CPU per task ≤ 1.2x the reference pool's: {fmt(value)}x "
        f"({fmt(value_mw)}x behind the middleware)"
    )
    value = ours.get("rps") / aio.get("rps")
    print(f"  {verdict(value >= 2):6}  run() req/s ≥ 2x anyio.to_process's: {fmt(value)}x")
    value = ours.get("rps") / plain.get("rps")
    print(f"  {verdict(value >= 0.7):6}  run() req/s ≥ 0.7x the no-work endpoint's: {fmt(value)}x")
    value = ours.get("p99_ms") / aio.get("p99_ms")
    print(f"  {verdict(value <= 0.8):6}  run() p99 ≤ 0.8x anyio.to_process's: {fmt(value)}x")
    value = busy.get("p50_ms") / ours.get("p50_ms")
    print(f"  {verdict(value <= 2):6}  run() p50 beside deferred work ≤ 2x its idle p50: {fmt(value)}x")


def report(args: argparse.Namespace, generator: str, deferred: dict[str, Measured]) -> None:
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
    measured = server.pid if _proc.available(server.pid) else None  # CPU time from /proc: Linux only
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
                    runs[endpoint].runs.append(load(base + endpoint, args, generator, measured))
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
    report(args, generator, deferred)
    for one_args, one_runs, one_busy in phase1:
        report_phase1(one_args, one_runs, one_busy)
    return 0
