"""The example's server-sent events endpoint streams each count as `as_completed()` gives it (issue 24)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from .asgi import example_server


def test_progress_streams_one_event_per_count_then_done(tmp_path: Path) -> None:
    with example_server(tmp_path) as example, httpx.stream("GET", f"{example.url}/api/progress", timeout=60) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith('data: {"')]
    assert sorted(event["what"] for event in events) == ["invoices", "orders", "primes below 200k", "users"]
    assert all(event["count"] > 0 for event in events)
    assert lines[-2:] == ["event: done", "data: {}"]
