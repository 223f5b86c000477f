"""Task labels: every error message and log names a task by them, so they must read well and never raise."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from starlette_concurrency import Task
from starlette_concurrency._tasks import Batch, function_name

from . import helpers


class Callable_:
    def __call__(self) -> int:
        return 1


class HostileName:
    """A callable whose `__qualname__` raises, as a badly written proxy might."""

    def __getattribute__(self, name: str) -> Any:
        if name == "__qualname__":
            raise RuntimeError("no name")
        return super().__getattribute__(name)

    def __call__(self) -> int:
        return 1


def test_labels_put_the_function_next_to_the_key() -> None:
    def count_rows() -> int:
        return 0

    assert Task(0, count_rows).label == "task 0 (count_rows)"
    assert Task("users", lambda: 1).label == "task 'users' (<lambda>)"
    assert Task(1, functools.partial(helpers.add, 1, 2)).label == "task 1 (partial(add))"
    assert Task(2, helpers.Counter(1).next).label == "task 2 (Counter.next)"
    assert Task(3, Callable_()).label == "task 3 (Callable_)"
    assert Task(4, print).label == "task 4 (print)"
    assert Task(("a", 1), helpers.pid).label == "task ('a', 1) (pid)"


def test_labels_never_raise() -> None:
    class BadRepr:
        def __repr__(self) -> str:
            raise ValueError("no repr")

    assert Task(BadRepr(), HostileName()).label == "task <BadRepr whose repr raised ValueError> (?)"
    assert function_name(HostileName()) == "?"
    assert Task("x" * 100, helpers.pid).label == f"task '{'x' * 36}... (pid)"


def test_a_refused_input_names_the_key_even_when_its_repr_raises() -> None:
    class BadRepr:
        def __repr__(self) -> str:
            raise ValueError("no repr")

    with pytest.raises(TypeError, match=r"tasks\[<BadRepr whose repr raised ValueError>\] is not callable"):
        Batch.of({BadRepr(): 42})
