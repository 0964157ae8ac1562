"""The decision core's cost per round with many tasks (no cluster).

The pure core (core/state.py) is fed the events of two batches of the same resources
with warm tasks on, as a 10,000-task run would produce them, and timed:
  - claiming all of batch 0 (its not-started tasks are cancelled while pending);
  - an empty round (tick) after that;
  - a round with one claim of batch 1 after an ex.cancel of all of batch 0;
  - ex.cancel of every call of a 10,000-task map, with and without keep_alive (cancels
    are cooperative: stop files for the workers, no task is ended for them).
    python benchmarks/core_costs.py [--tasks 10000] [--started 1000]
"""

from __future__ import annotations

import argparse
import time

from slurmexecutor.core.events import (
    BatchAdded,
    CancelRequested,
    CancelTasks,
    Record,
    TasksSubmitted,
)
from slurmexecutor.core.ledger import Config
from slurmexecutor.core.state import Core


def two_batches(tasks: int, started: int) -> Core:
    core = Core(Config(poll_interval=1.0, result_grace=0.0, keep_alive=30.0))
    for number, job in ((0, "7"), (1, "8")):
        first = number * tasks
        core.step([BatchAdded(number, [[first + c] for c in range(tasks)], tasks,
                              resources="A")], 0.0)
        core.step([TasksSubmitted(number, job, 0, tasks)] + [
            Record(number, i, "start", None, {"host": "h", "pid": i}) for i in range(started)],
            0.1)
    return core


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--started", type=int, default=1_000)
    args = parser.parse_args()
    n, started = args.tasks, args.started
    core = two_batches(n, started)
    took = timed(lambda: core.step([Record(0, c % started, "claim", c, None)
                                    for c in range(n)], 0.4))
    print(f"{n} tasks a batch, {started} started: claiming all of batch 0 {took:.2f} s")
    took = timed(lambda: core.step([], 0.5)) * 1000
    print(f"  an empty round after it: {took:.1f} ms ({len(core.tasks)} live tasks)")
    core.step([CancelRequested(frozenset(range(n)))], 0.6)
    rounds = 200
    claim = timed(lambda: [core.step([Record(1, c % started, "claim", c, None)], 0.7)
                           for c in range(rounds)]) / rounds * 1000
    print(f"  a round with one claim of batch 1 after ex.cancel of batch 0: {claim:.2f} ms")
    for keep_alive in (0.0, 30.0):
        core = Core(Config(poll_interval=1.0, result_grace=0.0, keep_alive=keep_alive))
        core.step([BatchAdded(0, [[c] for c in range(n)], n, resources="A")], 0.0)
        core.step([TasksSubmitted(0, "7", 0, n)] + [
            Record(0, i, "start", None, {"host": "h", "pid": i}) for i in range(started)] + [
            Record(0, i, "claim", i, None) for i in range(started)], 0.1)
        start = time.perf_counter()
        out = core.step([CancelRequested(frozenset(range(n)))], 0.2)
        took = time.perf_counter() - start
        ended = sum(len(a.refs) for a in out if isinstance(a, CancelTasks))
        print(f"ex.cancel of all {n} calls, keep_alive={keep_alive:g}: {took:.2f} s, "
              f"{ended} started tasks ended (cooperative: 0)")


if __name__ == "__main__":
    main()
