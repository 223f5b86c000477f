"""A minimal multiplexed process pool: the yardstick `bench/http.py` measures our process driver against.

N workers started once, one pipe pair each (their stdin and stdout). Calls share one FIFO of tasks,
each task pickled once with cloudpickle; an idle worker is sent one frame (4-byte length, then a
pickled list of pickled tasks) holding its share of the queue, and answers with one frame of
``(ok, value)`` pairs. asyncio only; no cancellation, no crash handling, no timeouts.
"""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle  # type: ignore[import-untyped]


class _Call:
    def __init__(self, size: int) -> None:
        self.results: list[Any] = [None] * size
        self.left = size
        self.future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()


class _Worker:
    def __init__(self) -> None:
        command = [sys.executable, "-c", "from bench._reference_pool import serve; serve()"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.write, self.read = self.process.stdin.fileno(), self.process.stdout.fileno()
        os.set_blocking(self.read, False)
        self.buffer = bytearray()
        self.held: list[tuple[_Call, int]] = []


class ReferencePool:
    def __init__(self, workers: int) -> None:
        self.queue: deque[tuple[bytes, _Call, int]] = deque()
        self.workers = [_Worker() for _ in range(workers)]
        self.idle = list(self.workers)
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            loop.add_reader(worker.read, self.readable, worker)

    async def run(self, tasks: Sequence[Callable[[], Any]]) -> list[Any]:
        call = _Call(len(tasks))
        self.queue.extend((cloudpickle.dumps(task), call, index) for index, task in enumerate(tasks))
        self.dispatch()
        return await call.future

    def dispatch(self) -> None:
        while self.queue and self.idle:
            share = math.ceil(len(self.queue) / len(self.idle))
            worker = self.idle.pop()
            items = [self.queue.popleft() for _ in range(share)]
            worker.held = [(call, index) for _, call, index in items]
            frame = pickle.dumps([blob for blob, _, _ in items], protocol=5)
            os.write(worker.write, len(frame).to_bytes(4, "little") + frame)  # small: fits the pipe

    def readable(self, worker: _Worker) -> None:
        data = os.read(worker.read, 65536)
        if not data:  # the worker is gone: no crash handling here, but no busy loop either
            asyncio.get_running_loop().remove_reader(worker.read)
            return
        worker.buffer += data
        if len(worker.buffer) < 4 or len(worker.buffer) < 4 + (size := int.from_bytes(worker.buffer[:4], "little")):
            return
        answers, worker.buffer = pickle.loads(worker.buffer[4 : 4 + size]), worker.buffer[4 + size :]
        for (call, index), (ok, value) in zip(worker.held, answers, strict=True):
            if not ok and not call.future.done():
                call.future.set_exception(value)
            call.results[index], call.left = value, call.left - 1
            if call.left == 0 and not call.future.done():
                call.future.set_result(call.results)
        self.idle.append(worker)
        self.dispatch()

    def close(self) -> None:
        for worker in self.workers:
            asyncio.get_running_loop().remove_reader(worker.read)
            os.close(worker.write)  # the worker reads EOF and exits
            worker.process.wait()
            os.close(worker.read)


def serve() -> None:
    """The worker: read a frame of tasks from stdin, run them in order, write one frame of answers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the server's to handle; EOF stops us
    while header := _read(4):
        answers: list[tuple[bool, Any]] = []
        for blob in pickle.loads(_read(int.from_bytes(header, "little"))):
            try:
                answers.append((True, pickle.loads(blob)()))
            except Exception as exc:
                answers.append((False, exc))
        frame = pickle.dumps(answers, protocol=5)
        os.write(1, len(frame).to_bytes(4, "little") + frame)  # small: fits the pipe


def _read(size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := os.read(0, size - len(data))):
        data += chunk
    return data
