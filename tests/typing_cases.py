"""What type checkers must infer for run() and run_blocking(); checked by tests/test_typing.py (mypy and pyright).

Not a test module: nothing here runs.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import assert_type

import litestar
import quart

from starlette_concurrency import (
    Concurrency,
    ConcurrencyMiddleware,
    DaskOptions,
    Deferral,
    ProcessOptions,
    Settings,
    current_deferral,
)


def count(table: str) -> int:
    return len(table)


async def fetch() -> str:
    return "body"


async def run_shapes(c: Concurrency) -> None:
    assert_type(await c.run(lambda: 1), int)
    assert_type(await c.run(fetch), str)
    assert_type(await c.run(functools.partial(count, "users")), int)
    assert_type(await c.run([lambda: count("a"), lambda: count("b")]), list[int])
    assert_type(await c.run([fetch, fetch]), list[str])
    assert_type(await c.run({"users": functools.partial(count, "users")}), dict[str, int])
    # pyright calls a dict literal of coroutine functions ambiguous (its key type variable and the coroutine's
    # Any) and infers Any: no false error, no check either. A typed mapping is inferred exactly.
    assert_type(await c.run({1: fetch}), dict[int, str])  # pyright: ignore[reportAssertTypeFailure]
    by_name: dict[int, Callable[[], Awaitable[str]]] = {1: fetch}
    assert_type(await c.run(by_name), dict[int, str])
    assert_type(await c.run(fetch, return_exceptions=True), str | BaseException)
    assert_type(await c.run([fetch], return_exceptions=True), list[str | BaseException])
    assert_type(await c.run({"a": fetch}, return_exceptions=True), dict[str, str | BaseException])  # pyright: ignore[reportAssertTypeFailure]
    wrong: str = await c.run(lambda: 1)  # type: ignore[arg-type, return-value]  # pyright: ignore
    wrong_list: list[str] = await c.run([lambda: 1])  # type: ignore[assignment]  # pyright: ignore
    wrong_dict: dict[str, str] = await c.run({"a": lambda: 1})  # type: ignore[assignment]  # pyright: ignore
    del wrong, wrong_list, wrong_dict
    await c.run([lambda: 1, 2])  # type: ignore[arg-type]  # pyright: ignore
    await c.run({"a": lambda: 1, "b": None})  # type: ignore[arg-type]  # pyright: ignore
    await c.run("abc")  # type: ignore[arg-type]  # pyright: ignore
    await c.run(42)  # type: ignore[call-overload]  # pyright: ignore
    # Callables of different types are accepted; mypy cannot unify them (pyright can): object at worst.
    mixed: list[object] = await c.run([functools.partial(count, "a"), lambda: "b", fetch])
    by_key: dict[str, object] = await c.run({"a": functools.partial(count, "a"), "b": lambda: "b"})
    del mixed, by_key


def run_blocking_shapes(c: Concurrency) -> None:
    assert_type(c.run_blocking(lambda: 1), int)
    assert_type(c.run_blocking(fetch), str)
    assert_type(c.run_blocking([functools.partial(count, "a")]), list[int])
    assert_type(c.run_blocking({"a": fetch}), dict[str, str])  # pyright: ignore[reportAssertTypeFailure]
    assert_type(c.run_blocking([fetch], return_exceptions=True), list[str | BaseException])
    wrong: str = c.run_blocking(lambda: 1)  # type: ignore[assignment]  # pyright: ignore
    wrong_list: list[str] = c.run_blocking([lambda: 1])  # type: ignore[assignment]  # pyright: ignore
    del wrong, wrong_list
    c.run_blocking([lambda: 1, 2])  # type: ignore[arg-type]  # pyright: ignore
    c.run_blocking("abc")  # type: ignore[arg-type]  # pyright: ignore


def option_shapes(settings: Settings) -> None:
    assert_type(settings.options_for(ProcessOptions), ProcessOptions)
    assert_type(settings.options_for(DaskOptions).address, str | None)
    Concurrency(options=ProcessOptions(max_tasks_per_worker=100))
    Concurrency(options=[ProcessOptions(preload=["json"]), DaskOptions(address="tcp://h:8786")])
    Concurrency(max_tasks_per_worker=100)  # a deprecated keyword: typed, and warned of at run time
    Concurrency(wokers=2)  # type: ignore[call-arg]  # pyright: ignore
    Concurrency(options={"max_tasks_per_worker": 100})  # type: ignore[dict-item]  # pyright: ignore


def defer_shapes(c: Concurrency) -> None:
    c.defer(fetch, key="order-42", retries=3, backoff=0.5)
    c.defer([fetch, fetch], retries=1)
    c.defer(fetch, retries="3")  # type: ignore[arg-type]  # pyright: ignore
    c.defer(fetch, backoff="1s")  # type: ignore[arg-type]  # pyright: ignore
    assert_type(current_deferral(), Deferral | None)
    deferral = current_deferral()
    if deferral is not None:
        assert_type(deferral.key, str | None)
        assert_type(deferral.attempt, int)
        assert_type(deferral.entry_id, int | None)


def other_frameworks_apps(c: Concurrency) -> None:
    # Litestar's and Quart's apps type their scopes and messages more narrowly than Starlette's ASGIApp: the
    # README's wirings wrap them all the same.
    ConcurrencyMiddleware(litestar.Litestar(route_handlers=[]), concurrency=c)
    ConcurrencyMiddleware(quart.Quart(__name__).asgi_app, concurrency=c)
