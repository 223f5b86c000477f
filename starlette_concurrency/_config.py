"""Settings: explicit arguments first, then `CONCURRENCY_*` environment variables (or a `.env` file)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from starlette.config import Config

from ._checks import check_dask_address, positive, quote
from ._exceptions import ConfigurationError
from ._options import DaskOptions, DriverOptions

__all__ = [
    "KNOWN_VARIABLES",
    "Settings",
    "check_journal",
    "check_workers",
    "default_workers",
    "options_list",
    "usable_cpus",
]

T = TypeVar("T", int, float)
OptionsT = TypeVar("OptionsT", bound=DriverOptions)

# Every variable this package reads. A `CONCURRENCY_*` name not listed here is most likely a typo.
KNOWN_VARIABLES = {
    "CONCURRENCY_DRIVER",
    "CONCURRENCY_WORKERS",
    "CONCURRENCY_TIMEOUT",
    "CONCURRENCY_DRAIN_TIMEOUT",
    "CONCURRENCY_DASK_ADDRESS",
    "CONCURRENCY_JOURNAL",
    # Read by the dask driver (`_drivers/_dask_security.py`) for a TLS-secured external cluster.
    "CONCURRENCY_DASK_TLS_CA_FILE",
    "CONCURRENCY_DASK_TLS_CERT",
    "CONCURRENCY_DASK_TLS_KEY",
}

# `Concurrency(env_file=...)`'s default: a missing `.env` is normal, any other missing file is a mistake.
DEFAULT_ENV_FILE = ".env"

# How many workers one usable CPU may have; past it a pool costs more to start than it can give.
WORKERS_PER_CPU = 64

# Names already warned about in this process, so that a typo warns once, not at every `Concurrency()`.
_warned: set[str] = set()


def usable_cpus(root: str | os.PathLike[str] = "/") -> int:
    """Count the CPUs this process may actually use: its affinity mask, capped by a cgroup CPU quota.

    Args:
        root: where the file system starts (tests point it at a fake ``/proc`` and ``/sys``).

    Returns:
        At least 1; ``os.cpu_count()`` where the platform has no affinity mask.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS has no affinity mask
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(Path(root))
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


@functools.cache
def default_workers() -> int:
    """Return the default pool size: this process's usable CPUs, read once per process."""
    return usable_cpus()


