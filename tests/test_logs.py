"""What tasks log reaches the server's own logging, with the task's attributes (process and fork drivers)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from starlette_concurrency import Concurrency, ConcurrencyMiddleware, ProcessOptions, WorkerCrashed

from . import log_targets as targets

pytestmark = pytest.mark.anyio


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.formatted: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.formatted.append(logging.Formatter("%(levelname)s %(name)s %(message)s").format(record))


@pytest.fixture
def collected() -> Iterator[Collect]:
    handler = Collect()
    logger = logging.getLogger("tests.log_targets")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def concurrency(**options: object) -> Concurrency:
    return Concurrency("process", workers=1, env_file=None, options=ProcessOptions(**options))  # type: ignore[arg-type]


@pytest.fixture(params=["process", "fork"])
def forwarding(request: pytest.FixtureRequest) -> Concurrency:
    """A facade whose tasks' records are forwarded, on each driver that forwards them."""
    return Concurrency(request.param, workers=1, env_file=None)


async def test_a_tasks_records_reach_the_servers_handlers_with_the_tasks_attributes(
    collected: Collect, forwarding: Concurrency
) -> None:
    async with forwarding as facade:
        pid = await facade.run({"first": lambda: targets.warn_and_fail(1)})
    # The debug line is below the logger's INFO: dropped. The others arrived before run() returned.
    assert [(r.name, r.levelname, r.getMessage()) for r in collected.records] == [
        ("tests.log_targets", "WARNING", "hello from task 1"),
        ("tests.log_targets", "ERROR", "task 1 caught"),
    ]
    warning, _error = collected.records
    for record in collected.records:
        assert record.process == pid["first"] == record.worker_pid  # type: ignore[attr-defined]
        assert record.task == "task 'first' (<lambda>)"  # type: ignore[attr-defined]
        assert record.task_key == "first"  # type: ignore[attr-defined]
        assert record.driver == forwarding.driver_name  # type: ignore[attr-defined]
        assert record.funcName == "warn_and_fail"
        assert record.pathname == targets.__file__
    assert warning.order == 1  # type: ignore[attr-defined]  # extra= values that pickle travel
    assert not hasattr(warning, "unpicklable")  # a lock does not: left out, the record still arrives
    assert "ZeroDivisionError: division by zero" in collected.formatted[1]
    assert "1 / 0" in collected.formatted[1]  # the worker's traceback, source line included


async def test_a_worker_follows_the_servers_levels_as_they_change(collected: Collect) -> None:
    async with concurrency() as facade:
        assert await facade.run(lambda: targets.enabled(logging.INFO)) is True
        assert await facade.run(lambda: targets.enabled(logging.DEBUG)) is False  # not even sent
        logging.getLogger("tests.log_targets").setLevel(logging.DEBUG)
        deadline = time.monotonic() + 30
        while not await facade.run(lambda: targets.enabled(logging.DEBUG)):  # told within about a second
            assert time.monotonic() < deadline, "the worker never learnt the new level"
            await anyio.sleep(0.1)
        logging.getLogger("tests.log_targets").setLevel(logging.NOTSET)  # back to the root's WARNING
        deadline = time.monotonic() + 30
        while await facade.run(lambda: targets.enabled(logging.INFO)):
            assert time.monotonic() < deadline, "the worker never learnt the level was unset"
            await anyio.sleep(0.1)


async def test_records_written_before_a_worker_died_arrive(collected: Collect, forwarding: Concurrency) -> None:
    async with forwarding as facade:
        with pytest.raises(WorkerCrashed):
            await facade.run(lambda: targets.log_then_die("m-1"))
    assert [r.getMessage() for r in collected.records] == ["last words m-1"]


async def test_records_of_a_tasks_threads_all_arrive_whole(collected: Collect) -> None:
    # Threads log while the task's answer is written: every frame must stay whole (a torn one would
    # be a protocol error and a crashed worker), and none may be lost.
    async with concurrency() as facade:
        sent = await facade.run(lambda: targets.log_from_threads(4, 300))
        assert await facade.run(lambda: 7) == 7  # the worker is still in step
    assert len(collected.records) == sent == 1200
    for index in range(4):
        numbers = [int(r.getMessage().split()[3]) for r in collected.records if r.getMessage().split()[1] == str(index)]
        assert numbers == list(range(300))


async def test_what_an_initializer_logs_is_forwarded(collected: Collect) -> None:
    async with concurrency(initializer=targets.log_at_start) as facade:
        pid = await facade.run(os.getpid)
    assert [r.getMessage() for r in collected.records] == [f"initializer of worker {pid}"]
    assert not hasattr(collected.records[0], "task")  # no task was running


async def test_forwarding_can_be_turned_off(collected: Collect, capfd: pytest.CaptureFixture[str]) -> None:
    async with concurrency(forward_logs=False) as facade:
        await facade.run(lambda: targets.warn_and_fail(5))
    assert collected.records == []
    err = capfd.readouterr().err
    assert "hello from task 5" in err  # the worker's own last-resort handler: stderr, as before


async def test_records_name_the_request_that_made_the_call(collected: Collect, forwarding: Concurrency) -> None:
    facade = forwarding

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse(await facade.run(lambda: targets.warn_and_fail(9)))

    app = ConcurrencyMiddleware(Starlette(routes=[Route("/orders/9", endpoint, methods=["POST"])]), facade)
    async with facade, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.post("/orders/9")
    assert response.status_code == 200
    assert [(r.method, r.path) for r in collected.records] == [("POST", "/orders/9")] * 2  # type: ignore[attr-defined]
