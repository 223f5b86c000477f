"""The live half of the example dashboard: the pool's state, rendered at once then polled; buttons that start work.

The server renders the page with the pool's state of the moment (counters, health, the workers
table), so that it shows at once; a small inline script then polls ``/api/stats`` once a second and
draws the charts on a canvas. The workers table is rendered by the server only, for the page and for
each poll. Below it, the task log: what the buttons' tasks logged in the workers, which the process
driver forwards to the server's logging with the task's request and worker (`TaskLog`, a handler on
the ``examples.activity`` logger). With a journal (``CONCURRENCY_JOURNAL=deferred.db``), the page also
shows the journal's counters: entries pending and dead, and those this server replayed after a crash.
No build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

import collections
import functools
import html
import logging
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

from starlette_concurrency import Concurrency, ProcessOptions
from starlette_concurrency.metrics import health

from . import activity
from .work import count_primes

__all__ = ["ACTIVITY_DIR", "TASK_LOG", "page", "routes", "snapshot", "worker_options"]

ACTIVITY_DIR = Path(
    os.environ.get("EXAMPLE_ACTIVITY_DIR")
    or Path(tempfile.gettempdir(), f"starlette-concurrency-example-{os.getpid()}")
)

# The counter cards: label, key in the stats.
CARDS = [
    ("workers", "workers"),
    ("busy", "busy"),
    ("queued", "queued"),
    ("deferred pending", "deferred_pending"),
    ("completed", "tasks_completed"),
    ("failed", "tasks_failed"),
    ("crashed", "tasks_crashed"),
    ("timed out", "tasks_timed_out"),
    ("restarts", "worker_restarts"),
    ("p50", "task_time_p50"),
    ("p99", "task_time_p99"),
]

# The journal's cards, shown when the facade has one.
JOURNAL_CARDS = [
    ("journal pending", "journal_pending"),
    ("journal dead", "journal_dead"),
    ("replayed", "replayed"),
]


class TaskLog(logging.Handler):
    """The last records tasks logged (forwarded from the workers, each with its task, worker and request)."""

    def __init__(self, size: int = 40) -> None:
        super().__init__(logging.INFO)
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "task"):  # a task's record; the server's own go their usual way
            self.records.append(record)

    def rows(self) -> str:
        """The task log's rows, newest first, escaped."""
        if not self.records:
            return '<tr><td colspan="5"><i>nothing logged by a task yet: press a button</i></td></tr>'
        rows = []
        for record in reversed(self.records):
            request = " ".join(filter(None, [getattr(record, "method", None), getattr(record, "path", None)]))
            message = record.getMessage() + (f" — {record.exc_text.splitlines()[-1]}" if record.exc_text else "")
            when = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
            cells = [when, record.levelname, request or "-", f"pid {record.process}", message]
            rows.append(
                f'<tr class="{record.levelname.lower()}">'
                + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                + "</tr>"
            )
        return "".join(rows)


TASK_LOG = TaskLog()
logging.getLogger("examples.activity").addHandler(TASK_LOG)
logging.getLogger("examples.activity").setLevel(logging.INFO)  # workers send INFO and above of it


def worker_options() -> ProcessOptions:
    """The process driver's options: each worker notes that it started, so that every worker shows, replacements too."""
    ACTIVITY_DIR.mkdir(parents=True, exist_ok=True)
    return ProcessOptions(initializer=functools.partial(activity.note_start, str(ACTIVITY_DIR)))


def _traced(label: str, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return functools.partial(activity.traced, str(ACTIVITY_DIR), label, fn, *args)


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.{2 if seconds < 0.01 else 0}f} ms"


