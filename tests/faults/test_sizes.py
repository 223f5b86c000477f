"""Big results, big closures, and calls of many tiny tasks."""

from __future__ import annotations

import functools

import pytest

from starlette_concurrency import Concurrency
from starlette_concurrency._drivers.process import ProcessDriver

from .. import helpers

pytestmark = pytest.mark.anyio

SIZE = 64 << 20


async def test_a_64_mib_result_and_a_64_mib_closure_arrive_whole() -> None:
    async with Concurrency(driver=ProcessDriver(2), env_file=None) as concurrency:
        result = await concurrency.run(functools.partial(helpers.big_bytes, SIZE))
        assert len(result) == SIZE
        assert result == helpers.big_bytes(SIZE)
        assert await concurrency.run(functools.partial(helpers.digest, result)) == helpers.digest(result)


async def test_a_call_of_20000_tiny_tasks_completes_in_order() -> None:
    async with Concurrency(driver=ProcessDriver(2), env_file=None) as concurrency:
        results = await concurrency.run([functools.partial(helpers.add, i, 1) for i in range(20_000)])
    assert results == list(range(1, 20_001))