def _cgroup_quota(root: Path) -> float | None:
    """The smallest CPU quota (in CPUs) of this process's cgroup and its ancestors, or ``None``."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: cpu.max says "<quota> <period>" or "max <period>"
            for directory in _ancestors(root / "sys/fs/cgroup", path):
                quotas += _ratio(directory / "cpu.max", None)
        elif "cpu" in controllers.split(","):  # cgroup v1: cpu.cfs_quota_us is -1 when unlimited
            for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                for directory in _ancestors(root / "sys/fs/cgroup" / mount, path):
                    quotas += _ratio(directory / "cpu.cfs_quota_us", directory / "cpu.cfs_period_us")
    return min(quotas) if quotas else None


def _ancestors(base: Path, path: str) -> Iterable[Path]:
    parts = [part for part in path.split("/") if part and part != ".."]
    for depth in range(len(parts), -1, -1):
        yield base.joinpath(*parts[:depth])


def _ratio(quota_file: Path, period_file: Path | None) -> list[float]:
    try:
        fields = quota_file.read_text().split()
        if period_file is not None:
            fields += period_file.read_text().split()
        quota, period = float(fields[0]), float(fields[1])
    except (OSError, ValueError, IndexError):  # absent, "max", or unreadable: no quota here
        return []
    return [quota / period] if quota > 0 and period > 0 else []


def check_workers(name: str, value: Any) -> int | None:
    """Check a worker count: ``None``, or a positive integer no larger than the limit.

    The limit is `WORKERS_PER_CPU` (64) times the usable CPUs: more workers than that cost more memory
    and start-up time than they could return, even for I/O-bound tasks.

    Args:
        name: the argument or variable the value came from, for the error message.
        value: the value to check.

    Returns:
        The value as an ``int``, or ``None``.

    Raises:
        ConfigurationError: naming `name`, the value and the limit.
    """
    workers: int | None = positive(name, value, int)
    if workers is None or workers <= WORKERS_PER_CPU:  # within the limit on any machine: no need to read /proc
        return workers
    limit = WORKERS_PER_CPU * default_workers()
    if workers > limit:
        raise ConfigurationError(
            f"{name} must be at most {limit} ({WORKERS_PER_CPU} per usable CPU), got {quote(workers)}"
        )
    return workers


@dataclass(frozen=True, slots=True)
class Settings:
    """The resolved configuration of a `Concurrency`, handed to every driver factory.

    Attributes:
        driver: the default driver's name.
        workers: how many tasks may run at once (default: the CPUs this process may use).
        timeout: the default timeout of a `run()` call and of a deferred batch, in seconds.
        drain_timeout: how long shutdown waits for deferred work before abandoning it, in seconds.
        max_pending_deferred: how many deferred tasks may be pending at once (``None``: no bound).
        journal: the SQLite file deferred work is written to before it starts, and replayed from at
            the next start (``None``: deferred work is not durable).
        options: the drivers' options objects, one per type; read them with `options_for()`.
        variables: every ``CONCURRENCY_*`` variable set, from the environment or else the `.env` file,
            for drivers that read variables of their own (the dask driver's ``CONCURRENCY_DASK_TLS_*``).
    """

    driver: str = "process"
    workers: int = field(default_factory=usable_cpus)
    timeout: float | None = None
    drain_timeout: float = 20.0
    max_pending_deferred: int | None = None
    journal: str | None = None
    options: tuple[DriverOptions, ...] = ()
    variables: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def options_for(self, kind: type[OptionsT]) -> OptionsT:
        """Return the options of type `kind` the facade was given, or `kind`'s defaults.

        Args:
            kind: a `DriverOptions` subclass, e.g. `ProcessOptions` or a custom driver's own.
        """
        for options in self.options:
            if isinstance(options, kind):
                return options
        return kind()

    @classmethod
    def resolve(
        cls,
        env_file: str | os.PathLike[str] | None,
        options: DriverOptions | Iterable[DriverOptions] | None = None,
        **arguments: Any,
    ) -> Settings:
        """Fill the arguments left as ``None`` from the environment, then from defaults; check them all.

        Args:
            env_file: a `.env` file to read. Missing, it is skipped: silently when it is the default
                ``".env"``, with a warning when it was named explicitly.
            options: a driver's options object, or several, at most one of each type.
            arguments: the `Concurrency` arguments, ``None`` where not given.

        Returns:
            The settings, every default resolved (`workers` is a number).

        Raises:
            ConfigurationError: a value is invalid, or the `.env` file is not UTF-8; the message names
                the argument, the variable, or the file and line.
        """
        # Starlette's own file reading (its `encoding` argument came in 0.49) is not used: `_read_env_file`
        # reads the same format, and `export NAME=value` lines as python-dotenv does.
        config = Config()
        config.file_values = _read_env_file(env_file)
        _warn_about_unknown_variables([*os.environ, *config.file_values], env_file)

        def pick(name: str, variable: str, cast: Callable[[str, str], Any]) -> Any:
            if arguments.get(name) is not None:
                return arguments[name]
            raw = config(variable, default=None)
            return cast(variable, raw) if raw not in (None, "") else None

        # An argument is checked under its own name, a variable under the variable's.
        workers = check_workers("workers", arguments.get("workers")) or pick(
            "workers", "CONCURRENCY_WORKERS", lambda variable, raw: check_workers(variable, _parse(int)(variable, raw))
        )
        drain_timeout = pick("drain_timeout", "CONCURRENCY_DRAIN_TIMEOUT", _parse(float))
        return cls(
            driver=pick("driver", "CONCURRENCY_DRIVER", lambda _, raw: raw.strip().lower()) or "process",
            workers=default_workers() if workers is None else workers,
            timeout=positive("timeout", pick("timeout", "CONCURRENCY_TIMEOUT", _parse(float)), float),
            drain_timeout=20.0 if drain_timeout is None else positive("drain_timeout", drain_timeout, float),
            max_pending_deferred=positive("max_pending_deferred", arguments.get("max_pending_deferred"), int),
            journal=check_journal("journal", arguments.get("journal"))
            or pick("journal", "CONCURRENCY_JOURNAL", _journal_path),
            options=_with_environment(_distinct(options_list(options)), config),
            variables={
                name: value
                for name, value in {**config.file_values, **os.environ}.items()
                if name.startswith("CONCURRENCY_")
            },
        )


def options_list(options: object) -> list[DriverOptions]:
    """Return `options` as a list: it is one driver options object, an iterable of them, or ``None``."""
    if options is None:
        return []
    if isinstance(options, DriverOptions):
        return [options]
    if isinstance(options, str | bytes | Mapping) or not isinstance(options, Iterable):
        raise ConfigurationError(
            "options must be a driver options object such as ProcessOptions(max_tasks_per_worker=100), "
            f"or a list of them, not {type(options).__name__}"
        )
    return list(options)


def _distinct(options: Iterable[DriverOptions]) -> tuple[DriverOptions, ...]:
    """Check that `options` holds driver options, at most one object of each type."""
    seen: dict[type, DriverOptions] = {}
    for item in options:
        if not isinstance(item, DriverOptions):
            raise ConfigurationError(
                f"options must be driver options such as ProcessOptions(...) or DaskOptions(...), "
                f"not {type(item).__name__} {item!r}"
            )
        if type(item) in seen:
            raise ConfigurationError(f"options holds two {type(item).__name__} objects; give one")
        seen[type(item)] = item
    return tuple(seen.values())


def _with_environment(options: tuple[DriverOptions, ...], config: Config) -> tuple[DriverOptions, ...]:
    """Fill the dask driver's address from ``CONCURRENCY_DASK_ADDRESS`` when its options give none."""
    dask = next((item for item in options if isinstance(item, DaskOptions)), DaskOptions())
    raw = config("CONCURRENCY_DASK_ADDRESS", default=None)
    if dask.address is not None or raw in (None, ""):
        return options
    address = check_dask_address("CONCURRENCY_DASK_ADDRESS", raw)
    return (*(item for item in options if item is not dask), dataclasses.replace(dask, address=address))


def _read_env_file(env_file: str | os.PathLike[str] | None) -> dict[str, str]:
    """Read a `.env` file as `starlette.config.Config` does, and ``export NAME=value`` lines too.

    ``NAME=value`` lines are read (the value stripped of spaces and quotes), others are skipped, as
    Starlette does; a first word ``export`` is dropped, as python-dotenv does, so that a file the shell
    can `source` sets the same values. A later line wins.

    Raises:
        ConfigurationError: the file is not UTF-8; the message names the file, line and byte.
    """
    if env_file is None:
        return {}
    path = os.fspath(env_file)
    if not os.path.isfile(path):
        if path != DEFAULT_ENV_FILE:
            # A warning, not an error: the real environment may carry every setting (a container
            # without its .env); but a path someone typed that does not exist is worth saying.
            warnings.warn(f"env_file {path!r} does not exist; no CONCURRENCY_* settings read from it", stacklevel=4)
        return {}
    values: dict[str, str] = {}
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is dropped
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise ConfigurationError(
                    f"{path}, line {number}: not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                    "save the file as UTF-8"
                ) from None
            if "=" not in line or line.startswith("#"):
                continue
            key, value = (part.strip() for part in line.split("=", 1))
            words = key.split(maxsplit=1)
            if len(words) == 2 and words[0] == "export":
                key = words[1]
            values[key] = value.strip("\"'")
    return values


def _warn_about_unknown_variables(names: Iterable[str], env_file: str | os.PathLike[str] | None) -> None:
    for name in names:
        if not name.startswith("CONCURRENCY_") or name in KNOWN_VARIABLES or name in _warned:
            continue
        _warned.add(name)
        # Compare what follows the prefix, which every name shares and would make anything look close.
        prefix = len("CONCURRENCY_")
        close = difflib.get_close_matches(name[prefix:], sorted(known[prefix:] for known in KNOWN_VARIABLES), n=1)
        hint = f"did you mean CONCURRENCY_{close[0]}?" if close else f"known: {', '.join(sorted(KNOWN_VARIABLES))}"
        where = "the environment" if name in os.environ or env_file is None else repr(os.fspath(env_file))
        warnings.warn(f"unknown setting {name} in {where} is ignored; {hint}", stacklevel=4)


def check_journal(name: str, value: object) -> str | None:
    """Check a journal path: ``None``, or a non-empty `str` or `os.PathLike`; return it as a `str`.

    Raises:
        ConfigurationError: naming `name` and what was given.
    """
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise ConfigurationError(f"{name} must be a file path (str or os.PathLike), not {type(value).__name__}")
    path = os.fspath(value)
    if not isinstance(path, str) or not path.strip():
        raise ConfigurationError(f"{name} must be a file path such as 'deferred.db', got {quote(path)}")
    if path.strip() == ":memory:":
        raise ConfigurationError(f"{name} must be a file: an in-memory journal would not survive a crash")
    return path


def _journal_path(variable: str, raw: str) -> str | None:
    return check_journal(variable, raw.strip())


def _parse(kind: type[T]) -> Callable[[str, str], T]:
    def parse(variable: str, raw: str) -> T:
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ConfigurationError(
                f"{variable} must be a positive {'integer' if kind is int else 'number'}, got {quote(raw)}"
            ) from None
        checked: T = positive(variable, value, kind)
        return checked

    return parse


# Read the CPUs at import, so that a facade or a driver built inside an event loop reads no file there.
default_workers()
