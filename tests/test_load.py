"""The example app under uvicorn with 200 concurrent clients: nothing fails, nothing leaks.

Bounded in time (LOAD_SECONDS of load) and in traffic (127.0.0.1 only). The figures it prints
(`-s` shows them) are the ones quoted in the README's reliability section.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import psutil
import pytest

from . import helpers
from .asgi import uvicorn

pytestmark = pytest.mark.anyio

CLIENTS = 200
LOAD_SECONDS = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the clients' side; the server is uvicorn (asyncio) in its own process


def snapshot(server: psutil.Process) -> tuple[set[int], int, int]:
    """Worker pids, open file descriptors and resident memory of the server."""
    return {child.pid for child in server.children()}, server.num_fds(), server.memory_info().rss


async def test_two_hundred_concurrent_clients(tmp_path: Path) -> None:
    env = {"EXAMPLE_METRICS_LOG": str(tmp_path / "metrics.log"), "CONCURRENCY_WORKERS": "2"}
    # Keep-alive connections must outlive the test: when uvicorn closes an idle one (after 5 s by
    # default, which a slow run reaches) just as a client reuses it, the client sees a ReadError that
    # says nothing about this package.
    with uvicorn("examples.app:app", tmp_path / "server.log", env, "--timeout-keep-alive", "120") as server:
        process = psutil.Process(server.process.pid)
        statuses: dict[int, int] = {}
        errors: list[str] = []
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)

        async def client(http: httpx.AsyncClient, deadline: float) -> None:
            while anyio.current_time() < deadline:
                try:
                    response = await http.get("/api/quick")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                else:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        # Warm up (the server's imports and caches) before the baseline; connections closed each time.
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            await client(http, anyio.current_time() + 1)
        await helpers.eventually(lambda: process.num_fds() == snapshot(process)[1])
        workers_before, fds_before, rss_before = snapshot(process)
        peak_fds = 0

        async def sample(deadline: float) -> None:
            nonlocal peak_fds
            while anyio.current_time() < deadline:
                peak_fds = max(peak_fds, process.num_fds())
                await anyio.sleep(0.1)

        deadline = anyio.current_time() + LOAD_SECONDS
        async with (
            httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as http,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(sample, deadline)
            for _ in range(CLIENTS):
                tg.start_soon(client, http, deadline)
        # The server closes its side of the clients' connections as it notices them go.
        await helpers.eventually(lambda: process.num_fds() <= fds_before)
        workers_after, fds_after, rss_after = snapshot(process)
        server.stop()

    metrics = len((tmp_path / "metrics.log").read_text().splitlines())
    requests = sum(statuses.values())
    print(
        f"\n{requests} requests from {CLIENTS} clients in {LOAD_SECONDS:.0f} s: {statuses}, {len(errors)} errors; "
        f"{metrics} deferred metrics written; fds {fds_before} -> {peak_fds} (under load) -> {fds_after}; "
        f"rss {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
    )
    assert errors == []
    assert set(statuses) == {200}
    assert metrics == requests  # every deferred task accepted ran, drained at shutdown at the latest
    assert workers_after == workers_before, "workers were replaced or leaked under load"
    assert len(workers_before) == 2
    assert peak_fds > CLIENTS, "the clients were not all connected at once"
    assert rss_after - rss_before < 32 * 2**20, f"server memory grew: {rss_before} -> {rss_after}"
    assert not any(psutil.pid_exists(pid) for pid in workers_before), "workers outlived the server"
