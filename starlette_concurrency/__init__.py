"""Run closures at the same time in worker processes, and defer work until after the response.

```python
from starlette_concurrency import Concurrency, ConcurrencyMiddleware

concurrency = Concurrency()
users, orders = await concurrency.run([lambda: count("users"), lambda: count("orders")])
concurrency.defer([lambda: report("users")])
```
"""

from ._api import Concurrency
from ._config import Settings
from ._context import Deferral, current_deferral
from ._deferred import RequestBatch
from ._drivers.base import Driver
from ._exceptions import (
    ClientDisconnected,
    ConcurrencyClosed,
    ConcurrencyError,
    ConfigurationError,
    DeferralRejected,
    DriverError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
    WorkerStartFailed,
    WrongContext,
)
from ._middleware import ConcurrencyMiddleware
from ._options import DaskOptions, DriverOptions, ProcessOptions
from ._runtime import DriverFactory
from ._stats import Stats
from ._tasks import Outcome, Task
from ._wsgi import ConcurrencyWSGIMiddleware

__version__ = "0.1.0"

__all__ = [
    "ClientDisconnected",
    "Concurrency",
    "ConcurrencyClosed",
    "ConcurrencyError",
    "ConcurrencyMiddleware",
    "ConcurrencyWSGIMiddleware",
    "ConfigurationError",
    "DaskOptions",
    "Deferral",
    "DeferralRejected",
    "Driver",
    "DriverError",
    "DriverFactory",
    "DriverOptions",
    "Outcome",
    "ProcessOptions",
    "RemoteError",
    "RemoteTraceback",
    "RequestBatch",
    "SerializationError",
    "Settings",
    "Stats",
    "Task",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerStartFailed",
    "WrongContext",
    "__version__",
    "current_deferral",
]

# Show public classes as `starlette_concurrency.X` in reprs and tracebacks, as httpx does.
for _name in __all__:
    if isinstance(globals()[_name], type):
        globals()[_name].__module__ = "starlette_concurrency"
del _name
