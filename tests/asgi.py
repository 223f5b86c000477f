"""Test utilities: drive an ASGI app's lifespan in-process, and serve an app with a real uvicorn."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
from starlette.types import Message

ROOT = Path(__file__).resolve().parent.parent

# Any ASGI app: Litestar's, for one, types its scopes and messages more narrowly than Starlette's ASGIApp.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class LifespanFailed(Exception):
    pass


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[list[Message]]:
    """Run the app's lifespan around the block, as a server would; yield the messages the app sent."""
    to_app, app_inbox = anyio.create_memory_object_stream[Message](4)
    sent: list[Message] = []
    started, stopped = anyio.Event(), anyio.Event()

    async def send(message: Message) -> None:
        sent.append(message)
        (started if message["type"].startswith("lifespan.startup") else stopped).set()

    failure: str | None = None
    async with anyio.create_task_group() as tg, to_app, app_inbox:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

        async def serve() -> None:
            try:
                await app(scope, app_inbox.receive, send)
            except Exception:
                # A failed startup is reported, then raised (as Starlette's router does): a server
                # logs it and exits; here LifespanFailed below carries the report.
                if not (sent and sent[-1]["type"] == "lifespan.startup.failed"):
                    raise

        tg.start_soon(serve)
        await to_app.send({"type": "lifespan.startup"})
        await started.wait()
        if sent[-1]["type"] == "lifespan.startup.failed":
            failure = sent[-1].get("message", "")
        else:
            try:
                yield sent
            finally:
                await to_app.send({"type": "lifespan.shutdown"})
                await stopped.wait()
    if failure is not None:
        raise LifespanFailed(failure)


def client(app: ASGIApp) -> httpx.AsyncClient:
    """An in-process HTTP client; app exceptions come back as 500s, as a server would send."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://app")


def read_marker(directory: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / f"{name}.json").read_text())
    return data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """A uvicorn process serving an app on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (as an orchestrator does), wait, and check that the shutdown was graceful."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        # uvicorn re-raises the signal it shut down on, so that its exit status tells the parent.
        assert returncode in (0, -signal.SIGTERM), f"uvicorn exited with {returncode}:\n{self.output()}"
        if "off" not in list(self.process.args)[-2:]:  # type: ignore[arg-type]  # `--lifespan off`: nothing to complete
            assert "Application shutdown complete." in self.output(), self.output()


@contextmanager
def uvicorn(app: str, log: Path, env: dict[str, str] | None = None, *options: str) -> Iterator[Server]:
    """Start `python -m uvicorn APP` on a free port and wait until it answers; stop it afterwards."""
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                app,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                *options,
            ],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {process.returncode}:\n{server.output()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        server.stop()


@contextmanager
def example_server(tmp_path: Path, **more: str) -> Iterator[Server]:
    """Serve `examples/app.py` with a 2-worker process pool, its logs and activity notes under `tmp_path`.

    `more`: further environment variables (``CONCURRENCY_JOURNAL=...``).
    """
    env = {
        "EXAMPLE_METRICS_LOG": str(tmp_path / "metrics.log"),
        "EXAMPLE_ACTIVITY_DIR": str(tmp_path / "activity"),
        "CONCURRENCY_WORKERS": "2",
        "CONCURRENCY_DRIVER": "process",
        **more,
    }
    with uvicorn("examples.app:app", tmp_path / "example.log", env) as server:
        yield server
