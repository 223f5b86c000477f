"""What a driver author needs: the interface, what a call hands over, what comes back.

```python
from starlette_concurrency.drivers import Driver, Outcome, Settings, Task

class ThreadDriver(Driver):
    name = "threads"

    async def execute(self, tasks: Sequence[Task], outcomes: list[Outcome | None]) -> None:
        ...

concurrency.extend("threads", lambda settings: ThreadDriver())
```

`DriverOptions` is the base of a driver's options object, `TaskCounters` the counters behind `stats()`.
"""

from __future__ import annotations

from ._config import Settings
from ._drivers.base import Driver
from ._options import DriverOptions
from ._stats import TaskCounters
from ._tasks import Outcome, Task

__all__ = ["Driver", "DriverOptions", "Outcome", "Settings", "Task", "TaskCounters"]
