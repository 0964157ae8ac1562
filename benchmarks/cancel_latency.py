#!/usr/bin/env python3
"""Cancel latency: `ex.cancel` of a running call until its future is done, and how long
the task's next call waits, side by side on the local backend and a real Slurm.

    python benchmarks/cancel_latency.py [--repeat 5] [--backends local slurm]

For each backend: a chunk of two calls on one task (a long sleep, then a trivial call);
once the first has started (its output is in the task's log), `ex.cancel` it. Printed:
median seconds from `cancel` to the cancelled future's end, and to the second call's
result (the task carries on after a cooperative cancel; a killed task cannot).
Slurm is a throwaway cluster (1 node, 16 CPUs declared), or the one of $SLURM_CONF.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import wait

from _cluster import slurm_cluster
from _report import table

from slurmexecutor import SlurmExecutor


def sleeper(seconds: float) -> float:
    print("started", flush=True)
    time.sleep(seconds)
    return seconds


def once(backend: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        ex = SlurmExecutor(folder, backend=backend, keep_alive=0, chunksize=2,
                           poll_interval=0.3 if backend == "slurm" else 0.05)
        first, second = ex.submit_many(sleeper, [(60,), (0,)], chunksize=2)
        deadline = time.monotonic() + 120
        while "started" not in first.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        began = time.monotonic()
        ex.cancel([first])
        wait([first], timeout=120)
        cancelled = time.monotonic() - began
        try:
            second.result(timeout=120)
            carried_on = time.monotonic() - began
        except Exception:  # noqa: BLE001  (a killed task fails the rest of its chunk)
            carried_on = float("nan")
        ex.shutdown(wait=True)
        return cancelled, carried_on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["local", "slurm"])
    options = parser.parse_args()
    rows = []
    for backend in options.backends:
        if backend == "slurm":
            with slurm_cluster():
                runs = [once(backend) for _ in range(options.repeat)]
        else:
            runs = [once(backend) for _ in range(options.repeat)]
        rows.append([backend, f"{statistics.median(r[0] for r in runs):.2f}",
                     f"{statistics.median(r[1] for r in runs):.2f}"])
    print(table(["backend", "cancel -> future done (s)", "cancel -> next call's result (s)"],
                rows))


if __name__ == "__main__":
    main()
