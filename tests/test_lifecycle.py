"""The lifecycle patterns real apps and their tests use: TestClient in any order, two lifespans at once,
failing start-up, apps without lifespan support, and what defer() checks in the handler."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from blockbuster import blockbuster_ctx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from starlette_concurrency import (
    Concurrency,
    ConcurrencyClosed,
    ConcurrencyMiddleware,
    Driver,
    DriverError,
    Outcome,
    ProcessOptions,
    SerializationError,
    Task,
    WrongContext,
    _runtime as runtime_module,
)
from starlette_concurrency._drivers.sync import SyncDriver
from starlette_concurrency._host import HostKind
from starlette_concurrency._runtime import State

from . import helpers
from .asgi import client


def touch(path: Path) -> str:
    path.write_text("ran")
    return path.name


def counting_app(concurrency: Concurrency, lifespans: list[str], tmp_path: Path) -> Starlette:
    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        lifespans.append("start")
        yield
        lifespans.append("stop")

    async def home(request: Request) -> Response:
        value = await concurrency.run(lambda: 21 * 2)
        concurrency.defer(functools.partial(touch, tmp_path / request.query_params.get("name", "home")))
        return PlainTextResponse(str(value))

    return Starlette(
        routes=[Route("/", home)],
        lifespan=app_lifespan,
        middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)],
    )


def test_testclient_patterns_work_in_any_order(tmp_path: Path) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    app = counting_app(concurrency, [], tmp_path)
    with TestClient(app) as http:
        assert http.get("/", params={"name": "a"}).text == "42"
    # After a lifespan the facade is back to not started: a TestClient without `with` still works.
    assert TestClient(app).get("/", params={"name": "b"}).text == "42"
    concurrency.wait_deferred_blocking(timeout=30)
    with TestClient(app) as http:
        assert http.get("/", params={"name": "c"}).text == "42"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "b", "c"]
    concurrency.close()


@pytest.mark.anyio
async def test_defer_alone_after_a_lifespan(tmp_path: Path) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    async with concurrency:
        concurrency.defer(functools.partial(touch, tmp_path / "during"))
    concurrency.defer(functools.partial(touch, tmp_path / "after"))  # no run() first: defer() alone restarts it
    await concurrency.wait_deferred(timeout=30)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["after", "during"]
    await concurrency.aclose()


@pytest.mark.anyio
async def test_asgi_transport_after_a_lifespan(tmp_path: Path) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    app = counting_app(concurrency, [], tmp_path)
    with TestClient(app) as http:
        assert http.get("/").text == "42"
    async with client(app) as http_async:
        assert (await http_async.get("/", params={"name": "async"})).text == "42"
    await concurrency.wait_deferred(timeout=30)
    assert (tmp_path / "async").exists()
    await concurrency.aclose()


def test_two_lifespans_at_once_behave_as_without_the_middleware(tmp_path: Path) -> None:
    concurrency = Concurrency(workers=1, env_file=None)
    lifespans: list[str] = []
    app = counting_app(concurrency, lifespans, tmp_path)
    with TestClient(app) as first:
        with TestClient(app) as second:
            assert lifespans == ["start", "start"]  # the app's own lifespan ran for both
            assert second.get("/", params={"name": "second"}).text == "42"
            assert first.get("/", params={"name": "first"}).text == "42"
        assert first.get("/", params={"name": "again"}).text == "42"  # the inner exit closed nothing
    assert lifespans == ["start", "start", "stop", "stop"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["again", "first", "second"]
    assert helpers.worker_children() == []  # the last exit stopped the workers


def test_a_pool_that_cannot_start_fails_the_testclient_at_enter() -> None:
    concurrency = Concurrency(
        workers=1, options=ProcessOptions(initializer=functools.partial(helpers.fail, "no db")), env_file=None
    )
    app = counting_app(concurrency, [], Path("."))
    with pytest.raises(BaseException, match="no db") as caught, TestClient(app):
        pass  # pragma: no cover - never entered
    assert "(starlette-concurrency could not start its 'process' driver)" in caught.value.__notes__


@pytest.mark.anyio
async def test_an_app_without_lifespan_support_keeps_a_usable_facade(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)

    async def django_like(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        value = await concurrency.run(lambda: 7)
        concurrency.defer(functools.partial(touch, tmp_path / "deferred"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(value).encode()})

    app = ConcurrencyMiddleware(django_like, concurrency)

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:  # pragma: no cover - the app raises first
        raise AssertionError(message)

    with caplog.at_level(logging.WARNING, logger="starlette_concurrency"), pytest.raises(ValueError, match="Django"):
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)  # a server then carries on
    [warning] = caplog.records
    assert "does not support the ASGI lifespan protocol (ValueError: Django can only" in warning.getMessage()
    assert "first use" in warning.getMessage()
    async with client(app) as http:
        assert (await http.get("/")).text == "7"
    await concurrency.wait_deferred(timeout=30)
    assert (tmp_path / "deferred").exists()
    await concurrency.aclose()


class PicklingSync(SyncDriver):
    """The sync driver, declaring that it needs tasks pickled (as the process and dask drivers do)."""

    name = "pickling-sync"
    pickles = True


def test_an_unpicklable_deferral_fails_in_the_handler_and_loses_nothing_else(tmp_path: Path) -> None:
    concurrency = Concurrency(PicklingSync(), env_file=None)
    errors: list[str] = []

    async def endpoint(request: Request) -> Response:
        lock = threading.Lock()
        concurrency.defer(functools.partial(touch, tmp_path / "first"))
        try:
            concurrency.defer(lambda: lock)  # captures a lock: cannot be pickled
        except SerializationError as exc:
            errors.append(str(exc))
        concurrency.defer(functools.partial(touch, tmp_path / "third"))
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)]
    )
    with TestClient(app) as http:
        assert http.get("/").text == "ok"
        concurrency.wait_deferred_blocking(timeout=30)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first", "third"]
    [error] = errors
    assert "task 0" in error
    assert "cannot be pickled" in error


def test_deferred_work_starts_before_the_responses_background_tasks(tmp_path: Path) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    marker = tmp_path / "deferred"
    seen: list[bool] = []

    async def background() -> None:
        # Had the batch waited for the background tasks, this would wait in vain (and fail).
        await helpers.eventually(marker.exists, timeout=30)
        seen.append(True)

    async def endpoint(request: Request) -> Response:
        concurrency.defer(functools.partial(touch, marker))
        return PlainTextResponse("ok", background=BackgroundTask(background))

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)]
    )
    with TestClient(app) as http:
        assert http.get("/").text == "ok"
    assert seen == [True]


class Forgetful(Driver):
    """A custom driver that forgets to store an outcome for its last task."""

    name = "forgetful"

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        for index, task in enumerate(tasks[:-1]):
            outcomes[index] = Outcome(value=task.fn())


@pytest.mark.anyio
async def test_a_driver_that_forgets_an_outcome_gets_a_clear_error() -> None:
    async with Concurrency(Forgetful(), env_file=None) as concurrency:
        with pytest.raises(
            DriverError, match=r"driver 'forgetful' returned from execute\(\) without an outcome for task 1"
        ):
            await concurrency.run([lambda: 1, lambda: 2])


@pytest.mark.anyio
async def test_blocking_calls_on_an_event_loop_are_refused_with_what_to_do() -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    with pytest.raises(WrongContext, match=r"run_blocking\(\) was called on a thread that runs an event loop.*await"):
        concurrency.run_blocking(lambda: 1)
    with pytest.raises(WrongContext, match="wait_deferred"):
        concurrency.wait_deferred_blocking()
    with pytest.raises(WrongContext, match="async with concurrency"):
        concurrency.__enter__()
    # From a worker thread it is fine.
    assert await anyio.to_thread.run_sync(lambda: concurrency.run_blocking([lambda: 1, lambda: 2])) == [1, 2]
    await concurrency.aclose()
    with pytest.raises(ConcurrencyClosed, match=r"closed by aclose\(\): enter it again"):
        await concurrency.run(lambda: 1)


def test_defer_from_a_background_task_follows_its_request(tmp_path: Path) -> None:
    concurrency = Concurrency(driver="sync", env_file=None)

    def later(name: str) -> None:  # a BackgroundTask: it runs after the response, still in the request
        concurrency.defer(functools.partial(touch, tmp_path / name))

    async def endpoint(request: Request) -> Response:
        code = int(request.query_params["code"])
        return PlainTextResponse("ok", status_code=code, background=BackgroundTask(later, f"after-{code}"))

    app = Starlette(
        routes=[Route("/", endpoint)], middleware=[Middleware(ConcurrencyMiddleware, concurrency=concurrency)]
    )
    with TestClient(app) as http:
        assert http.get("/", params={"code": 200}).status_code == 200
        assert http.get("/", params={"code": 500}).status_code == 500
        concurrency.wait_deferred_blocking(timeout=30)
    assert [path.name for path in tmp_path.iterdir()] == ["after-200"]  # the 500's was skipped, as its batch


@pytest.mark.anyio
async def test_one_task_hosting_several_facades_closes_each_of_them() -> None:
    first, second = Concurrency(workers=1, env_file=None), Concurrency(workers=1, env_file=None)
    async with first, second:  # the same task enters both as their host
        assert await first.run(lambda: 1) == 1
        assert await second.run(lambda: 2) == 2
        assert len(helpers.worker_children()) == 2
    assert helpers.worker_children() == []  # each exit closed its own facade's workers
    assert await first.run(lambda: 3) == 3  # and each is back to not started: usable again
    await first.aclose()


# The facade's life, as states (starlette_concurrency/_runtime.py) ----------------------------------


def state_of(concurrency: Concurrency) -> State:
    return concurrency._runtime.state  # a function: each look is a fresh read, for the type checker too


def host_kind(concurrency: Concurrency) -> HostKind | None:
    host = concurrency._runtime.host
    return None if host is None else host.kind


@pytest.mark.anyio
async def test_the_states_follow_the_facades_life() -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    assert state_of(concurrency) is State.NOT_STARTED
    async with concurrency:
        assert state_of(concurrency) is State.SERVING
        assert host_kind(concurrency) is HostKind.LIFESPAN
    assert state_of(concurrency) is State.NOT_STARTED  # the last user left: drained, stopped, lazily usable
    assert await concurrency.run(lambda: 1) == 1
    assert host_kind(concurrency) is HostKind.ADOPTED
    await concurrency.aclose()
    assert state_of(concurrency) is State.CLOSED
    with pytest.raises(ConcurrencyClosed):
        concurrency.defer(lambda: 1)
    async with concurrency:  # entering again reopens it
        assert await concurrency.run(lambda: 2) == 2
    assert state_of(concurrency) is State.NOT_STARTED


class SlowStart(Driver):
    """A driver whose start takes a while, counting its starts and closes."""

    name = "slow-start"

    def __init__(self) -> None:
        self.starts = self.closes = 0

    async def start(self) -> None:
        self.starts += 1
        await anyio.sleep(0.2)

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        for index, task in enumerate(tasks):
            outcomes[index] = Outcome(value=task.fn())

    async def aclose(self) -> None:
        self.closes += 1


@pytest.mark.anyio
async def test_an_interrupted_start_leaves_nothing_half_made() -> None:
    driver = SlowStart()
    concurrency = Concurrency(driver, env_file=None)
    with anyio.move_on_after(0.05):  # the caller gives up while the driver starts
        await concurrency.run(lambda: 1)
    # The host is whole and owned: the next call uses it, and closing stops what was started.
    assert await concurrency.run(lambda: 2) == 2
    await concurrency.aclose()
    assert state_of(concurrency) is State.CLOSED
    assert concurrency._runtime.host is None
    assert driver.closes >= 1


@pytest.mark.anyio
async def test_deferring_from_another_loop_never_blocks_it_and_counts_each_task_once(tmp_path: Path) -> None:
    # `with concurrency:` hosts the facade on its own thread; this loop defers to it. Nothing here may wait
    # for that thread (blockbuster fails any blocking call on this loop), and the counts never go below zero.
    concurrency = Concurrency(driver="sync", env_file=None)
    await anyio.to_thread.run_sync(concurrency.__enter__)
    seen: list[int] = []
    try:
        with blockbuster_ctx(["starlette_concurrency"]):
            for index in range(200):
                concurrency.defer(functools.partial(touch, tmp_path / f"t{index}"))
                seen.append(concurrency.stats().deferred_pending)
                if index % 20 == 0:
                    await anyio.lowlevel.checkpoint()
            await concurrency.wait_deferred(timeout=30)
        assert min(seen) >= 0
        assert concurrency.stats().deferred_pending == 0
        assert len(list(tmp_path.iterdir())) == 200
    finally:
        await anyio.to_thread.run_sync(concurrency.__exit__, None, None, None)


@pytest.mark.anyio
async def test_the_first_call_of_a_lazy_facade_never_blocks_the_loop() -> None:
    concurrency = Concurrency(driver="sync", env_file=None)
    with blockbuster_ctx(["starlette_concurrency"]):
        assert await concurrency.run([lambda: 1, lambda: 2]) == [1, 2]
        concurrency.defer(lambda: 3)
        await concurrency.wait_deferred(timeout=30)
    await concurrency.aclose()


def test_a_host_nobody_entered_stops_when_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "IDLE_TIMEOUT", 0.3)
    concurrency = Concurrency(workers=1, env_file=None)
    assert concurrency.run_blocking(helpers.pid) in helpers.worker_children()  # its own thread hosts it
    deadline = time.monotonic() + 30
    while state_of(concurrency) is not State.NOT_STARTED or helpers.worker_children():
        assert time.monotonic() < deadline, "the unused host kept its workers"
        time.sleep(0.05)
    assert concurrency.run_blocking(lambda: 5) == 5  # and starts again when needed
    concurrency.close()


@pytest.mark.anyio
async def test_defer_once_the_drain_is_over_is_refused_not_lost(tmp_path: Path) -> None:
    # A thread (a scheduler, a metrics loop) deferring while the process shuts down: after the drain it
    # gets ConcurrencyClosed; it never starts a pool that the process's exit would then kill.
    concurrency = Concurrency(driver="sync", env_file=None)
    runtime = concurrency._runtime
    async with concurrency:
        runtime.exiting = True  # what a SIGTERM sets (the real signal: test_sync.py, test_uvicorn.py)
        concurrency.defer(functools.partial(touch, tmp_path / "joined"))
    assert (tmp_path / "joined").exists()
    assert state_of(concurrency) is State.CLOSED
    with pytest.raises(ConcurrencyClosed, match="shutting down"):
        await anyio.to_thread.run_sync(concurrency.defer, functools.partial(touch, tmp_path / "late"))
    assert runtime.host is None
    assert not (tmp_path / "late").exists()
