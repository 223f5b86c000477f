"""The public module for driver authors."""

from __future__ import annotations

import starlette_concurrency.drivers as drivers


def test_the_driver_authors_module_exports_exactly_its_names() -> None:
    assert drivers.__all__ == ["NOT_STARTED", "Driver", "DriverOptions", "Outcome", "Settings", "Task", "TaskCounters"]
    for name in drivers.__all__:
        assert getattr(drivers, name).__doc__
