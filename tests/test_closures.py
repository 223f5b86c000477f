"""The function cache: closures stay correct when only their state travels (issue 10).

Every correctness test runs against four workers: in this process or in a separate interpreter that
loads only `_wire/closure_store.py` by path (so what it knows, it was sent), and one that has already seen
the function's skeleton (the second call sends no definitions) or one that has not (a fresh store).
"""

from __future__ import annotations

import email.mime.text
import functools
import os
import pickle
import struct
import subprocess
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle  # type: ignore[import-untyped]
import pytest

from starlette_concurrency import (
    Concurrency,
    ProcessOptions,
    SerializationError,
    _closure_records,
    _closures,
)
from starlette_concurrency._closures import ClosureCache, Payload, WorkerMirror, WorkerStore
from starlette_concurrency._drivers.process import ProcessDriver
from starlette_concurrency._wire import closure_store

from . import closure_targets as targets

ROOT = Path(__file__).resolve().parent.parent
HEADER = struct.Struct("!I")
Fn = Callable[[], Any]

SETTING = 1  # a data global the tests change between calls


class WorkerFailed(Exception):
    """A worker could not load or run a payload (the message says why)."""


class Worker:
    """A worker the tests send payloads to: in this process or not, and one that has seen them or not."""

    def __init__(self, where: str, seen: bool) -> None:
        self.where, self.seen = where, seen
        self.cache = ClosureCache()
        self.process: subprocess.Popen[bytes] | None = None
        self.mirror, self.store = self.cache.mirror(), WorkerStore()
        self.sent_definitions = False  # whether the last call's definitions blob was not empty
        self.keys: list[int] = []  # the worker store's keys after the last call

    def run(self, fns: list[Fn]) -> list[Any]:
        """Call `fns` in the worker; when it has seen them, prove the call sent no definitions."""
        payload = self.cache.dumps(fns)
        if not self.seen:
            self.close()  # a new worker for every call
            self.mirror, self.store = self.cache.mirror(), WorkerStore()
        elif not all(key in self.mirror for key in payload.keys):
            self._send(payload)  # prime it: the call below is then served from what it holds
        results = self._send(payload)
        assert self.sent_definitions is not self.seen or not payload.skeletons
        return results

    def one(self, fn: Fn) -> Any:
        return self.run([fn])[0]

    def _send(self, payload: Payload) -> list[Any]:
        blob = self.mirror.prepare(payload.skeletons)
        self.sent_definitions = bool(blob)
        if self.where == "in-process":
            try:
                self.store.load_definitions(blob)
                results = [_call(fn) for fn in self.store.load(payload.data)]
            except Exception as exc:
                raise WorkerFailed(f"{type(exc).__name__}: {exc}") from exc
            finally:
                self.keys = sorted(self.store._skeletons)
            return results
        if self.process is None:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "closure_worker.py"), closure_store.__file__, str(ROOT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        body = pickle.dumps((blob, payload.data))
        self.process.stdin.write(HEADER.pack(len(body)) + body)
        self.process.stdin.flush()
        (size,) = HEADER.unpack(self.process.stdout.read(HEADER.size))
        status, value, self.keys, package_imported = pickle.loads(self.process.stdout.read(size))
        assert not package_imported, "the stand-alone worker imported the package"
        if status != "ok":
            raise WorkerFailed(value)
        assert isinstance(value, list)
        return value

    def close(self) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            assert self.process.stdout is not None
            self.process.stdin.close()
            self.process.stdout.close()
            assert self.process.wait(timeout=60) == 0
            self.process = None


def _call(fn: Fn) -> Any:
    import asyncio

    value = fn()
    return asyncio.run(value) if asyncio.iscoroutine(value) else value


@pytest.fixture(
    params=[("in-process", True), ("in-process", False), ("subprocess", True), ("subprocess", False)],
    ids=["in-process-seen", "in-process-unseen", "subprocess-seen", "subprocess-unseen"],
)
def worker(request: pytest.FixtureRequest) -> Iterator[Worker]:
    where, seen = request.param
    worker = Worker(where, seen)
    yield worker
    worker.close()


def test_a_global_changed_since_the_last_call_is_seen(worker: Worker) -> None:
    global SETTING
    fn = lambda: SETTING * 10  # noqa: E731
    SETTING = 1
    assert worker.one(fn) == 10
    SETTING = 2
    try:
        assert worker.one(fn) == 20
    finally:
        SETTING = 1


def test_closures_of_the_same_code_with_different_cells(worker: Worker) -> None:
    def make(n: int) -> Fn:
        return lambda: targets.add(n, 100)

    one, two = make(1), make(2)
    assert one.__code__ is two.__code__
    assert worker.run([one, two]) == [101, 102]
    assert worker.run([make(3)]) == [103]


def test_nested_functions(worker: Worker) -> None:
    def outer(base: int) -> Fn:
        def middle() -> int:
            def inner(x: int) -> int:
                return targets.scale(x, base)

            return inner(2) + inner(3)

        return middle

    assert worker.run([outer(10), outer(100)]) == [50, 500]


def test_recursive_closures(worker: Worker) -> None:
    def make(limit: int) -> Fn:
        def even(n: int) -> bool:
            return True if n == 0 else odd(n - 1)

        def odd(n: int) -> bool:
            return False if n == 0 else even(n - 1)

        def fact(n: int) -> int:
            return 1 if n <= 1 else n * fact(n - 1)  # fact is in its own cells

        return lambda: (fact(limit), even(limit), odd(limit))

    assert worker.run([make(5), make(6)]) == [(120, False, True), (720, True, False)]


def test_main_functions(worker: Worker) -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(
        "def helper(x):\n    return x + OFFSET\n\ndef task():\n    return helper(1)\n",
        namespace,
    )
    namespace["OFFSET"] = 10
    assert namespace["task"].__module__ == "__main__"
    assert worker.one(namespace["task"]) == 11
    namespace["OFFSET"] = 20
    assert worker.one(namespace["task"]) == 21


def test_functions_with_wrapped(worker: Worker) -> None:
    def logged(fn: Fn) -> Fn:
        @functools.wraps(fn)
        def wrapper() -> Any:
            return ("logged", fn.__name__, fn())

        return wrapper

    def users() -> int:
        return targets.add(1, 1)

    def orders() -> int:
        return targets.add(2, 2)

    # The same wrapper code twice, with other names, cells and __wrapped__ each time.
    assert worker.run([logged(users), logged(orders)]) == [("logged", "users", 2), ("logged", "orders", 4)]
    wrapped: Any = logged(users)
    assert worker.one(lambda: (wrapped.__name__, wrapped.__qualname__.split(".")[-1], wrapped.__wrapped__())) == (
        "users",
        "users",
        2,
    )


def test_function_attributes_and_names_are_the_current_ones(worker: Worker) -> None:
    def make() -> Fn:
        def task() -> str:
            return "text"  # in 3.11, a lambda's or a def's first string constant is not its __doc__

        return task

    fn = make()
    fn.label = "first"  # type: ignore[attr-defined]
    probe = lambda: (fn.label, fn.__name__, fn.__doc__, fn())  # type: ignore[attr-defined]  # noqa: E731
    assert worker.one(probe) == ("first", "task", None, "text")
    fn.label = "second"  # type: ignore[attr-defined]
    fn.__name__ = "renamed"
    fn.__doc__ = "Now documented."
    assert worker.one(probe) == ("second", "renamed", "Now documented.", "text")


def test_submodules_reached_through_a_package_are_imported(worker: Worker) -> None:
    # A fresh interpreter has not imported email.mime.text: only the skeleton's submodules bring it.
    assert worker.one(lambda: email.mime.text.MIMEText("hi").get_payload()) == "hi"


def test_methods(worker: Worker) -> None:
    class Counter:
        def __init__(self, start: int) -> None:
            self.start = start

        def next(self) -> int:
            return self.start + 1

    assert worker.run([Counter(1).next, Counter(41).next]) == [2, 42]
    greeter = targets.Greeter("hello")
    assert worker.run([functools.partial(greeter.greet, "me"), lambda: greeter.greet("you")]) == [
        "hello, me",
        "hello, you",
    ]


def test_classes_defined_in_functions(worker: Worker) -> None:
    def make(label: str) -> Fn:
        class Base:
            def describe(self) -> str:
                return f"base {label}"

        class Child(Base):
            def describe(self) -> str:
                return "child of " + super().describe()  # the __class__ cell

        return lambda: (Child().describe(), Child.__name__, isinstance(Child(), Base))

    assert worker.run([make("a"), make("b")]) == [
        ("child of base a", "Child", True),
        ("child of base b", "Child", True),
    ]


def test_default_arguments_and_keyword_only_defaults(worker: Worker) -> None:
    def make(a: int, b: int) -> Fn:
        def task(x: int = a, *, y: int = b) -> int:
            return targets.scale(x, y)

        return task

    assert worker.run([make(2, 3), make(4, 5)]) == [6, 20]
    fn = make(1, 1)
    fn.__defaults__ = (7,)
    fn.__kwdefaults__ = {"y": 8}
    assert worker.one(fn) == 56


def test_async_functions(worker: Worker) -> None:
    def make(n: int) -> Fn:
        async def task() -> int:
            return targets.add(n, 1)

        return task

    assert worker.run([make(1), make(2)]) == [2, 3]


def test_functions_whose_globals_are_not_a_module(worker: Worker) -> None:
    namespace: dict[str, Any] = {"__name__": "scratch", "targets": targets, "SEED": 3}
    exec(
        "def bump():\n    global COUNT\n    COUNT = COUNT + 1 if 'COUNT' in globals() else SEED\n    return COUNT\n"
        "def read():\n    return COUNT\n",
        namespace,
    )
    bump, read = namespace["bump"], namespace["read"]
    # Functions that share globals share them in the worker too, within one payload...
    assert worker.run([bump, bump, read]) == [3, 4, 4]
    # ...and a task's writes to its globals do not reach the next payload.
    assert worker.run([bump]) == [3]
    namespace["SEED"] = 30
    assert worker.run([bump]) == [30]


def test_rebinding_a_global_function_is_seen(worker: Worker) -> None:
    namespace: dict[str, Any] = {"__name__": "tests.closure_targets", "combine": targets.add}
    exec("task = lambda: combine(6, 7)\n", namespace)
    assert worker.one(namespace["task"]) == 13
    namespace["combine"] = targets.scale  # another function sent by reference
    assert worker.one(namespace["task"]) == 42


def test_a_builtin_shadowed_after_the_first_call_is_seen(worker: Worker) -> None:
    namespace: dict[str, Any] = {"__name__": "scratch"}
    exec("task = lambda: len('abc')\n", namespace)
    assert worker.one(namespace["task"]) == 3
    namespace["len"] = lambda value: -1  # now a global of its own, sent with the task
    assert worker.one(namespace["task"]) == -1


def test_an_empty_cell_stays_empty(worker: Worker) -> None:
    def make(bound: str) -> Fn:
        later: int

        def task() -> str:
            try:
                return bound + str(later)
            except NameError:
                return bound + " unbound"

        return task
        later = 1  # never runs: `later` is a cell that stays empty

    assert worker.run([make("one"), make("two")]) == ["one unbound", "two unbound"]


def test_a_changed_module_identity_is_seen(worker: Worker) -> None:
    namespace: dict[str, Any] = {"__name__": "first"}
    exec("task = lambda: __name__\n", namespace)
    assert worker.one(namespace["task"]) == "first"
    namespace["__name__"] = "second"
    assert worker.one(namespace["task"]) == "second"


def test_a_global_deleted_since_the_last_call_is_gone(worker: Worker) -> None:
    namespace: dict[str, Any] = {"__name__": "scratch", "LIMIT": 3}
    exec("def task():\n    try:\n        return LIMIT\n    except NameError:\n        return 'gone'\n", namespace)
    assert worker.one(namespace["task"]) == 3
    del namespace["LIMIT"]
    assert worker.one(namespace["task"]) == "gone"


def test_a_method_of_a_module_class_read_as_a_global(worker: Worker) -> None:
    namespace: dict[str, Any] = {"__name__": "scratch", "greet": targets.Greeter.greet, "targets": targets}
    exec("task = lambda: greet(targets.Greeter('hey'), 'there')\n", namespace)
    assert worker.one(namespace["task"]) == "hey, there"
    namespace["greet"] = lambda self, name: "replaced"
    assert worker.one(namespace["task"]) == "replaced"


def test_a_worker_never_sent_a_skeleton_refuses_the_payload() -> None:
    cache = ClosureCache()
    payload = cache.dumps(lambda: 1)
    cache.mirror().prepare(payload.skeletons)  # sent to another worker, not to this one
    with pytest.raises(pickle.UnpicklingError, match=f"skeleton {payload.keys[0]} was never sent"):
        WorkerStore().load(payload.data)
    with pytest.raises(pickle.UnpicklingError, match="can only be loaded by a WorkerStore"):
        pickle.loads(payload.data)


def test_a_skeleton_that_does_not_load_fails_the_tasks_that_name_it() -> None:
    cache, store = ClosureCache(), WorkerStore()
    mirror = cache.mirror()
    module = types.ModuleType("nowhere_to_be_found")
    module.value = 5  # type: ignore[attr-defined]
    sys.modules["nowhere_to_be_found"] = module
    try:
        fn = eval("lambda: nowhere_to_be_found.value", {"nowhere_to_be_found": module, "__name__": "scratch"})
        bad = cache.dumps([fn])
        good = cache.dumps([lambda: 2])
    finally:
        del sys.modules["nowhere_to_be_found"]
    store.load_definitions(mirror.prepare(bad.skeletons))  # does not raise: the store stays in step
    assert set(store._skeletons) == set(bad.keys)
    with pytest.raises(ModuleNotFoundError, match="nowhere_to_be_found"):
        store.load(bad.data)
    store.load_definitions(mirror.prepare(good.skeletons))
    assert [fn() for fn in store.load(good.data)] == [2]


def test_an_unpicklable_closure_raises_cloudpickles_error() -> None:
    lock = threading.Lock()
    with pytest.raises(TypeError, match="lock"):
        ClosureCache().dumps(lambda: lock.locked())


def test_a_skeleton_too_large_to_cache_takes_cloudpickles_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_closures, "MAX_SKELETON_BYTES", 10)
    cache = ClosureCache()
    payload = cache.dumps(lambda: SETTING + 1)
    assert payload.skeletons == ()
    assert pickle.loads(payload.data)() == 2


