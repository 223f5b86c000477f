"""A module that will not import while the file named by SC_FLAKY_IMPORT_MARKER exists (a config not mounted yet)."""

from __future__ import annotations

import os

_marker = os.environ.get("SC_FLAKY_IMPORT_MARKER")
if _marker and os.path.exists(_marker):
    raise ImportError("config not mounted")


def _helper() -> int:
    return 42


# A lambda: it travels as a skeleton whose globals name `_helper`, which a worker imports from here.
answer = lambda: _helper()  # noqa: E731
