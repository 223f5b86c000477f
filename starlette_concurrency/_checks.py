"""Checks of option values, shared by the facade's settings and the drivers' options."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from ._exceptions import ConfigurationError

__all__ = ["check_dask_address", "positive"]

T = TypeVar("T", int, float)


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


_DASK_ADDRESS = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


def check_dask_address(name: str, value: Any) -> str | None:
    """Check the form of a Dask scheduler address: ``scheme://host:port`` or ``host:port``.

    Args:
        name: the argument or variable the value came from, for the error message.
        value: the address, or ``None`` for an embedded cluster.

    Returns:
        The address without surrounding blanks, or ``None``.

    Raises:
        ConfigurationError: naming `name` and the value.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string such as 'tcp://host:8786', not {type(value).__name__}")
    address = value.strip()
    match = _DASK_ADDRESS.fullmatch(address)
    if match is None or not 0 < int(match.group(1)) < 65536:
        raise ConfigurationError(
            f"{name} must look like 'tcp://host:8786' or 'host:8786' (scheme://host:port), got {value!r}"
        )
    return address
