"""Context variables travel with the tasks: captured when run() or defer() accepts them, set around each task."""

from __future__ import annotations

import functools
import os
import threading
from contextvars import ContextVar
from pathlib import Path

import pytest

from starlette_concurrency import Concurrency, ConfigurationError, SerializationError

from . import context_targets as targets, helpers

pytestmark = pytest.mark.anyio


@pytest.fixture
def context_concurrency(driver_name: str) -> Concurrency:
    return Concurrency(driver_name, workers=1, env_file=None, context=[targets.request_id, targets.tenant])


async def test_run_carries_the_callers_values_into_every_kind_of_task(
    context_concurrency: Concurrency, driver_name: str
) -> None:
    async with context_concurrency as concurrency:
        token = targets.request_id.set("r-42")
        try:
            a = await concurrency.run(targets.read)
            b = await concurrency.run(targets.read_after_awaiting)
            c = await concurrency.run(lambda: (targets.request_id.get("-"), targets.tenant.get()))
        finally:
            targets.request_id.reset(token)
        assert a[:2] == ("r-42", "no tenant")  # the variable left unset keeps its default there
        assert b == c == ("r-42", "no tenant")
        if driver_name in ("process", "fork"):
            assert a[2] != os.getpid()  # it ran elsewhere


async def test_a_worker_sets_the_values_without_importing_the_package(tmp_path: Path) -> None:
    # What sets them (`_wire/context.py`) is pickled so that a worker imports it alone: a plain reference
    # would import `starlette_concurrency` itself in every worker (Starlette, anyio: tens of ms, MiB).
    context = [targets.request_id]
    async with Concurrency("process", workers=1, env_file=None, context=context) as concurrency:
        token = targets.request_id.set("r-7")
        try:
            assert await concurrency.run(targets.package_root_loaded) == ("r-7", False)
        finally:
            targets.request_id.reset(token)


async def test_a_worker_does_not_keep_one_calls_values_for_the_next(context_concurrency: Concurrency) -> None:
    # One worker runs both calls: what the first set is reset after its task.
    async with context_concurrency as concurrency:
        token = targets.tenant.set("acme")
        try:
            first = await concurrency.run(targets.read)
        finally:
            targets.tenant.reset(token)
        second = await concurrency.run(targets.read)
    assert first[:2] == ("-", "acme")
    assert second[:2] == ("-", "no tenant")


async def test_defer_carries_the_values_of_its_caller_not_those_of_later(
    context_concurrency: Concurrency, tmp_path: Path
) -> None:
    async with context_concurrency as concurrency:
        token = targets.request_id.set("r-7")
        concurrency.defer(functools.partial(targets.write, str(tmp_path / "seen")))
        targets.request_id.reset(token)
        targets.request_id.set("later")  # in this task's context only: it must not reach the deferred task
    assert (tmp_path / "seen").read_text() == "r-7 no tenant"


def test_run_blocking_from_a_thread_carries_that_threads_values() -> None:
    concurrency = Concurrency(workers=1, env_file=None, context=[targets.request_id])
    seen: list[object] = []

    def in_thread() -> None:
        targets.request_id.set("from a thread")
        seen.append(concurrency.run_blocking(targets.read)[0])

    with concurrency:
        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join(60)
    assert seen == ["from a thread"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_value_that_does_not_pickle_fails_the_call_naming_the_variable() -> None:
    async with Concurrency(workers=1, env_file=None, context=[targets.request_id]) as concurrency:
        token = targets.request_id.set(threading.Lock())  # type: ignore[arg-type]
        try:
            with pytest.raises(SerializationError, match="context variable 'request_id' holds a lock"):
                await concurrency.run(targets.read)
            with pytest.raises(SerializationError, match="context variable 'request_id'"):
                concurrency.defer(targets.read)
            # The fork driver does not pickle the task: the lock reaches it as it is.
            assert await concurrency.driver("fork").run(lambda: type(targets.request_id.get()).__name__) == "lock"
        finally:
            targets.request_id.reset(token)
        assert concurrency.stats().deferred_pending == 0  # the refused defer() left nothing behind


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_variable_no_worker_can_find_is_named_with_the_remedy() -> None:
    local: ContextVar[str] = ContextVar("made_in_a_function")
    async with Concurrency(workers=1, env_file=None, context=[local]) as concurrency:
        local.set("x")
        with pytest.raises(ConfigurationError, match="context variable 'made_in_a_function' is not a global"):
            await concurrency.run(helpers.pid)
        assert await concurrency.driver("sync").run(local.get) == "x"  # in-process drivers need no place


def test_context_takes_only_context_variables() -> None:
    with pytest.raises(TypeError, match=r"context\[1\] must be a contextvars.ContextVar, not str"):
        Concurrency(env_file=None, context=[targets.request_id, "tenant"])  # type: ignore[list-item]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_lambda_reading_a_global_variable_pickles_without_a_context_setting() -> None:
    # cloudpickle sends a lambda by value, its globals too: a ContextVar among them travels by its place.
    async with Concurrency(workers=1, env_file=None) as concurrency:
        assert await concurrency.run(lambda: targets.request_id.get("unset there")) == "unset there"


async def test_the_sync_driver_runs_a_task_in_a_copy_of_the_callers_context() -> None:
    # As asyncio.to_thread does: the task sees every variable of the caller (registered or not), and
    # what it sets, in a function or a coroutine, stays its own.
    async with Concurrency("sync", env_file=None) as concurrency:
        token = targets.tenant.set("acme")
        try:
            seen = await concurrency.run([targets.set_and_read, targets.set_and_read_after_awaiting])
            assert targets.tenant.get() == "acme"
            assert targets.request_id.get("unset") == "unset"
        finally:
            targets.tenant.reset(token)
    assert seen == [("acme", "set by the task"), ("acme", "set by the task")]