def test_a_module_registered_by_value_is_sent_by_value() -> None:
    cache = ClosureCache()
    fn = lambda: targets.add(1, 2)  # noqa: E731
    assert targets.__name__ in pickle.loads(cache.dumps(fn).skeletons[0].data)[2]["targets"].__name__
    cloudpickle.register_pickle_by_value(targets)
    try:
        payload = cache.dumps(fn)
        refs = pickle.loads(payload.skeletons[0].data)[2]
    finally:
        cloudpickle.unregister_pickle_by_value(targets)
    assert "targets" not in refs  # the module travels with the state now, by value
    store = WorkerStore()
    store.load_definitions(cache.mirror().prepare(payload.skeletons))
    assert store.load(payload.data)() == 3
    assert payload.keys[0] in store


def test_the_cache_is_what_the_worker_reads_back() -> None:
    """The stand-in the payloads name is the one the worker's store answers."""
    assert (_closures._rebuild_function.__module__, _closures._rebuild_function.__name__) == closure_store.REBUILD
    assert _closure_records.SUPPORTED, f"cloudpickle {cloudpickle.__version__} lacks a helper the cache relies on"


def test_ten_thousand_calls_of_one_lambda_keep_one_entry() -> None:
    cache, store = ClosureCache(), WorkerStore()
    mirror = cache.mirror()
    for n in range(10_000):
        payload = cache.dumps(lambda n=n: n)
        store.load_definitions(mirror.prepare(payload.skeletons))
        assert store.load(payload.data)() == n
    assert (len(cache), len(mirror), len(store)) == (1, 1, 1)


