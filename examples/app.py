"""A small dashboard that counts things concurrently, reports metrics after responding, and shows the pool live.

Run it with `scripts/example` (or `uvicorn examples.app:app`), then open http://127.0.0.1:8000/.
Also served: /healthz (a readiness probe) and, when prometheus_client is installed, /prometheus.
With ``CONCURRENCY_JOURNAL=deferred.db scripts/example`` its deferred work is journaled (in that file of the
working directory) and the dashboard shows the journal's counters. Without, as by default, it is not: the
example defers metric lines, which a crash may lose.
"""

from __future__ import annotations

import functools
import html
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from starlette_concurrency import Concurrency, ConcurrencyMiddleware
from starlette_concurrency.metrics import health_endpoint

from . import live
from .work import METRICS_LOG, count_primes, count_rows, report

# The driver comes from CONCURRENCY_DRIVER, "process" by default; with it, each worker notes that it
# started, for the dashboard's workers table. The journal comes from CONCURRENCY_JOURNAL (none by default:
# never a file of a shared temporary directory, where another user could plant entries to run).
concurrency = Concurrency(options=live.worker_options())


async def dashboard_data() -> dict[str, object]:
    started = time.perf_counter()
    counts = await concurrency.run(
        {
            "users": functools.partial(count_rows, "users"),
            "orders": functools.partial(count_rows, "orders"),
            "invoices": functools.partial(count_rows, "invoices"),
            "primes below 200k": functools.partial(count_primes, 200_000),
        }
    )
    elapsed = time.perf_counter() - started
    # Reported once the response has been sent: the client does not wait for these.
    concurrency.defer(
        {
            "dashboard.elapsed": functools.partial(report, "dashboard.elapsed", elapsed),
            "dashboard.users": functools.partial(report, "dashboard.users", counts["users"]["count"]),
        }
    )
    return {"elapsed_seconds": round(elapsed, 3), "server_pid": os.getpid(), "counts": counts}


async def dashboard(request: Request) -> Response:
    async def body() -> AsyncIterator[str]:
        # First what the server knows now (the pool, live): the browser paints it at once and its
        # script starts polling, while the four counts run.
        yield f"""<!doctype html><title>Dashboard</title><link rel="icon" href="data:,">
<h1>Dashboard</h1>
<p>Also: <a href="/api/dashboard">/api/dashboard</a> (JSON), <a href="/api/quick">/api/quick</a>,
<a href="/workers">/workers</a>, <a href="/api/progress">/api/progress</a> (server-sent events),
<a href="/metrics">/metrics</a>, <a href="/healthz">/healthz</a>, <a href="/prometheus">/prometheus</a>.</p>
{live.page(live.snapshot(concurrency))}
<h2>Four slow things at once</h2>
<p id="counting">Three 300 ms queries and a CPU-bound count, at the same time in worker processes: their
results follow here when they are ready (the rest of this page did not wait for them).</p>
"""
        # Then the counts, in the same response.
        data = await dashboard_data()
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{value['count']}</td><td>{value['pid']}</td></tr>"
            for name, value in data["counts"].items()  # type: ignore[attr-defined]
        )
        yield f"""<table id="counts" border=1 cellpadding=4>
<tr><th>what</th><th>count</th><th>worker pid</th></tr>{rows}</table>
<p>{data["elapsed_seconds"]} s in all. Server pid {data["server_pid"]}. Two metrics are reported after
this page was sent: see <a href="/metrics">/metrics</a>.</p>
"""

    return StreamingResponse(body(), media_type="text/html")


async def api_dashboard(request: Request) -> Response:
    return JSONResponse(await dashboard_data())


async def quick(request: Request) -> Response:
    """A light endpoint (two small counts now, one metric later): what a busy API does all day."""
    small = await concurrency.run([functools.partial(count_primes, 1_000), functools.partial(count_primes, 1_500)])
    concurrency.defer(functools.partial(report, "quick", small[0]["count"], delay=0))
    return JSONResponse({"primes": [result["count"] for result in small]})


async def workers(request: Request) -> Response:
    """Which worker process ran which of eight tasks."""
    pids = await concurrency.run([functools.partial(os.getpid) for _ in range(8)])
    return JSONResponse({"server_pid": os.getpid(), "task_pids": pids, "distinct_workers": sorted(set(pids))})


async def progress(request: Request) -> Response:
    """The dashboard's four counts as server-sent events, each as soon as it is ready (as_completed)."""
    tasks = {
        "users": functools.partial(count_rows, "users"),
        "orders": functools.partial(count_rows, "orders"),
        "invoices": functools.partial(count_rows, "invoices"),
        "primes below 200k": functools.partial(count_primes, 200_000),
    }

    async def events() -> AsyncIterator[str]:
        # A client that goes away cancels this generator: the counts still running are stopped.
        async for name, result in concurrency.as_completed(tasks):
            yield f"data: {json.dumps({'what': name, **result})}\n\n"
        yield "event: done\ndata: {}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def metrics(request: Request) -> Response:
    lines = METRICS_LOG.read_text().splitlines()[-20:] if METRICS_LOG.exists() else []
    return JSONResponse([json.loads(line) for line in lines])


def prometheus_routes() -> list[BaseRoute]:
    """Serve the Prometheus exposition at /prometheus when the `[prometheus]` extra is installed."""
    try:
        from prometheus_client import CollectorRegistry, make_asgi_app
    except ImportError:
        return []
    from starlette_concurrency.metrics import register_metrics

    registry = CollectorRegistry()  # only this app's metrics: several apps may share a test process
    register_metrics(concurrency, registry)
    return [Mount("/prometheus", make_asgi_app(registry))]


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
    shutil.rmtree(live.ACTIVITY_DIR, ignore_errors=True)  # the workers' notes of what they were doing


app = Starlette(
    routes=[
        Route("/", dashboard),
        Route("/api/dashboard", api_dashboard),
        Route("/api/quick", quick),
        Route("/workers", workers),
        Route("/api/progress", progress),
        Route("/metrics", metrics),
        Route("/healthz", health_endpoint(concurrency)),
        *live.routes(concurrency),
        *prometheus_routes(),
    ],
    middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)],
    lifespan=lifespan,
)
