"""Checks of option values, shared by the facade's settings and the drivers' options."""

from __future__ import annotations

import math
import re
from typing import Any, TypeVar

from ._exceptions import ConfigurationError

__all__ = ["MAX_SECONDS", "check_dask_address", "positive", "quote"]

T = TypeVar("T", int, float)

# The longest duration an option may give (every float option is a number of seconds): one day. Past it a
# timeout is no bound at all, and `inf` (or `1e400`, which parses to it) would make a drain wait forever.
MAX_SECONDS = 86_400.0

QUOTE_LIMIT = 40  # characters of a bad value an error message repeats; a 20 MB variable is not echoed whole


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """Return `value`'s repr for an error message, cut to its first `limit` characters; never raises."""
    if isinstance(value, str | bytes) and len(value) > limit:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:limit]!r}... ({len(value)} {unit})"
    try:
        text = repr(value)
    except Exception:  # an int too long to print, a repr that fails: say what it is instead
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def positive(name: str, value: Any, kind: type[T]) -> Any:
    """Check that an option is ``None`` or a positive number of the right kind.

    A float is a number of seconds: it must also be finite and at most `MAX_SECONDS` (``inf``, ``nan`` and
    ``1e400`` are refused with the accepted range).

    Raises:
        ConfigurationError: naming the option, the accepted range, and the value (a short prefix of it).
    """
    if value is None:
        return None
    wrong_type = (
        isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and isinstance(value, float))
    )
    if wrong_type:
        raise ConfigurationError(
            f"{name} must be a positive {kind.__name__}, not {type(value).__name__} {quote(value)}"
        )
    if kind is float and not (math.isfinite(value) and value <= MAX_SECONDS):
        raise ConfigurationError(
            f"{name} must be positive and at most {MAX_SECONDS:.0f} (seconds: one day), got {quote(value)}"
        )
    if not value > 0:
        raise ConfigurationError(f"{name} must be positive, got {quote(value)}")
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
            f"{name} must look like 'tcp://host:8786' or 'host:8786' (scheme://host:port), got {quote(value)}"
        )
    return address