def test_ten_thousand_distinct_lambdas_stay_under_the_bounds() -> None:
    cache = ClosureCache(max_entries=100)
    mirror, store = cache.mirror(max_entries=50), WorkerStore()
    for n in range(10_000):
        fn = eval(f"lambda: {n}", {"__name__": "scratch"})  # a code object of its own
        payload = cache.dumps(fn)
        store.load_definitions(mirror.prepare(payload.skeletons))
        assert store.load(payload.data)() == n
        assert len(cache) <= 100
        assert len(mirror) <= 50
    assert set(store._skeletons) == set(mirror._sent)  # in lock-step: what it was told to forget, it forgot


def test_the_bound_in_bytes_holds_on_both_sides() -> None:
    cache = ClosureCache(max_bytes=20_000)
    mirror, store = cache.mirror(max_bytes=10_000), WorkerStore()
    for n in range(500):
        payload = cache.dumps(eval(f"lambda: {n}", {"__name__": "scratch"}))
        store.load_definitions(mirror.prepare(payload.skeletons))
        assert store.load(payload.data)() == n
        assert cache.nbytes <= 20_000
        assert mirror._bytes <= 10_000
    assert set(store._skeletons) == set(mirror._sent)


def test_a_payload_larger_than_the_bound_still_loads_and_is_trimmed_after() -> None:
    cache = ClosureCache()
    mirror, store = cache.mirror(max_entries=3), WorkerStore()
    fns = [eval(f"lambda: {n}", {"__name__": "scratch"}) for n in range(5)]
    payload = cache.dumps(fns)
    store.load_definitions(mirror.prepare(payload.skeletons))
    assert [fn() for fn in store.load(payload.data)] == [0, 1, 2, 3, 4]
    later = cache.dumps(lambda: "x")
    store.load_definitions(mirror.prepare(later.skeletons))
    assert store.load(later.data)() == "x"
    assert len(mirror) <= 3
    assert set(store._skeletons) == set(mirror._sent)


