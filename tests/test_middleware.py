"""ConcurrencyMiddleware and defer() in-process (httpx's ASGI transport), on asyncio and trio."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import litestar
import pytest
from litestar.handlers import HTTPRouteHandler
from litestar.middleware import DefineMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from starlette_concurrency import Concurrency, ConcurrencyMiddleware, DeferralRejected, ProcessOptions

from . import apps, helpers
from .asgi import LifespanFailed, client, lifespan, read_marker

pytestmark = pytest.mark.anyio


@pytest.fixture
def markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEST_MARKERS", str(tmp_path))  # before the workers start: they inherit it
    return tmp_path


async def test_deferred_work_runs_after_the_response_in_the_background(markers: Path) -> None:
    # Three workers: deferred work may hold all but one (kept for run()), and the batch of two runs at once.
    app = apps.make_app(Concurrency(workers=3, env_file=None))
    async with lifespan(app), client(app) as http:
        response = await http.get("/defer", params={"seconds": 0.5})
        assert response.text == "deferred"
        assert list(markers.iterdir()) == []
        await helpers.eventually(lambda: len(list(markers.iterdir())) == 2)
    a, b = read_marker(markers, "slow-a"), read_marker(markers, "slow-b")
    assert a["pid"] != b["pid"]


async def test_status_and_exceptions_decide_what_runs(markers: Path) -> None:
    app = apps.make_app(Concurrency(workers=2, env_file=None))
    async with lifespan(app), client(app) as http:
        assert (await http.get("/status/201")).status_code == 201
        assert (await http.get("/status/400")).status_code == 400
        assert (await http.get("/error")).status_code == 500
    # Leaving the lifespan drained everything accepted.
    assert sorted(path.stem for path in markers.iterdir()) == ["always-201", "always-400", "always-error", "normal-201"]


async def test_the_app_lifespan_still_runs_and_shutdown_waits_for_the_drain(markers: Path) -> None:
    events: list[str] = []
    concurrency = Concurrency(workers=2, env_file=None)

    @asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    async def endpoint(request: Request) -> Response:
        concurrency.defer(functools.partial(apps.mark, "late", 0.5))
        return PlainTextResponse("hello")

    app = Starlette(
        routes=[Route("/", endpoint)],
        lifespan=app_lifespan,
        middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)],
    )
    async with lifespan(app) as sent, client(app) as http:
        assert (await http.get("/")).text == "hello"
    assert events == ["startup", "shutdown"]
    assert [message["type"] for message in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert (markers / "late.json").exists(), "shutdown completed before the deferred task ran"


async def test_a_worker_pool_that_cannot_start_fails_the_startup() -> None:
    app = ConcurrencyMiddleware(
        Starlette(),
        Concurrency(
            workers=1, options=ProcessOptions(initializer=functools.partial(helpers.fail, "no db")), env_file=None
        ),
    )
    with pytest.raises(LifespanFailed, match="no db"):
        async with lifespan(app):
            pass  # pragma: no cover


async def test_work_still_running_after_the_drain_timeout_is_logged_as_abandoned(
    markers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = apps.make_app(Concurrency(workers=2, drain_timeout=0.5, env_file=None))
    with caplog.at_level(logging.ERROR, logger="starlette_concurrency"):
        async with lifespan(app), client(app) as http:
            await http.get("/defer", params={"seconds": 30})
    abandoned = sorted(record.getMessage().split(";")[0] for record in caplog.records)
    assert abandoned == [
        f"deferred task {i} (partial(mark)) abandoned, stopped unfinished (it may have done part of its work): "
        "the 0.5 s drain timeout ran out"
        for i in (0, 1)
    ]
    assert all("raise drain_timeout" in record.getMessage() for record in caplog.records)  # says what to do
    assert [getattr(r, "task", None) for r in sorted(caplog.records, key=lambda r: r.getMessage())] == [
        "task 0 (partial(mark))",
        "task 1 (partial(mark))",
    ]
    assert {getattr(record, "path", None) for record in caplog.records} == {"/defer"}
    assert list(markers.iterdir()) == []


def deferring_app(concurrency: Concurrency, seconds: list[float]) -> Starlette:
    """`/` defers one `mark` task per entry of `seconds` (task i sleeps seconds[i])."""

    async def defer(request: Request) -> Response:
        concurrency.defer([functools.partial(apps.mark, f"t{i}", s) for i, s in enumerate(seconds)])
        return PlainTextResponse("deferred")

    return Starlette(
        routes=[Route("/", defer)], middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)]
    )


@pytest.mark.parametrize("driver_name", ["process", "dask"])
async def test_deferred_tasks_run_their_state_at_defer_time_and_never_sink_each_other(
    driver_name: str, markers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Pickled once, when defer() accepts them: what the handler does to the captured state afterwards (here,
    # it puts a lock in, which would not pickle) changes nothing, for that task nor for the request's others.
    # The second defer() call's tasks are labelled apart from the first's (both have a "task 0").
    concurrency = Concurrency(driver_name, workers=2, env_file=None)

    async def handler(request: Request) -> Response:
        state: dict[str, object] = {"value": "at defer()"}
        concurrency.defer([functools.partial(apps.mark_state, "first", state)])
        concurrency.defer([functools.partial(helpers.fail, "second call")])
        state["value"] = threading.Lock()
        return PlainTextResponse("deferred")

    app = Starlette(
        routes=[Route("/", handler)], middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)]
    )
    with caplog.at_level(logging.ERROR, logger="starlette_concurrency"):
        async with lifespan(app), client(app) as http:
            assert (await http.get("/")).text == "deferred"
    assert json.loads((markers / "first.json").read_text()) == "at defer()"
    assert [record.getMessage() for record in caplog.records] == [
        "deferred task 0 (partial(fail)) of defer() #2 failed"
    ]


async def test_the_drain_log_tells_tasks_never_started_from_tasks_stopped_while_running(
    markers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two workers take one 30 s task each (a task of unknown length is never pipelined behind another):
    # the other three never reach a worker. Only the first two may have done anything.
    app = deferring_app(Concurrency(workers=2, drain_timeout=0.5, env_file=None), [30] * 5)
    with caplog.at_level(logging.ERROR, logger="starlette_concurrency"):
        async with lifespan(app), client(app) as http:
            await http.get("/")
    fates = sorted(record.getMessage().split(";")[0].split(", ", 1)[1] for record in caplog.records)
    assert fates == [
        "never started: the 0.5 s drain timeout ran out",
        "never started: the 0.5 s drain timeout ran out",
        "never started: the 0.5 s drain timeout ran out",
        "stopped unfinished (it may have done part of its work): the 0.5 s drain timeout ran out",
        "stopped unfinished (it may have done part of its work): the 0.5 s drain timeout ran out",
    ]
    assert [getattr(record, "under_way", None) for record in caplog.records].count(True) == 2


async def test_a_task_that_ends_within_its_cancel_grace_is_not_logged_abandoned(
    markers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The drain runs out 0.1 s in; the task ends 0.5 s in, within the 10 s its worker is given to answer
    # before it is killed. It ran: the log must not say it was abandoned (an operator would run it again).
    concurrency = Concurrency(workers=1, drain_timeout=0.1, options=ProcessOptions(cancel_grace=10), env_file=None)
    app = deferring_app(concurrency, [0.5])
    with caplog.at_level(logging.ERROR, logger="starlette_concurrency"):
        async with lifespan(app), client(app) as http:
            await http.get("/")
            await anyio.sleep(0.05)  # let it reach the worker
    assert (markers / "t0.json").exists()
    assert [record.getMessage() for record in caplog.records] == []


async def test_the_drain_is_logged_when_it_begins_and_ends(markers: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = apps.make_app(Concurrency(workers=2, drain_timeout=0.5, env_file=None))
    with caplog.at_level(logging.INFO, logger="starlette_concurrency"):
        async with lifespan(app), client(app) as http:
            await http.get("/defer", params={"seconds": 30})
    # Work pending at shutdown is worth a WARNING (default logging shows it); the end is INFO.
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert "draining 2 deferred task(s), for up to 0.5 s" in warnings
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    finished = [message for message in messages if message.startswith("drain finished in")]
    assert len(finished) == 1
    assert finished[0].endswith("; 2 deferred task(s) abandoned")


async def test_deferred_work_that_overruns_the_timeout_is_stopped_and_logged(
    markers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = apps.make_app(Concurrency(workers=2, timeout=0.3, env_file=None))
    with caplog.at_level(logging.ERROR, logger="starlette_concurrency"):
        async with lifespan(app), client(app) as http:
            await http.get("/defer", params={"seconds": 5})
            await helpers.eventually(lambda: len(caplog.records) == 2)
    # Deferred work may use workers - 1 = 1 worker: task 0 ran and was stopped, task 1 waited its turn.
    assert sorted(record.getMessage().split(";")[0] for record in caplog.records) == [
        "deferred task 0 (partial(mark)) timed out after 0.3 s and was stopped",
        "deferred task 1 (partial(mark)) timed out after 0.3 s before it started",
    ]
    assert list(markers.iterdir()) == []


async def test_failures_are_logged_with_the_task_key_and_never_reach_the_client(
    markers: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = apps.make_app(Concurrency(workers=2, env_file=None))
    with caplog.at_level(logging.ERROR, logger="starlette_concurrency"):
        async with lifespan(app), client(app) as http:
            response = await http.get("/failing")
            assert (response.status_code, response.text) == (200, "ok")
    assert (markers / "sibling.json").exists()
    [record] = caplog.records
    assert record.getMessage() == "deferred task 'doomed' (partial(explode)) failed"
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "deferred failure"


async def test_without_a_lifespan_deferred_work_runs_and_wait_deferred_waits_for_it(markers: Path) -> None:
    concurrency = Concurrency(workers=1, env_file=None)
    app = apps.make_app(concurrency)
    async with client(app) as http:  # no lifespan: the pool starts lazily, on the facade's own loop
        assert (await http.get("/defer", params={"seconds": 0.5})).text == "deferred"
    await concurrency.wait_deferred(timeout=60)
    assert {path.name for path in markers.iterdir()} == {"slow-a.json", "slow-b.json"}
    await concurrency.aclose()


async def test_the_pending_bound_rejects_new_deferrals_clearly(markers: Path) -> None:
    concurrency = Concurrency(workers=1, max_pending_deferred=3, env_file=None)
    outcomes: list[str] = []

    async def endpoint(request: Request) -> Response:
        try:
            concurrency.defer([functools.partial(apps.mark, f"{request.query_params['n']}-{i}", 0.3) for i in range(2)])
        except DeferralRejected as exc:
            outcomes.append(str(exc))
            return PlainTextResponse("busy", status_code=503)
        outcomes.append("accepted")
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)]
    )
    async with lifespan(app), client(app) as http:
        assert (await http.get("/", params={"n": "first"})).status_code == 200
        assert (await http.get("/", params={"n": "second"})).status_code == 503
    assert outcomes == [
        "accepted",
        "defer() of 2 task(s) refused: 2 deferred task(s) are already pending and max_pending_deferred is 3; "
        "run the work inline, retry later or answer 503",
    ]
    # Nothing accepted was lost, nothing rejected ran.
    assert sorted(path.stem for path in markers.iterdir()) == ["first-0", "first-1"]


async def test_defer_outside_a_request_starts_the_facade_lazily(tmp_path: Path) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    marker = tmp_path / "ran"
    concurrency.defer(functools.partial(helpers.sleep_then_touch, marker, 0))
    await concurrency.wait_deferred(timeout=30)
    assert marker.exists()
    with pytest.raises(TypeError, match=r"tasks\[0\] is not callable"):
        concurrency.defer([42])  # type: ignore[list-item]
    await concurrency.aclose()


async def test_websockets_and_other_scopes_pass_through() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = ConcurrencyMiddleware(inner, Concurrency(driver="sync", env_file=None))

    async def receive() -> Message:  # pragma: no cover - never called
        raise AssertionError

    async def send(message: Message) -> None:  # pragma: no cover - never called
        raise AssertionError

    await middleware({"type": "websocket"}, receive, send)
    assert seen == ["websocket"]


async def test_websocket_endpoints_work_behind_the_middleware() -> None:
    app = apps.make_app(Concurrency(driver="sync", env_file=None))
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "ping"},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    outgoing: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        outgoing.append(message)

    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b"", "headers": [], "scheme": "ws"}
    await app(scope, receive, send)
    assert [message["type"] for message in outgoing] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert outgoing[1]["text"] == "ping"


async def test_concurrent_requests_keep_their_batches_apart(markers: Path) -> None:
    app = apps.make_app(Concurrency(workers=2, env_file=None))
    async with lifespan(app), client(app) as http, anyio.create_task_group() as tg:
        for code in (200, 404, 202, 418):
            tg.start_soon(http.get, f"/status/{code}")
    assert sorted(path.stem for path in markers.iterdir()) == [
        "always-200",
        "always-202",
        "always-404",
        "always-418",
        "normal-200",
        "normal-202",
    ]


async def test_the_fastapi_example_runs_and_defers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = tmp_path / "metrics.log"
    monkeypatch.setenv("EXAMPLE_METRICS_LOG", str(metrics))  # read by the workers, which start below
    from examples import fastapi_app

    async with lifespan(fastapi_app.app), client(fastapi_app.app) as http:
        body = (await http.get("/")).json()
    assert body["users"]["count"] == sum(map(ord, "users")) * 7
    assert body["primes"]["count"] == 9592
    assert {body["users"]["pid"], body["primes"]["pid"]}.isdisjoint({os.getpid()})
    [reported] = [json.loads(line) for line in metrics.read_text().splitlines()]  # drained at shutdown
    assert reported["metric"] == "fastapi.dashboard"


async def test_a_client_that_leaves_stops_its_run_call_on_any_event_loop(tmp_path: Path) -> None:
    # The uvicorn tests cover asyncio under a real server; this one drives the middleware by hand, so
    # that trio's path (a watcher task from the start) is covered as well as asyncio's (a timer first).
    concurrency = Concurrency(workers=1, env_file=None)
    marker = tmp_path / "ran"

    async def endpoint(request: Request) -> Response:
        await concurrency.run(functools.partial(helpers.sleep_then_touch, marker, 20))
        return PlainTextResponse("finished")  # pragma: no cover - the client left before

    app = ConcurrencyMiddleware(Starlette(routes=[Route("/", endpoint)]), concurrency=concurrency)
    pending: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await anyio.sleep(0.5)  # the client leaves half a second in
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
    }
    try:
        with anyio.fail_after(60):
            await app(scope, receive, send)  # returns once the call was stopped, not after 20 s
        assert not marker.exists()  # the task was stopped: it never touched its marker
        # Starlette's error middleware answers the stopped call with a 500, to a client that is gone.
        assert [message.get("status") for message in sent if message["type"] == "http.response.start"] == [500]
    finally:
        await concurrency.aclose()
    assert helpers.worker_children() == []


def _http_scope(method: str = "GET", path: str = "/") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
    }


async def check_briefly() -> bool:
    await anyio.sleep(0.1)  # an async task: the sync driver awaits it on this loop, beside the watch
    return False


def virtual_clock() -> dict[str, object]:
    from trio.testing import MockClock

    return {"clock": MockClock(autojump_threshold=0)}  # time jumps ahead whenever every task waits


@pytest.mark.parametrize(("backend", "options"), [("asyncio", dict), ("trio", virtual_clock)], ids=["asyncio", "trio"])
def test_a_finished_run_never_waits_for_the_rest_of_an_upload(
    backend: str, options: Callable[[], dict[str, object]]
) -> None:
    anyio.run(a_finished_run_never_waits_for_the_rest_of_an_upload, backend=backend, backend_options=options())


async def a_finished_run_never_waits_for_the_rest_of_an_upload() -> None:
    # An endpoint checks with a 100 ms task, then rejects an upload it never reads. The client's next
    # body part never comes: an answer that waited for it (or for a while) would come late or never.
    concurrency = Concurrency(driver="sync", env_file=None)

    async def endpoint(request: Request) -> Response:
        accepted = await concurrency.run(check_briefly)
        return PlainTextResponse("accepted" if accepted else "too large", status_code=413)

    app = ConcurrencyMiddleware(Starlette(routes=[Route("/", endpoint, methods=["POST"])]), concurrency=concurrency)
    parts: list[Message] = [{"type": "http.request", "body": b"x" * 1000, "more_body": True}]

    async def receive() -> Message:
        if parts:
            return parts.pop(0)
        await anyio.sleep_forever()  # the rest of the upload: slow, never here in time
        raise AssertionError  # pragma: no cover

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    began = anyio.current_time()
    with anyio.fail_after(30):
        await app(_http_scope("POST"), receive, send)
    # On trio the clock is virtual (it jumps whenever every task waits): a watch that held the answer
    # back to read on would show here as a second or more, deterministically.
    assert anyio.current_time() - began < 0.5
    assert [message["status"] for message in sent if message["type"] == "http.response.start"] == [413]
    await concurrency.aclose()


async def test_serving_requests_without_a_lifespan_warns_once_how_to_wire_it(caplog: pytest.LogCaptureFixture) -> None:
    # Litestar's `middleware=[...]`, a mounted sub-app: the middleware never sees the lifespan.
    concurrency = Concurrency(driver="sync", env_file=None)

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse(str(await concurrency.run(lambda: 1)))

    app = ConcurrencyMiddleware(Starlette(routes=[Route("/", endpoint)]), concurrency=concurrency)
    with caplog.at_level(logging.WARNING, logger="starlette_concurrency"):
        async with client(app) as http:
            assert (await http.get("/")).text == "1"
            assert (await http.get("/")).text == "1"
    [warning] = [record.getMessage() for record in caplog.records]
    assert "never received the ASGI lifespan" in warning
    assert "Litestar" in warning
    await concurrency.aclose()


def _litestar_routes(concurrency: Concurrency) -> list[HTTPRouteHandler]:
    """Two routes that call run() and defer() (Litestar makes a middleware stack per route)."""

    @litestar.get("/run")
    async def run() -> str:
        return str(await concurrency.run(lambda: 1))

    @litestar.get("/defer")
    async def defer() -> str:
        concurrency.defer(lambda: None)
        return "deferred"

    return [run, defer]


async def test_litestars_middleware_list_is_warned_about_once_not_once_per_route(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Litestar builds one instance of each of its `middleware=[...]` per route handler (and method):
    # the warning is the facade's, once, however many instances serve requests.
    concurrency = Concurrency(driver="sync", env_file=None)
    app = litestar.Litestar(
        route_handlers=_litestar_routes(concurrency),
        # Litestar types its middleware's scopes more narrowly than Starlette does: it objects to this wiring too.
        middleware=[DefineMiddleware(ConcurrencyMiddleware, concurrency=concurrency)],  # type: ignore[arg-type]
        logging_config=None,  # Litestar's own would replace the root logger's handlers, caplog's among them
    )
    with caplog.at_level(logging.WARNING, logger="starlette_concurrency"):
        async with client(app) as http:
            for _ in range(2):
                assert (await http.get("/run")).text == "1"
                assert (await http.get("/defer")).text == "deferred"
    [warning] = [record.getMessage() for record in caplog.records]
    assert "never received the ASGI lifespan" in warning
    assert "Litestar" in warning
    await concurrency.aclose()


async def test_a_facade_the_apps_own_lifespan_entered_is_not_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    # The warning's own advice for a middleware that cannot see the lifespan: enter the facade in the app's
    # lifespan (here Litestar's `lifespan=[concurrency]`). Followed, it is not given again.
    concurrency = Concurrency(driver="sync", env_file=None)
    app = litestar.Litestar(
        route_handlers=_litestar_routes(concurrency),
        middleware=[DefineMiddleware(ConcurrencyMiddleware, concurrency=concurrency)],  # type: ignore[arg-type]
        lifespan=[concurrency],
        logging_config=None,
    )
    with caplog.at_level(logging.WARNING, logger="starlette_concurrency"):
        async with lifespan(app), client(app) as http:
            assert concurrency.stats().workers == 1  # the app's lifespan started the pool
            assert (await http.get("/run")).text == "1"
            assert (await http.get("/defer")).text == "deferred"
            await concurrency.wait_deferred(timeout=30)  # else the drain says, at WARNING, that it has work
    assert [record.getMessage() for record in caplog.records] == []


async def test_a_middleware_that_saw_the_lifespan_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    app = ConcurrencyMiddleware(Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))]), concurrency)
    with caplog.at_level(logging.WARNING, logger="starlette_concurrency"):
        async with lifespan(app), client(app) as http:
            assert (await http.get("/")).text == "ok"
    assert [record.getMessage() for record in caplog.records] == []


async def test_a_lifespan_that_raises_is_not_called_unsupported(caplog: pytest.LogCaptureFixture) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)

    @asynccontextmanager
    async def broken(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield  # pragma: no cover

    app = ConcurrencyMiddleware(Starlette(lifespan=broken), concurrency=concurrency)
    with (
        caplog.at_level(logging.WARNING, logger="starlette_concurrency"),
        pytest.raises(LifespanFailed, match="no data"),
    ):
        async with lifespan(app):
            pass  # pragma: no cover - never entered
    assert not any("does not support" in record.getMessage() for record in caplog.records)
    assert concurrency.stats().workers == 0  # the workers never started: the app's startup failed first


async def test_the_workers_start_after_the_apps_own_startup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the app's startup puts in the environment (load_dotenv(), a secret) is there in every worker.
    monkeypatch.delenv("APP_SECRET", raising=False)
    concurrency = Concurrency(workers=2, env_file=None)

    @asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        os.environ["APP_SECRET"] = "s3cret"
        try:
            yield
        finally:
            del os.environ["APP_SECRET"]

    app = ConcurrencyMiddleware(Starlette(lifespan=app_lifespan), concurrency=concurrency)
    async with lifespan(app):
        assert concurrency.stats().workers == 2  # started during the startup, after the app's part of it
        seen = await concurrency.run([functools.partial(os.environ.get, "APP_SECRET")] * 2)
    assert seen == ["s3cret", "s3cret"]


async def test_new_requests_get_a_503_once_the_process_is_shutting_down() -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    app = ConcurrencyMiddleware(Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))]), concurrency)
    async with client(app) as http:
        assert (await http.get("/")).status_code == 200
        concurrency._runtime.exiting = True  # what a SIGTERM sets (the real signal: tests/test_uvicorn.py)
        response = await http.get("/")
    assert response.status_code == 503
    assert response.headers["connection"] == "close"


async def test_defer_in_a_request_no_middleware_wraps_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    # Without the middleware, defer() in a handler runs its tasks at once, even for a failing request:
    # say so, once, naming the request.
    concurrency = Concurrency("sync", env_file=None)
    ran: list[str] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        concurrency.defer(lambda: ran.append(request.url.path))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/signup", endpoint, methods=["POST"]), Route("/other", endpoint)])
    async with concurrency, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        with caplog.at_level(logging.WARNING, logger="starlette_concurrency"):
            assert (await client.post("/signup")).status_code == 200
            assert (await client.get("/other")).status_code == 200
            concurrency.defer(lambda: ran.append("outside a request"))  # a script's use: no warning
            await concurrency.run(lambda: None)
    warnings = [r.getMessage() for r in caplog.records if "no ConcurrencyMiddleware" in r.getMessage()]
    assert len(warnings) == 1
    assert "while serving POST /signup" in warnings[0]
    assert sorted(ran) == ["/other", "/signup", "outside a request"]


async def test_defer_outside_any_request_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    async with Concurrency("sync", env_file=None) as concurrency:
        with caplog.at_level(logging.WARNING, logger="starlette_concurrency"):
            concurrency.defer(lambda: None)
            await concurrency.run(lambda: None)
    assert not [r for r in caplog.records if "no ConcurrencyMiddleware" in r.getMessage()]
