"""Driver options: one frozen object per driver, checked once, when it is made.

The facade does not know what a driver can be told: it forwards whatever options objects it is given
(`Concurrency(options=ProcessOptions(...))`) in `Settings.options`, and each driver's factory picks
its own with `Settings.options_for()`. A custom driver does the same with a `DriverOptions` subclass
of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from ._checks import check_dask_address, positive
from ._exceptions import ConfigurationError

__all__ = ["DaskOptions", "DeprecatedKeywords", "DriverOptions", "ProcessOptions", "with_deprecated_keywords"]


@dataclass(frozen=True, slots=True)
class DriverOptions:
    """The base of every driver's options, so that the facade can tell them from anything else.

    Subclass it (as a frozen dataclass whose fields all have defaults) for a custom driver's options;
    the driver's factory reads them with ``settings.options_for(MyOptions)``.
    """


@dataclass(frozen=True, slots=True)
class ProcessOptions(DriverOptions):
    """Options of the `process` driver (the warm pool); checked when made.

    Args:
        max_tasks_per_worker: replace a worker after it ran this many tasks (default: never).
        idle_timeout: seconds after which an idle worker exits; it is started again on demand.
        max_worker_memory: bytes of resident memory past which a worker is replaced after its task
            (Linux; checked between tasks, not during one).
        initializer: a zero-argument callable each worker runs once at start-up (it must pickle).
        preload: modules each worker imports at start-up, so that the first task does not pay for it.
        cancel_grace: seconds a task whose call was cancelled (a timeout, a client gone) may still run
            before its worker is killed; its answer is discarded. A short task ends within it and its
            worker lives on (default 0.1).
        start_timeout: seconds tasks wait for a worker while none can start (each failed start is
            logged and tried again with a backoff); then they fail with `WorkerStartFailed` (default 10).
        forward_logs: send what tasks log (the `logging` module's records) to the server's loggers of
            the same names, with the task's label, key, worker pid and request as record attributes
            (default True). False: a worker's records go to its own handlers (stderr by default).

    Raises:
        ConfigurationError: an option is not a positive number, not callable, or not module names;
            the message names the option.
    """

    max_tasks_per_worker: int | None = None
    idle_timeout: float | None = None
    max_worker_memory: int | None = None
    initializer: Callable[[], object] | None = None
    preload: Sequence[str] = ()
    cancel_grace: float = 0.1
    start_timeout: float = 10.0
    forward_logs: bool = True

    def __post_init__(self) -> None:
        for name, kind in [("max_tasks_per_worker", int), ("idle_timeout", float), ("max_worker_memory", int)]:
            _set(self, name, positive(f"ProcessOptions.{name}", getattr(self, name), kind))
        for name in ("cancel_grace", "start_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ConfigurationError(f"ProcessOptions.{name} must be a number of seconds >= 0, got {value!r}")
            _set(self, name, float(value))
        if self.initializer is not None and not callable(self.initializer):
            raise ConfigurationError(
                f"ProcessOptions.initializer must be callable, not {type(self.initializer).__name__}"
            )
        if not isinstance(self.forward_logs, bool):
            raise ConfigurationError(f"ProcessOptions.forward_logs must be True or False, got {self.forward_logs!r}")
        preload: Any = self.preload
        modules = () if preload is None else tuple(preload) if not isinstance(preload, str | bytes) else None
        if modules is None or not all(isinstance(module, str) and module.strip() for module in modules):
            raise ConfigurationError(f"ProcessOptions.preload must be a list of module names, got {preload!r}")
        _set(self, "preload", modules)


@dataclass(frozen=True, slots=True)
class DaskOptions(DriverOptions):
    """Options of the `dask` driver; checked when made.

    Args:
        address: the scheduler's address (``tcp://host:8786``, ``tls://host:8786`` or ``host:8786``).
            Default: ``CONCURRENCY_DASK_ADDRESS``, else an embedded LocalCluster of `workers` processes.
        security: a `distributed.Security` for a TLS connection to the cluster at `address`. Default:
            built from ``CONCURRENCY_DASK_TLS_CA_FILE`` / ``_CERT`` / ``_KEY`` if set. The embedded
            cluster always has certificates of its own.

    Raises:
        ConfigurationError: the address is not of the form ``scheme://host:port``; `security` is not a
            `distributed.Security`.
    """

    address: str | None = None
    security: Any = None

    def __post_init__(self) -> None:
        _set(self, "address", check_dask_address("DaskOptions.address", self.address))
        if self.security is not None:
            try:
                from distributed import Security
            except ImportError:
                raise ConfigurationError(
                    "DaskOptions.security needs Dask distributed: pip install 'starlette-concurrency[dask]'"
                ) from None
            if not isinstance(self.security, Security):
                raise ConfigurationError(
                    f"DaskOptions.security must be a distributed.Security, not {type(self.security).__name__}"
                )


class DeprecatedKeywords(TypedDict, total=False):
    """The deprecated keywords of `Concurrency` (0.1's first design), each now a field of a driver's options object."""

    max_tasks_per_worker: int | None
    idle_timeout: float | None
    max_worker_memory: int | None
    initializer: Callable[[], object] | None
    preload: Sequence[str]
    dask_address: str | None


# Where each of them went: accepted, with a DeprecationWarning, until the next release.
_DEPRECATED_KEYWORDS: dict[str, tuple[type[DriverOptions], str]] = {
    "max_tasks_per_worker": (ProcessOptions, "max_tasks_per_worker"),
    "idle_timeout": (ProcessOptions, "idle_timeout"),
    "max_worker_memory": (ProcessOptions, "max_worker_memory"),
    "initializer": (ProcessOptions, "initializer"),
    "preload": (ProcessOptions, "preload"),
    "dask_address": (DaskOptions, "address"),
}


def with_deprecated_keywords(options: list[DriverOptions], keywords: dict[str, Any]) -> list[DriverOptions]:
    """Add to `options` what the deprecated keywords of `Concurrency` say, warning of each keyword.

    Raises:
        TypeError: a keyword that never existed.
        ConfigurationError: a wrong value (before any warning), or a driver's options given both ways.
    """
    fields: dict[type[DriverOptions], dict[str, Any]] = {}
    for keyword, value in keywords.items():
        if keyword not in _DEPRECATED_KEYWORDS:
            raise TypeError(f"Concurrency() got an unexpected keyword argument {keyword!r}")
        kind, name = _DEPRECATED_KEYWORDS[keyword]
        if value is not None:
            fields.setdefault(kind, {})[name] = value
    for kind, values in fields.items():
        if any(isinstance(item, kind) for item in options):
            raise ConfigurationError(f"give {kind.__name__} either in options= or as keywords, not both")
        options.append(kind(**values))  # checked before the warning: a wrong value is an error first
    for keyword in keywords:
        kind, name = _DEPRECATED_KEYWORDS[keyword]
        warnings.warn(
            f"Concurrency({keyword}=...) is deprecated; pass options={kind.__name__}({name}=...)",
            DeprecationWarning,
            stacklevel=3,
        )
    return options


def _set(options: DriverOptions, name: str, value: object) -> None:
    # A frozen dataclass normalises its own fields in __post_init__ the way dataclasses document it.
    object.__setattr__(options, name, value)
