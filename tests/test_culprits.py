"""`SerializationError` names the part of a task that would not pickle, and its type (issue 24).

Each kind of part a callable is made of (a captured variable, a global, a default, an attribute, a
partial's argument, a bound method's object) is sent, holding a lock, to a real process pool, and to
the dask driver, which pickles on its own path.
"""

from __future__ import annotations

import functools
import re
import socket
import threading
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from starlette_concurrency import Concurrency, SerializationError
from starlette_concurrency._culprits import find_culprit

from .conftest import DaskCluster

pytestmark = pytest.mark.anyio

LOCK = threading.Lock()  # read as a global by the tasks below


class Service:
    def __init__(self) -> None:
        self.name = "orders"
        self.lock = threading.Lock()

    def fetch(self) -> str:
        return self.name


class Refuses:
    """Pickles as nothing but an error of its own: no part of it is to blame."""

    def __reduce__(self) -> Any:
        raise TypeError("Refuses will not be pickled")

    def __call__(self) -> None:
        pass


Case = tuple[str, Callable[[], Any], str]


def cases() -> list[Case]:
    lock = threading.Lock()
    service = Service()
    items = [1, lock]

    def with_a_default(first: int = 0, /, guard: Any = lock, *rest: Any) -> Any:
        unused = first
        return guard, unused

    def with_a_keyword_default(*, guard: Any = lock) -> Any:
        return guard

    def with_an_attribute() -> None:
        pass

    with_an_attribute.guard = lock  # type: ignore[attr-defined]
    here = __name__
    return [
        ("captured variable", lambda: lock.locked(), "captured variable 'lock' (_thread.lock)"),
        ("global", lambda: LOCK.locked(), "global 'LOCK' (_thread.lock)"),
        ("default", with_a_default, "default of parameter 'guard' (_thread.lock)"),
        ("keyword default", with_a_keyword_default, "default of parameter 'guard' (_thread.lock)"),
        ("function attribute", with_an_attribute, "function attribute 'guard' (_thread.lock)"),
        (
            "attribute",
            lambda: service.fetch(),
            f"captured variable 'service' ({here}.Service), attribute 'lock' (_thread.lock)",
        ),
        (
            "bound method",
            service.fetch,
            f"the object bound to method 'fetch' ({here}.Service), attribute 'lock' (_thread.lock)",
        ),
        ("partial argument", functools.partial(print, "x", lock), "argument 1 of the partial (_thread.lock)"),
        (
            "partial keyword",
            functools.partial(print, file=lock),
            "keyword argument 'file' of the partial (_thread.lock)",
        ),
        ("item", lambda: items, "captured variable 'items' (list), item 1 (_thread.lock)"),
    ]


CASES = cases()


@pytest.fixture(params=["process", "dask"])
async def concurrency(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Concurrency]:
    if request.param == "dask":
        cluster: DaskCluster = request.getfixturevalue("dask_cluster")
        monkeypatch.setenv("CONCURRENCY_DASK_ADDRESS", cluster.address)
    async with Concurrency(request.param, workers=1, env_file=None) as facade:
        yield facade


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # pickling happens before anything is dispatched: the event loop plays no part


@pytest.mark.parametrize(("task", "culprit"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
async def test_the_error_names_the_part_that_would_not_pickle_and_its_type(
    concurrency: Concurrency, task: Callable[[], Any], culprit: str
) -> None:
    expected = (
        rf"task 'orders' \(.*\) cannot be pickled, so it cannot be sent to a worker process: {re.escape(culprit)}"
    )
    expected += r" cannot be pickled \(TypeError"
    with pytest.raises(SerializationError, match=expected):
        await concurrency.run({"orders": task})


async def test_an_object_that_refuses_on_its_own_is_named_as_a_whole(concurrency: Concurrency) -> None:
    refuses = Refuses()
    named = r"captured variable 'refuses' \(tests\.test_culprits\.Refuses\) cannot be pickled \(TypeError\('Refuses"
    with pytest.raises(SerializationError, match=named):
        await concurrency.run(lambda: refuses())
    # The task itself: no part of it to name, cloudpickle's error as it is.
    with pytest.raises(
        SerializationError, match=r"worker process: TypeError\('Refuses will not be pickled'\)\. Capture"
    ):
        await concurrency.run(refuses)


def test_a_socket_deep_in_a_task_is_named_with_the_path_to_it() -> None:
    with socket.socket() as conn:
        state = {"db": {"conn": conn}}
        assert find_culprit(lambda: state) == (
            "captured variable 'state' (dict), the value of key 'db' (dict), the value of key 'conn' (socket.socket)"
        )


def test_a_task_that_pickles_has_no_culprit() -> None:
    assert find_culprit(functools.partial(print, 1)) is None
    assert find_culprit(lambda: LOCK is None) == "global 'LOCK' (_thread.lock)"  # and one that does not, has one


def test_the_search_survives_cycles_unbound_cells_depth_and_parts_that_raise() -> None:
    lock = threading.Lock()
    cycle: list[Any] = []
    cycle.extend([cycle, lock])
    assert find_culprit(lambda: cycle) == "captured variable 'cycle' (list), item 1 (_thread.lock)"

    def unbound_yet() -> Any:
        return (later, lock)

    assert find_culprit(unbound_yet) == "captured variable 'lock' (_thread.lock)"
    later = None
    deep: list[Any] = [lock]
    for _ in range(10):
        deep = [deep]
    assert find_culprit(deep).count("item 0 (list)") == 6  # type: ignore[union-attr]  # then it stops looking

    def with_a_lock() -> Any:
        return lock

    method = types.MethodType(with_a_lock, Service.__new__(Service))  # the object pickles, not the function
    assert find_culprit(method) == "the method's function (function), captured variable 'lock' (_thread.lock)"

    class BadRepr:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    assert find_culprit({BadRepr(): lock}) is None  # never raises while an error is being reported