def test_a_mirror_starts_empty_for_every_worker() -> None:
    cache = ClosureCache()
    payload = cache.dumps(lambda: 1)
    first: WorkerMirror = cache.mirror()
    assert first.prepare(payload.skeletons) != b""
    assert first.prepare(payload.skeletons) == b""
    assert cache.mirror().prepare(payload.skeletons) != b""


def test_the_state_travels_and_the_code_does_not() -> None:
    cache = ClosureCache()
    big = "x" * 1000  # noqa: F841 - in the code's constants, not in its state
    fn = lambda: "y" * 1000  # noqa: E731
    payload = cache.dumps(fn)
    assert len(payload.data) < 200 < len(payload.skeletons[0].data)
    assert len(payload.data) < len(cloudpickle.dumps(fn)) / 4


def test_worker_processes_never_import_the_package(tmp_path: Path) -> None:
    """The store file runs with the standard library alone: no starlette_concurrency, no cloudpickle."""
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('store', {closure_store.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('starlette', 'cloudpickle'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True, cwd=tmp_path)
    assert out.stdout.decode().strip() == "[]"
    assert os.path.basename(closure_store.__file__) == "closure_store.py"


def test_threads_share_one_cache() -> None:
    cache = ClosureCache(max_entries=8)
    errors: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            mirror, store = cache.mirror(), WorkerStore()
            for n in range(300):
                fn = eval(f"lambda: {n % 20} + {offset}", {"__name__": "scratch"})
                payload = cache.dumps([fn, lambda n=n: n])
                store.load_definitions(mirror.prepare(payload.skeletons))
                assert [f() for f in store.load(payload.data)] == [n % 20 + offset, n]
        except BaseException as exc:  # reported below: an assert in a thread would go unseen
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) <= 8


@pytest.mark.parametrize("bound", ["max_entries", "max_bytes"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bounds_must_be_positive(bound: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{bound} must be a positive int"):
        ClosureCache(**{bound: value})
    with pytest.raises(ValueError, match=f"{bound} must be a positive int"):
        ClosureCache().mirror(**{bound: value})


# Through the process driver: real workers, each with its mirror ---------------------------------------------


@pytest.mark.anyio
async def test_the_process_driver_sends_a_lambdas_skeleton_once_per_worker() -> None:
    global SETTING
    driver = ProcessDriver(2)
    fn = lambda: SETTING * 10  # noqa: E731
    try:
        async with Concurrency(driver=driver, env_file=None) as concurrency:
            for value in (1, 2, 3):
                SETTING = value
                assert await concurrency.run([fn] * 4) == [value * 10] * 4
            assert len(driver._pool._closures) == 1
            sizes = [len(worker.mirror) for worker in driver._pool.workers]
            assert max(sizes) == 1
            assert sum(sizes) >= 1
    finally:
        SETTING = 1


@pytest.mark.anyio
async def test_a_recycled_worker_starts_with_nothing_and_is_sent_the_skeleton() -> None:
    driver = ProcessDriver(1, ProcessOptions(max_tasks_per_worker=1))
    async with Concurrency(driver=driver, env_file=None) as concurrency:

        def task(n: int) -> Callable[[], tuple[int, int]]:
            return lambda: (os.getpid(), targets.add(n, 1))

        pids = set()
        for n in range(4):
            pid, value = await concurrency.run(task(n))
            assert value == n + 1
            pids.add(pid)
    assert len(pids) == 4  # four workers, each sent the skeleton it lacked


@pytest.mark.anyio
async def test_a_skeleton_a_worker_cannot_load_fails_only_its_task_by_name() -> None:
    module = types.ModuleType("nowhere_to_be_found")
    module.value = 5  # type: ignore[attr-defined]
    fn = eval("lambda: nowhere_to_be_found.value", {"nowhere_to_be_found": module, "__name__": "scratch"})
    sys.modules["nowhere_to_be_found"] = module
    try:
        async with Concurrency(driver=ProcessDriver(1), env_file=None) as concurrency:
            for _ in range(2):  # the second time, the worker holds the skeleton as its error
                bad, good = await concurrency.run([fn, lambda: targets.add(1, 1)], return_exceptions=True)
                assert isinstance(bad, SerializationError)
                assert "task 0" in str(bad)
                assert "nowhere_to_be_found" in str(bad)
                assert good == 2
    finally:
        del sys.modules["nowhere_to_be_found"]


@pytest.mark.anyio
async def test_an_unpicklable_closure_names_its_task_and_nothing_runs(tmp_path: Path) -> None:
    lock = threading.Lock()
    marker = tmp_path / "ran"
    async with Concurrency(driver=ProcessDriver(1), env_file=None) as concurrency:
        with pytest.raises(SerializationError, match=r"task 1 .*cannot be pickled"):
            await concurrency.run([lambda: marker.write_text("ran"), lambda: lock.locked()])
    assert not marker.exists()


# The pickler a cache reuses, and the loader's plain path ----------------------------------------------------


class _Nested:
    """Pickles through the same cache while the cache is pickling it."""

    cache: ClosureCache
    inner: Payload | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        self.inner = self.cache.dumps(lambda: "inner")
        return (bytes, (self.inner.data,))


def test_a_failed_dump_leaves_nothing_behind_for_the_next() -> None:
    cache, store = ClosureCache(), WorkerStore()
    mirror = cache.mirror()
    lock = threading.Lock()
    cache.dumps(lambda: 0)
    reused = cache._local.pickler
    with pytest.raises(TypeError):
        cache.dumps([lambda: 1, lambda: lock.locked()])
    assert cache._local.pickler is None  # not reused: the failure may have left it in any state
    payload = cache.dumps(lambda: 2)
    assert cache._local.pickler is not reused
    store.load_definitions(mirror.prepare(payload.skeletons))
    assert store.load(payload.data)() == 2
    assert len(payload.skeletons) == 1


def test_a_dump_inside_a_dump_gets_a_pickler_of_its_own() -> None:
    cache, store = ClosureCache(), WorkerStore()
    mirror = cache.mirror()
    nested = _Nested()
    nested.cache = cache
    payload = cache.dumps([lambda: "outer", nested])
    store.load_definitions(mirror.prepare(payload.skeletons))
    outer, inner_data = store.load(payload.data)
    assert outer() == "outer"
    assert nested.inner is not None
    assert nested.inner.data == inner_data
    store.load_definitions(mirror.prepare(nested.inner.skeletons))
    assert store.load(inner_data)() == "inner"


def test_a_payload_without_cached_functions_loads_as_plain_pickle() -> None:
    cache = ClosureCache()
    partial = cache.dumps(functools.partial(targets.add, 1, 2))
    assert partial.skeletons == ()
    assert WorkerStore().load(partial.data)() == 3
    # The marker as data does not confuse the loader: it takes the store's path, which loads it too.
    marker = cache.dumps(functools.partial(targets.Greeter("starlette_concurrency._closures").greet, "you"))
    assert WorkerStore().load(marker.data)() == "starlette_concurrency._closures, you"


def test_eviction_never_drops_a_skeleton_the_payload_names() -> None:
    cache, store = ClosureCache(), WorkerStore()
    mirror = cache.mirror(max_entries=1)
    a = eval("lambda: 'a'", {"__name__": "scratch"})
    b = eval("lambda: 'b'", {"__name__": "scratch"})
    for fns, expected in (([a], ["a"]), ([a, b], ["a", "b"]), ([b, a], ["b", "a"]), ([a], ["a"])):
        payload = cache.dumps(fns)
        store.load_definitions(mirror.prepare(payload.skeletons))
        assert [fn() for fn in store.load(payload.data)] == expected
        assert set(store._skeletons) == set(mirror._sent)
    assert len(mirror) == 1


def test_a_submodule_imported_after_the_first_call_gets_a_new_skeleton() -> None:
    package = types.ModuleType("sc_test_package")
    package.__package__ = "sc_test_package"
    package.__path__ = []
    submodule = types.ModuleType("sc_test_package.sub")
    sys.modules["sc_test_package"] = package
    try:
        cache = ClosureCache()
        fn = eval("lambda: sc_test_package.sub", {"__name__": "scratch", "sc_test_package": package})
        first = cache.dumps(fn)
        assert pickle.loads(first.skeletons[0].data)[5] == ()
        sys.modules["unrelated_module_for_the_count"] = types.ModuleType("unrelated_module_for_the_count")
        assert cache.dumps(fn).keys == first.keys  # sys.modules grew, but nothing the function reaches
        sys.modules["sc_test_package.sub"] = submodule
        package.sub = submodule  # type: ignore[attr-defined]
        second = cache.dumps(fn)
        assert second.keys != first.keys
        assert [module.__name__ for module in pickle.loads(second.skeletons[0].data)[5]] == ["sc_test_package.sub"]
    finally:
        for name in ("sc_test_package", "sc_test_package.sub", "unrelated_module_for_the_count"):
            sys.modules.pop(name, None)


def test_a_function_the_cache_cannot_record_takes_cloudpickles_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(func: Any, record: Any) -> bytes:
        raise RuntimeError("no skeleton today")

    monkeypatch.setattr(_closures, "_dump_skeleton", broken)
    payload = ClosureCache().dumps(lambda: SETTING + 41)
    assert payload.skeletons == ()
    assert WorkerStore().load(payload.data)() == 42


def test_records_too_large_to_cache_are_evicted_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_closures, "MAX_SKELETON_BYTES", 10)
    cache = ClosureCache(max_entries=1)
    for n in range(3):
        assert pickle.loads(cache.dumps(eval(f"lambda: {n}", {"__name__": "scratch"})).data)() == n
    assert len(cache) == 1
    assert cache.nbytes == 0


def _shapes() -> list[Any]:
    """Functions of every shape, for the comparison with cloudpickle's own result."""

    def documented(a: int, b: str = "x", *, c: float = 1.5) -> str:
        """Say what it does."""
        return f"{a}{b}{c}"

    def recursive(n: int) -> int:
        return 1 if n <= 1 else n * recursive(n - 1)

    async def coroutine() -> int:
        return SETTING

    @functools.wraps(documented)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        return documented(*args, **kwargs)

    class Local:
        def method(self) -> str:
            return "method"

    documented.tag = "tagged"  # type: ignore[attr-defined]
    return [lambda: "text", documented, recursive, coroutine, wrapper, Local.method, lambda x=[1]: x]


def _describe(fn: Any) -> tuple[Any, ...]:
    return (
        fn.__name__,
        fn.__qualname__,
        fn.__module__,
        fn.__doc__,
        fn.__defaults__,
        fn.__kwdefaults__,
        sorted(fn.__dict__),
        {name: getattr(value, "__name__", value) for name, value in fn.__annotations__.items()},
        None if fn.__closure__ is None else len(fn.__closure__),
        sorted(name for name in fn.__globals__ if name in fn.__code__.co_names),
        fn.__globals__.get("__name__"),
        fn.__code__.co_code,
    )


def test_a_cached_function_is_what_cloudpickle_would_have_rebuilt() -> None:
    cache, store = ClosureCache(), WorkerStore()
    mirror = cache.mirror()
    for _ in range(2):  # a worker that has not seen the skeletons, then one that has
        shapes = _shapes()
        payload = cache.dumps(shapes)
        store.load_definitions(mirror.prepare(payload.skeletons))
        ours = store.load(payload.data)
        theirs = pickle.loads(cloudpickle.dumps(shapes))
        assert [_describe(fn) for fn in ours] == [_describe(fn) for fn in theirs]
        assert ours[2](5) == theirs[2](5) == 120
        assert ours[4](2, c=3) == theirs[4](2, c=3) == "2x3"


def test_a_batch_pickles_as_single_dumps_do_and_forgets_its_verdicts_when_it_ends() -> None:
    cache, store = ClosureCache(), WorkerStore()
    mirror = cache.mirror()
    module = types.ModuleType("batch_scratch")
    exec("def twice(x):\n    return 2 * x\n", module.__dict__)
    sys.modules["batch_scratch"] = module
    try:
        tasks = [functools.partial(module.twice, i) for i in range(5)]
        alone = [cache.dumps(task).data for task in tasks]
        with cache.batch():
            batched = [cache.dumps(task).data for task in tasks]
        assert batched == alone  # by reference, both ways: the same bytes
        # The name now means another function: the old one no longer goes by reference.
        original = module.twice
        exec("def twice(x):\n    return 3 * x\n", module.__dict__)
        with cache.batch():
            payload = cache.dumps(functools.partial(original, 7))
        assert payload.data != cache.dumps(functools.partial(module.twice, 7)).data
        store.load_definitions(mirror.prepare(payload.skeletons))
        assert store.load(payload.data)() == 14  # the function it was given, not the one now named so
    finally:
        del sys.modules["batch_scratch"]


class Registered:
    """A class whose reducer is registered with copyreg after the cache's pickler was made."""

    def __init__(self, value: int) -> None:
        self.value = value


def _rebuild_registered(value: int) -> Registered:
    return Registered(value * 10)


def test_a_reducer_registered_with_copyreg_later_is_used_by_the_next_dump() -> None:
    import copyreg

    cache = ClosureCache()
    assert pickle.loads(cache.dumps(Registered(4)).data).value == 4  # the pickler exists now
    copyreg.pickle(Registered, lambda obj: (_rebuild_registered, (obj.value,)))
    try:
        assert pickle.loads(cache.dumps(Registered(4)).data).value == 40
    finally:
        del copyreg.dispatch_table[Registered]
    assert pickle.loads(cache.dumps(Registered(4)).data).value == 4


def test_a_function_remembered_to_pickle_by_name_is_sent_by_value_once_its_name_means_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sc_renamed.py").write_text("def where():\n    return 'old'\n\nclass Kind:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sc_renamed  # type: ignore[import-not-found]

    try:
        cache, store = ClosureCache(), WorkerStore()
        mirror = cache.mirror()
        old, kind = sc_renamed.where, sc_renamed.Kind
        for _ in range(2):  # the second dump takes the remembered way
            payload = cache.dumps(old)
            assert b"sc_renamed" in payload.data
            assert not payload.skeletons
        assert id(old) in cache.named
        sc_renamed.where = lambda: "new"  # the name now means another function
        payload = cache.dumps(old)
        store.load_definitions(mirror.prepare(payload.skeletons))
        assert store.load(payload.data)() == "old"  # by value: not the function the name means now
        cache.dumps(kind)
        assert id(kind) in cache.named
        del sys.modules["sc_renamed"]  # no longer importable by that name: cloudpickle sends the class by value
        assert b"_make_skeleton_class" in cache.dumps(kind).data
    finally:
        sys.modules.pop("sc_renamed", None)
