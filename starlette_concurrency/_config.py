"""Settings: explicit arguments first, then `CONCURRENCY_*` environment variables (or a `.env` file)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.config import Config

from ._exceptions import ConfigurationError

__all__ = ["Settings", "positive"]

T = TypeVar("T", int, float)


@dataclass(frozen=True, slots=True)
class Settings:
    """The resolved configuration of a `Concurrency`, handed to every driver factory.

    Attributes:
        driver: the default driver's name.
        workers: how many tasks may run at once (``None``: the CPU count).
        timeout: the default timeout of a `run()` call and of a deferred batch, in seconds.
        drain_timeout: how long shutdown waits for deferred work before abandoning it, in seconds.
        max_pending_deferred: how many deferred tasks may be pending at once (``None``: no bound).
        max_tasks_per_worker: `process` driver: replace a worker after this many tasks.
        idle_timeout: `process` driver: seconds after which an idle worker exits.
        max_worker_memory: `process` driver: bytes of RSS past which a worker is replaced.
        initializer: `process` driver: a callable each worker runs once at start-up.
        preload: `process` driver: modules each worker imports at start-up.
        dask_address: `dask` driver: the scheduler's address (``None``: an embedded LocalCluster).
    """

    driver: str = "process"
    workers: int | None = None
    timeout: float | None = None
    drain_timeout: float = 30.0
    max_pending_deferred: int | None = None
    max_tasks_per_worker: int | None = None
    idle_timeout: float | None = None
    max_worker_memory: int | None = None
    initializer: Callable[[], object] | None = None
    preload: Sequence[str] = ()
    dask_address: str | None = None

    @classmethod
    def resolve(cls, env_file: str | os.PathLike[str] | None, **arguments: Any) -> Settings:
        """Fill the arguments left as ``None`` from the environment, then from defaults; check them all.

        Raises:
            ConfigurationError: a value is invalid; the message names the argument or variable.
        """
        config = Config(os.fspath(env_file) if env_file is not None and os.path.isfile(env_file) else None)

        def pick(name: str, variable: str, cast: Callable[[str, str], Any]) -> Any:
            if arguments.get(name) is not None:
                return arguments[name]
            raw = config(variable, default=None)
            return cast(variable, raw) if raw not in (None, "") else None

        values = {
            "driver": pick("driver", "CONCURRENCY_DRIVER", lambda _, raw: raw.strip().lower()) or "process",
            "workers": positive("workers", pick("workers", "CONCURRENCY_WORKERS", _parse(int)), int),
            "timeout": positive("timeout", pick("timeout", "CONCURRENCY_TIMEOUT", _parse(float)), float),
            "dask_address": pick("dask_address", "CONCURRENCY_DASK_ADDRESS", lambda _, raw: raw.strip()),
        }
        drain_timeout = pick("drain_timeout", "CONCURRENCY_DRAIN_TIMEOUT", _parse(float))
        values["drain_timeout"] = 30.0 if drain_timeout is None else positive("drain_timeout", drain_timeout, float)
        for name, kind in [
            ("max_pending_deferred", int),
            ("max_tasks_per_worker", int),
            ("idle_timeout", float),
            ("max_worker_memory", int),
        ]:
            values[name] = positive(name, arguments.get(name), kind)
        initializer = arguments.get("initializer")
        if initializer is not None and not callable(initializer):
            raise ConfigurationError(f"initializer must be callable, not {type(initializer).__name__}")
        preload = arguments.get("preload") or ()
        if isinstance(preload, str) or not all(isinstance(module, str) for module in preload):
            raise ConfigurationError("preload must be a list of module names")
        return cls(**values, initializer=initializer, preload=tuple(preload))


def _parse(kind: type[T]) -> Callable[[str, str], T]:
    def parse(variable: str, raw: str) -> T:
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ConfigurationError(
                f"{variable} must be a positive {'integer' if kind is int else 'number'}, got {raw!r}"
            ) from None
        checked: T = positive(variable, value, kind)
        return checked

    return parse


def positive(name: str, value: Any, kind: type[T]) -> Any:
    """Check that an option is ``None`` or a positive number of the right kind.

    Raises:
        ConfigurationError: naming the option and the value.
    """
    if value is None:
        return None
    wrong_type = (
        isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and isinstance(value, float))
    )
    if wrong_type:
        raise ConfigurationError(f"{name} must be a positive {kind.__name__}, not {type(value).__name__} {value!r}")
    if not value > 0:  # also refuses NaN
        raise ConfigurationError(f"{name} must be positive, got {value!r}")
    return kind(value)