def _workers_rows(now: float, stats: dict[str, Any], notes: list[dict[str, Any]]) -> str:
    """The workers table's rows: one per live worker, then a line that agrees with the counters."""
    rows = []
    for note in notes:
        started = note.get("started")
        if note.get("task"):
            doing, when = f"running {note['task']}", f"{now - note['since']:.1f} s"
        elif note.get("last"):
            doing, when = f"idle (last: {note['last']}, {note['last_outcome']})", _ms(note["last_seconds"])
        else:
            doing, when = "idle (no task from the buttons yet)", "-"
        cells = [note["pid"], "-" if started is None else f"{max(0.0, now - started):.0f} s ago", doing, when]
        cells.append(note.get("done", 0))
        row = "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells)
        rows.append(f'<tr data-pid="{int(note["pid"])}">{row}</tr>')
    # Only the buttons' tasks say which worker runs them; the counters count every task.
    finished = stats["tasks_completed"] + stats["tasks_failed"] + stats["tasks_crashed"] + stats["tasks_timed_out"]
    if finished == 0 and stats["busy"] == 0:
        summary = "no task has run yet"
    else:
        summary = (
            f"{finished} task(s) finished, {stats['busy']} running in all (the counters above);"
            " a worker's row shows the buttons' tasks only"
        )
    rows.append(f'<tr><td colspan="5"><i>{summary}</i></td></tr>')
    return "".join(rows)


def _waiting(stats: dict[str, Any]) -> str:
    # Deferred work uses at most workers - 1 workers, so that a run() never waits behind it: say so
    # when deferred tasks wait while a worker is idle.
    if not (stats["deferred_pending"] > 0 and stats["queued"] > 0 and stats["busy"] < stats["workers"]):
        return ""
    return (
        f"{stats['queued']} deferred task(s) waiting while a worker is idle: deferred work uses at most"
        f" {max(1, stats['workers'] - 1)} of the {stats['workers']} workers,"
        " so that a run() call never waits behind it."
    )


def snapshot(concurrency: Concurrency) -> dict[str, Any]:
    """Return the pool's state now, as ``/api/stats`` sends it: stats, health, and the workers table rendered."""
    now, stats = time.time(), concurrency.stats()
    ok, detail = health(concurrency)
    numbers = {
        "driver": stats.driver,
        "workers": stats.workers,
        "busy": stats.busy,
        "queued": stats.queued,
        "deferred_pending": stats.deferred_pending,
        "tasks_completed": stats.tasks_completed,
        "tasks_failed": stats.tasks_failed,
        "tasks_crashed": stats.tasks_crashed,
        "tasks_timed_out": stats.tasks_timed_out,
        "worker_restarts": stats.worker_restarts,
        "task_time_p50": _finite(stats.task_time_p50),
        "task_time_p99": _finite(stats.task_time_p99),
        "journal_pending": stats.journal_pending,
        "journal_dead": stats.journal_dead,
        "replayed": stats.replayed,
    }
    notes = activity.read_notes(ACTIVITY_DIR)
    return {
        "time": now,
        "journal": concurrency.settings.journal,
        "server_pid": os.getpid(),
        "stats": numbers,
        "healthy": ok,
        "problems": [problem for driver in detail["drivers"].values() for problem in driver["problems"]],
        "activity": notes,
        "workers_html": _workers_rows(now, numbers, notes),
        "log_html": TASK_LOG.rows(),
        "waiting": _waiting(numbers),
    }


def routes(concurrency: Concurrency) -> list[Route]:
    """The live dashboard's endpoints, on the app's facade."""
    ACTIVITY_DIR.mkdir(parents=True, exist_ok=True)

    async def stats(request: Request) -> Response:
        return JSONResponse(snapshot(concurrency))

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


_STYLE = """<style>
  .cards { display: flex; flex-wrap: wrap; gap: 8px; font-family: sans-serif; }
  .card { border: 1px solid #ccc; border-radius: 6px; padding: 6px 12px; min-width: 90px; }
  .card b { display: block; font-size: 1.6em; }
  .ok { color: #070; } .bad { color: #b00; }
  canvas { border: 1px solid #ccc; margin: 4px 8px 4px 0; }
  td, th { padding: 2px 8px; text-align: left; }
  tr.warning td, tr.error td { color: #b00; }
</style>"""

