"""A module that takes 1.2 s to import: a worker whose first task lives here must warn about it once."""

import time

time.sleep(1.2)


def answer() -> int:
    return 42
