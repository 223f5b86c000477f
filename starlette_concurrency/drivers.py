"""What a driver author needs: the interface, what a call hands over, what comes back.

```python
from starlette_concurrency.drivers import Driver, Outcome, Settings, Task

class ThreadDriver(Driver):
    name = "threads"

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        ...

concurrency.extend("threads", lambda settings: ThreadDriver())
```

`DriverOptions` is the base of a driver's options object, `TaskCounters` the counters behind `stats()`,
`NOT_STARTED` what a cancelled deferred task that never began is left with (see `Driver.execute_deferred`).
"""

from __future__ import annotations

from ._config import Settings
from ._drivers.base import Driver
from ._options import DriverOptions
from ._stats import TaskCounters
from ._tasks import NOT_STARTED, Outcome, Task

__all__ = ["NOT_STARTED", "Driver", "DriverOptions", "Outcome", "Settings", "Task", "TaskCounters"]