_BUTTONS = """<p>
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
</div>"""


def page(data: dict[str, Any]) -> str:
    """Render the live dashboard with `data` (a `snapshot`): it shows at once, then its script polls for more."""
    stats, ok = data["stats"], data["healthy"]
    cards = "\n".join(
        f'  <div class="card">{label}<b id="{key}">'
        f"{html.escape(_ms(stats[key]) if key.startswith('task_time') else str(stats[key]))}</b></div>"
        for label, key in CARDS
    )
    updated = time.strftime("%H:%M:%S", time.localtime(data["time"]))
    if data["journal"] is None:
        journal = (
            '<p id="journal-none">No journal: a crash loses the deferred work not yet run. Serve with '
            "<code>CONCURRENCY_JOURNAL=deferred.db</code> to keep it, and see its counters here.</p>"
        )
    else:
        journal_cards = "\n".join(
            f'  <div class="card">{label}<b id="{key}">{stats[key]}</b></div>' for label, key in JOURNAL_CARDS
        )
        journal = (
            f"<p>Journal <b>{html.escape(data['journal'])}</b>: deferred work is written there before it starts "
            f'and replayed after a crash.</p>\n<div class="cards" id="journal">\n{journal_cards}\n</div>'
        )
    return f"""
<h2>The pool, live</h2>
{_STYLE}
<p>Driver <b id="driver">{html.escape(stats["driver"])}</b>, health <b id="health" class="{"ok" if ok else "bad"}">\
{"ok" if ok else "stuck"}</b> <span id="problems">{html.escape("; ".join(data["problems"]))}</span>,
updated <span id="updated">{updated}</span> (poll <span id="polls">0</span>).</p>
<p id="waiting">{html.escape(data["waiting"])}</p>
<div class="cards">
{cards}
</div>
{journal}
{_BUTTONS}
<h3>Workers</h3>
<table><thead><tr><th>pid</th><th>started</th><th>doing</th><th>for / took</th><th>tasks done</th></tr></thead>
<tbody id="activity">{data["workers_html"]}</tbody></table>
<h3>Task log</h3>
<p>What the buttons' tasks logged in the workers, through the server's logging (newest first).</p>
<table><thead><tr><th>time</th><th>level</th><th>request</th><th>worker</th><th>message</th></tr></thead>
<tbody id="log">{data["log_html"]}</tbody></table>
{_SCRIPT}"""


_SCRIPT = """<script>
"use strict";
const WINDOW = 300;  // seconds of history in the charts
const history = [];  // {t, finished, p50, p99}
let polls = 0;
const $ = (id) => document.getElementById(id);
const ms = (s) => (s === null ? "-" : (s * 1000).toFixed(s < 0.01 ? 2 : 0) + " ms");
const finishedOf = (s) => s.tasks_completed + s.tasks_failed + s.tasks_crashed + s.tasks_timed_out;

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
  for (const key of ["journal_pending", "journal_dead", "replayed"]) { if ($(key)) $(key).textContent = s[key]; }
  $("task_time_p50").textContent = ms(s.task_time_p50);
  $("task_time_p99").textContent = ms(s.task_time_p99);
  $("driver").textContent = s.driver;
  $("health").textContent = data.healthy ? "ok" : "stuck";
  $("health").className = data.healthy ? "ok" : "bad";
  $("problems").textContent = data.problems.join("; ");
  $("waiting").textContent = data.waiting;
  $("updated").textContent = new Date(data.time * 1000).toLocaleTimeString();
  $("polls").textContent = ++polls;
  $("activity").innerHTML = data.workers_html;  // rendered by the server, escaped there
  $("log").innerHTML = data.log_html;
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
</script>"""
