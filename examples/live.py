"""The live half of the example dashboard: the pool's `stats()` as JSON, buttons that start work, and the page.

The page is plain HTML with a small inline script that polls ``/api/stats`` once a second and draws
its charts on a canvas: no build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from starlette_concurrency import Concurrency
from starlette_concurrency.metrics import health

from . import activity
from .work import count_primes

__all__ = ["ACTIVITY_DIR", "PAGE", "routes"]

ACTIVITY_DIR = Path(
    os.environ.get("EXAMPLE_ACTIVITY_DIR")
    or Path(tempfile.gettempdir(), f"starlette-concurrency-example-{os.getpid()}")
)


def _traced(label: str, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return functools.partial(activity.traced, str(ACTIVITY_DIR), label, fn, *args)


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def routes(concurrency: Concurrency) -> list[Route]:
    """The live dashboard's endpoints, on the app's facade."""
    ACTIVITY_DIR.mkdir(parents=True, exist_ok=True)

    async def stats(request: Request) -> Response:
        snapshot = concurrency.stats()
        ok, detail = health(concurrency)
        return JSONResponse(
            {
                "time": time.time(),
                "server_pid": os.getpid(),
                "stats": {
                    "driver": snapshot.driver,
                    "workers": snapshot.workers,
                    "busy": snapshot.busy,
                    "queued": snapshot.queued,
                    "deferred_pending": snapshot.deferred_pending,
                    "tasks_completed": snapshot.tasks_completed,
                    "tasks_failed": snapshot.tasks_failed,
                    "tasks_crashed": snapshot.tasks_crashed,
                    "tasks_timed_out": snapshot.tasks_timed_out,
                    "worker_restarts": snapshot.worker_restarts,
                    "task_time_p50": _finite(snapshot.task_time_p50),
                    "task_time_p99": _finite(snapshot.task_time_p99),
                },
                "healthy": ok,
                "problems": [problem for driver in detail["drivers"].values() for problem in driver["problems"]],
                "activity": activity.read_notes(ACTIVITY_DIR),
            }
        )

    async def work(request: Request) -> Response:
        kind = request.path_params["kind"]
        started = time.perf_counter()
        if kind == "run":  # eight CPU-bound counts, now
            results = await concurrency.run(
                [_traced(f"task {i} (count_primes)", count_primes, 40_000 + i) for i in range(8)]
            )
            summary = f"8 counts: {sorted({result['count'] for result in results})[:3]}..."
        elif kind == "burst":  # more tasks than workers: the queue fills, then drains
            await concurrency.run([_traced(f"task {i} (nap)", activity.nap, 0.3) for i in range(40)])
            summary = "40 naps of 0.3 s"
        elif kind == "defer":  # after the response: pending for a few seconds
            concurrency.defer([_traced(f"task {i} (nap, deferred)", activity.nap, 2.0) for i in range(6)])
            summary = "6 naps of 2 s deferred"
        elif kind == "fail":
            [error] = await concurrency.run([_traced("task 0 (fail)", activity.fail, "boom")], return_exceptions=True)
            summary = f"failed as planned: {error!r}"
        elif kind == "crash":
            if concurrency.driver_name in ("sync", "dask"):
                return JSONResponse({"error": f"the {concurrency.driver_name} driver cannot lose a worker"}, 400)
            [error] = await concurrency.run([_traced("task 0 (crash)", activity.crash)], return_exceptions=True)
            summary = f"crashed as planned: {error!r}"
        else:
            return JSONResponse({"error": f"unknown kind of work {kind!r}"}, 404)
        return JSONResponse({"kind": kind, "summary": summary, "seconds": round(time.perf_counter() - started, 3)})

    return [Route("/api/stats", stats), Route("/api/work/{kind}", work, methods=["POST"])]


PAGE = """
<h2>The pool, live</h2>
<style>
  .cards { display: flex; flex-wrap: wrap; gap: 8px; font-family: sans-serif; }
  .card { border: 1px solid #ccc; border-radius: 6px; padding: 6px 12px; min-width: 90px; }
  .card b { display: block; font-size: 1.6em; }
  .ok { color: #070; } .bad { color: #b00; }
  canvas { border: 1px solid #ccc; margin: 4px 8px 4px 0; }
  td, th { padding: 2px 8px; text-align: left; }
</style>
<p>Driver <b id="driver">…</b>, health <b id="health">…</b> <span id="problems"></span>,
updated <span id="updated">never</span> (poll <span id="polls">0</span>).</p>
<p id="waiting"></p>
<div class="cards">
  <div class="card">workers<b id="workers">…</b></div>
  <div class="card">busy<b id="busy">…</b></div>
  <div class="card">queued<b id="queued">…</b></div>
  <div class="card">deferred pending<b id="deferred_pending">…</b></div>
  <div class="card">completed<b id="tasks_completed">…</b></div>
  <div class="card">failed<b id="tasks_failed">…</b></div>
  <div class="card">crashed<b id="tasks_crashed">…</b></div>
  <div class="card">timed out<b id="tasks_timed_out">…</b></div>
  <div class="card">restarts<b id="worker_restarts">…</b></div>
  <div class="card">p50<b id="task_time_p50">…</b></div>
  <div class="card">p99<b id="task_time_p99">…</b></div>
</div>
<p>
  <button data-work="run">Run 8 counts</button>
  <button data-work="burst">Burst of 40 tasks</button>
  <button data-work="defer">Defer 6 slow tasks</button>
  <button data-work="fail">A failing task</button>
  <button data-work="crash">Crash a worker</button>
  <span id="message"></span>
</p>
<div>
  <canvas id="throughput" width="480" height="140"></canvas>
  <canvas id="latency" width="480" height="140"></canvas>
</div>
<h3>Workers</h3>
<table><thead><tr><th>pid</th><th>doing</th><th>for / took</th><th>tasks done</th></tr></thead>
<tbody id="activity"><tr><td colspan="4">…</td></tr></tbody></table>
<script>
"use strict";
const WINDOW = 300;  // seconds of history in the charts
const history = [];  // {t, finished, p50, p99}
let polls = 0;
const $ = (id) => document.getElementById(id);
const ms = (s) => (s === null ? "-" : (s * 1000).toFixed(s < 0.01 ? 2 : 0) + " ms");
const finishedOf = (s) => s.tasks_completed + s.tasks_failed + s.tasks_crashed + s.tasks_timed_out;

function text(cell, value) { const td = document.createElement("td"); td.textContent = value; cell.appendChild(td); }

function chart(canvas, title, series, unit) {
  const g = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const top = Math.max(1e-9, ...series.flatMap((s) => s.values.filter((v) => v !== null)));
  // The x axis spans the history so far (at least a minute, at most WINDOW): the first minute fills it.
  const span = Math.min(WINDOW, Math.max(60, series[0].values.length));
  g.font = "12px sans-serif"; g.fillStyle = "#333";
  g.fillText(`${title} — last ${span} s, max ${unit(top)}`, 6, 14);
  series.forEach((s, k) => {
    g.strokeStyle = s.color; g.lineWidth = 1.5; g.beginPath();
    let drawing = false;
    s.values.forEach((v, i) => {
      if (v === null) { drawing = false; return; }
      const x = w - 2 - (s.values.length - 1 - i) * ((w - 4) / (span - 1)), y = h - 4 - (v / top) * (h - 24);
      drawing ? g.lineTo(x, y) : g.moveTo(x, y); drawing = true;
    });
    g.stroke(); g.fillStyle = s.color; g.fillText(s.name, 6 + k * 70, h - 6);
  });
}

function render(data) {
  const s = data.stats;
  for (const key of ["workers", "busy", "queued", "deferred_pending", "tasks_completed", "tasks_failed",
                     "tasks_crashed", "tasks_timed_out", "worker_restarts"]) { $(key).textContent = s[key]; }
  $("task_time_p50").textContent = ms(s.task_time_p50);
  $("task_time_p99").textContent = ms(s.task_time_p99);
  $("driver").textContent = s.driver;
  $("health").textContent = data.healthy ? "ok" : "stuck";
  $("health").className = data.healthy ? "ok" : "bad";
  $("problems").textContent = data.problems.join("; ");
  // Deferred work uses at most workers - 1 workers, so that a run() never waits behind it: say so
  // when deferred tasks wait while a worker is idle.
  const waiting = s.deferred_pending > 0 && s.queued > 0 && s.busy < s.workers;
  $("waiting").textContent = waiting
    ? `${s.queued} deferred task(s) waiting while a worker is idle: deferred work uses at most ` +
      `${Math.max(1, s.workers - 1)} of the ${s.workers} workers, so that a run() call never waits behind it.`
    : "";
  $("updated").textContent = new Date(data.time * 1000).toLocaleTimeString();
  $("polls").textContent = ++polls;
  const rows = data.activity.map((note) => {
    const tr = document.createElement("tr");
    text(tr, note.pid);
    if (note.task) {
      text(tr, "running " + note.task); text(tr, (data.time - note.since).toFixed(1) + " s");
    } else {
      text(tr, `idle (last: ${note.last}, ${note.last_outcome})`); text(tr, ms(note.last_seconds));
    }
    text(tr, note.done);
    return tr;
  });
  if (!rows.length) {
    // Only the buttons' tasks say which worker runs them; the counters above count every task.
    const finished = finishedOf(s), tr = document.createElement("tr"), td = document.createElement("td");
    td.colSpan = 4;
    td.textContent = finished === 0 && s.busy === 0 ? "no task has run yet"
      : `${finished} task(s) finished, ${s.busy} running: none from the buttons below, which show per worker`;
    tr.appendChild(td); rows.push(tr);
  }
  $("activity").replaceChildren(...rows);
  history.push({ t: data.time, finished: finishedOf(s), p50: s.task_time_p50, p99: s.task_time_p99 });
  while (history.length > WINDOW) history.shift();
  const rate = history.map((p, i) => {
    const before = history[i - 1];
    return before ? Math.max(0, (p.finished - before.finished) / (p.t - before.t)) : null;
  });
  const perSecond = (v) => v.toFixed(1) + "/s";
  chart($("throughput"), "throughput", [{ name: "tasks/s", color: "#1565c0", values: rate }], perSecond);
  chart($("latency"), "task run time", [
    { name: "p50", color: "#2e7d32", values: history.map((p) => p.p50) },
    { name: "p99", color: "#c62828", values: history.map((p) => p.p99) },
  ], ms);
}

async function poll() {
  try {
    const response = await fetch("/api/stats", { cache: "no-store" });
    render(await response.json());
  } catch (error) {
    $("health").textContent = "unreachable"; $("health").className = "bad";
  }
  setTimeout(poll, 1000);
}

document.querySelectorAll("button[data-work]").forEach((button) => {
  button.addEventListener("click", async () => {
    $("message").textContent = `started: ${button.textContent}…`;
    const response = await fetch(`/api/work/${button.dataset.work}`, { method: "POST" });
    const body = await response.json();
    $("message").textContent = body.error || `${body.summary} (${body.seconds} s)`;
  });
});
poll();
</script>
"""
