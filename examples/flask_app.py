"""The dashboard of `examples/app.py` in Flask, served by a WSGI server.

    gunicorn --workers 2 --threads 4 --graceful-timeout 30 examples.flask_app:app

`run_blocking()` runs the slow things at the same time in worker processes; `defer()` reports
metrics after the response has been sent. `CONCURRENCY_DRAIN_TIMEOUT` stays below gunicorn's
`--graceful-timeout`, so deferred work is drained (or logged by name) before a worker is killed.
"""

from __future__ import annotations

import functools
import os
import time

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue

from starlette_concurrency import Concurrency, ConcurrencyWSGIMiddleware

from .work import count_primes, count_rows, report

concurrency = Concurrency()  # one pool per server process, started on first use (after gunicorn's fork)

app = Flask(__name__)
app.wsgi_app = ConcurrencyWSGIMiddleware(app.wsgi_app, concurrency=concurrency)  # type: ignore[method-assign]


@app.get("/")
def dashboard() -> ResponseReturnValue:
    started = time.perf_counter()
    counts = concurrency.run_blocking(
        {
            "users": functools.partial(count_rows, "users"),
            "orders": functools.partial(count_rows, "orders"),
            "primes below 50k": functools.partial(count_primes, 50_000),
        }
    )
    elapsed = time.perf_counter() - started
    # Reported once the response has been sent; skipped if this view fails.
    concurrency.defer(functools.partial(report, "flask.dashboard", elapsed, delay=0))
    return jsonify({"elapsed_seconds": round(elapsed, 3), "server_pid": os.getpid(), "counts": counts})


@app.get("/defer/<name>")
def defer(name: str) -> ResponseReturnValue:
    """Defer one report of `name`, after `delay` seconds (query string), and answer at once."""
    from flask import request

    delay = float(request.args.get("delay", "0"))
    concurrency.defer(functools.partial(report, name, 1, delay=delay))
    always = request.args.get("always")
    if always:
        concurrency.defer(functools.partial(report, always, 1, delay=0), always=True)
    status = int(request.args.get("status", "200"))
    return jsonify({"deferred": name, "server_pid": os.getpid()}), status


@app.get("/pool")
def pool() -> ResponseReturnValue:
    """The worker pids of this server process's pool (four tasks)."""
    return jsonify({"server_pid": os.getpid(), "task_pids": concurrency.run_blocking([os.getpid] * 4)})
