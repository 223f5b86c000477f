"""The `process` driver: a warm pool of fresh interpreters, each behind a private pair of pipes.

`_driver.py` is its public face and how a worker is started; `_pool.py` carries out what the pool's
state machine (`_machine.py`) decides; `_handle.py` is the parent's handle on one worker's pipes.
"""

from __future__ import annotations

from ._driver import ProcessDriver, create

__all__ = ["ProcessDriver", "create"]
