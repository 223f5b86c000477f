"""The cancellation benchmark of `bench/cancellation.py`: what cancelling short calls costs the pool.

For each kind of work — two closures of about 1 ms of CPU, two lambdas of microseconds, written as
users write them (lambdas in an importable module, calling `_work` or capturing a local) — a number
of users call `concurrency.run()` of two tasks in a loop, on the ``process`` driver with 2 workers,
for `--duration` seconds, twice:

- the baseline: no call is cancelled;
- the cancelling run: 4 calls in 5 (the same ones every time) run under `anyio.move_on_after` of a
  few milliseconds, drawn per call.

If cancelling were free, the cancelling run would still complete its uncancelled calls — 1 in 5 —
at the baseline's rate: 20 % of the baseline's count (the yardstick the issue sets; a cheaper pool
does better, since the cancelled calls' queued tasks are dropped). A cancelled call's task that a
worker already runs gets `cancel_grace` (0.1 s) to answer before the worker is killed: none of these
tasks comes near it, so a kill is a cost the pool should not pay. Goals: completed calls ≥ 0.8x the
free-cancellation share; workers killed ≤ 1 % of the cancellations.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from starlette_concurrency import Concurrency
from starlette_concurrency._drivers.process import ProcessDriver

from . import _proc, _work
from ._stats import fmt, machine, median, table, verdict

WORKERS = 2
CANCELLED = 4  # calls in every 5 run under a deadline
SHARE = 1 - CANCELLED / 5  # what a free cancellation leaves: the uncancelled calls
COMPLETED_GOAL = 0.8  # of that share
KILLS_GOAL = 0.01  # workers killed per cancellation, at most
Tasks = list[Callable[[], Any]]


def closures_of(loops: int) -> Callable[[int], Tasks]:
    def tasks(index: int) -> Tasks:
        return [lambda: _work.burn(loops), lambda: _work.burn(loops)]

    return tasks


def tiny_lambdas(index: int) -> Tasks:
    return [lambda: index + 1, lambda: index * 2]


@dataclass
class Kind:
    label: str
    tasks: Callable[[int], Tasks]  # the two tasks of a user's call number `index`
    users: int
    deadline: tuple[float, float]  # seconds: a cancelled call's deadline is drawn from this range


@dataclass
class Tally:
    completed: int = 0  # calls never meant to be cancelled that returned their results in time
    outran: int = 0  # calls under a deadline that returned before it
    cancelled: int = 0  # calls their deadline cancelled
    errors: int = 0
    kills: int = 0  # worker_restarts during the run
    timed_out: int = 0  # tasks the pool counted as stopped by a cancellation
    workers_cpu: float = 0.0  # seconds of CPU the workers used during the run
    server_cpu: float = 0.0  # seconds of CPU this process (the callers and the pool's server side) used

    @property
    def calls(self) -> int:
        return self.completed + self.outran + self.cancelled


@dataclass
class Rounds:
    baseline: list[Tally] = field(default_factory=list)
    cancelling: list[Tally] = field(default_factory=list)


async def timed(concurrency: Concurrency, kind: Kind, seconds: float, cancelling: bool, seed: int) -> Tally:
    """`kind.users` users calling run() in a loop for `seconds`; 4 calls in 5 cancelled if `cancelling`."""
    await settle(concurrency)
    tally = Tally()
    draw = random.Random(seed)
    before, stats = _proc.snapshot(os.getpid()), concurrency.stats()
    end = time.perf_counter() + seconds

    async def user(number: int) -> None:
        index = number  # users start at different places in the 1-in-5 cycle
        while time.perf_counter() < end:
            index += 1
            tasks = kind.tasks(index)
            try:
                if cancelling and index % 5 < CANCELLED:
                    with anyio.move_on_after(draw.uniform(*kind.deadline)) as scope:
                        await concurrency.run(tasks)
                    if scope.cancelled_caught:
                        tally.cancelled += 1
                    else:
                        tally.outran += time.perf_counter() <= end
                else:
                    await concurrency.run(tasks)
                    tally.completed += time.perf_counter() <= end
            except Exception:
                tally.errors += 1

    async with anyio.create_task_group() as tg:
        for number in range(kind.users):
            tg.start_soon(user, number)
    await settle(concurrency)  # the cancelled calls' tasks still running finish, or their workers go
    after = concurrency.stats()
    tally.kills = after.worker_restarts - stats.worker_restarts
    tally.timed_out = after.tasks_timed_out - stats.tasks_timed_out
    tally.server_cpu, tally.workers_cpu = _proc.spent(before, _proc.snapshot(os.getpid()))
    return tally


async def settle(concurrency: Concurrency) -> None:
    """Wait until no worker is busy and the pool has all its workers."""
    with anyio.move_on_after(5):
        # Polled: stats() is all the facade tells about its workers, and it has no event to wait for.
        while (stats := concurrency.stats()).busy or stats.queued or stats.workers < WORKERS:  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def measure(args: argparse.Namespace) -> dict[str, Rounds]:
    loops = _work.calibrate(1.0)
    kinds = [
        Kind("2 closures of ~1 ms of CPU", closures_of(loops), args.users, (0.001, 0.004)),
        Kind("2 lambdas of microseconds", tiny_lambdas, args.tiny_users, (0.001, 0.004)),
    ]
    results = {kind.label: Rounds() for kind in kinds}
    async with Concurrency(driver=ProcessDriver(WORKERS), env_file=None) as concurrency:
        for kind in kinds:  # warm: workers started, the closures' code sent
            await concurrency.run(kind.tasks(0))
        for turn in range(args.rounds):
            for kind in kinds:
                # The baseline and the cancelling run alternate, each going first every other round.
                for cancelling in (bool(turn % 2), not turn % 2):
                    print(f"round {turn + 1}: {kind.label}, {'cancelling' if cancelling else 'baseline'} ...")
                    tally = await timed(concurrency, kind, args.duration, cancelling, seed=turn)
                    (results[kind.label].cancelling if cancelling else results[kind.label].baseline).append(tally)
    return results


def med(tallies: Sequence[Tally], value: Callable[[Tally], float]) -> float:
    return median([value(tally) for tally in tallies])


def report(args: argparse.Namespace, results: dict[str, Rounds]) -> None:
    print()
    print(machine())
    print(
        f"process driver, {WORKERS} workers, cancel_grace 0.1 s; {args.duration:g} s per run, median of "
        f"{args.rounds} round(s); {CANCELLED} calls in 5 cancelled after 1-4 ms in the cancelling run."
    )
    if args.load_at_start > 0.5:
        print(f"WARNING: the machine was busy before the run (load average {args.load_at_start:.2f}).")
    rows = []
    goals = []
    for label, rounds in results.items():
        base, cut = rounds.baseline, rounds.cancelling
        baseline = med(base, lambda t: t.completed)
        completed = med(cut, lambda t: t.completed)
        cancelled = med(cut, lambda t: t.cancelled)
        kills = sum(t.kills for t in cut)
        all_cancelled = sum(t.cancelled for t in cut)
        free = SHARE * baseline
        calls = med(cut, lambda t: t.calls)
        rows.append(
            [
                label,
                fmt(baseline, 0),
                fmt(completed, 0),
                fmt(free, 0),
                fmt(completed / free) + "x" if free else "n/a",
                f"{fmt(cancelled, 0)} ({fmt(100 * cancelled / calls if calls else math.nan, 0)} %)",
                fmt(med(cut, lambda t: t.outran), 0),
                f"{kills} / {all_cancelled}",
                fmt(med(base, lambda t: t.workers_cpu)) + " / " + fmt(med(cut, lambda t: t.workers_cpu)),
                fmt(med(base, lambda t: 1e6 * t.server_cpu / t.calls), 0)
                + " / "
                + fmt(med(cut, lambda t: 1e6 * t.server_cpu / t.calls), 0),
                f"{sum(t.errors for t in base + cut)}",
            ]
        )
        goals.append((label, completed / free if free else math.nan, kills / all_cancelled if all_cancelled else 0.0))
    headers = ["work (per call)", "baseline calls", "completed", "free share", "÷ free share"]
    headers += ["cancelled (of calls)", "outran deadline", "workers killed / cancellations"]
    headers += ["workers' CPU s (base / cancelling)", "server CPU µs per call", "errors"]
    print()
    print(table(headers, rows))
    print(
        "\nbaseline calls: calls completed in the baseline run; completed: calls not under a deadline that\n"
        f"completed in the cancelling run; free share: {SHARE:.0%} of the baseline's; outran deadline: calls\n"
        "under a deadline that returned before it; workers killed: the pool's worker_restarts, summed over rounds;\n"
        "server CPU per call: this process's CPU (callers and the pool's server side) per call made, any outcome."
    )
    print("\nGoals:")
    for label, completed, killed in goals:
        print(
            f"  {verdict(completed >= COMPLETED_GOAL):6}  {label}: completed ≥ 0.8x the free share: {fmt(completed)}x"
        )
        print(
            f"  {verdict(killed <= KILLS_GOAL):6}  {label}: workers killed ≤ 1 % of cancellations "
            f"(tasks shorter than the 0.1 s grace): {fmt(100 * killed)} %"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="baseline and cancelling runs of each kind")
    parser.add_argument("--users", type=int, default=8, help="concurrent callers of the ~1 ms closures")
    parser.add_argument("--tiny-users", type=int, default=64, help="concurrent callers of the microsecond lambdas")
    args = parser.parse_args(argv)
    args.load_at_start = os.getloadavg()[0]
    results = anyio.run(measure, args)
    report(args, results)
    return 0
