#!/usr/bin/env python3
"""Backup executions against a straggler: one chunk 10x slower than the rest.

    python benchmarks/stragglers.py [--calls 32] [--seconds 1] [--repeat 3]
                                    [--backends slurm local]

A map of --calls calls of --seconds each, one call per chunk; call 0 takes 10x as long
the first time it runs (a slow node: a second copy, elsewhere, is quick). Wall time of
the map with `backups=False` (the default) and `backups=True`, medians of --repeat
cold runs, side by side. Slurm is a throwaway cluster (1 node, 16 CPUs declared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from _cluster import slurm_cluster
from _report import load_line, table

from slurmexecutor import SlurmExecutor


def slow_the_first_time(marker: str, index: int, seconds: float) -> int:
    if index == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(10 * seconds)
    else:
        time.sleep(seconds)
    return index


def one_map(backend: str, backups: bool, calls: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as folder:
        ex = SlurmExecutor(folder, backend=backend, backups=backups, keep_alive=0,
                           poll_interval=0.05 if backend == "local" else 0.3)
        try:
            marker = os.path.join(folder, "first-run")
            started = time.perf_counter()
            assert list(ex.map(slow_the_first_time, [marker] * calls, range(calls),
                               [seconds] * calls, chunksize=1)) == list(range(calls))
            return time.perf_counter() - started
        finally:
            ex.shutdown(wait=False, cancel_futures=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["slurm", "local"])
    args = parser.parse_args()
    rows = []

    def measure(backend: str) -> None:
        off = [one_map(backend, False, args.calls, args.seconds) for _ in range(args.repeat)]
        on = [one_map(backend, True, args.calls, args.seconds) for _ in range(args.repeat)]
        rows.append([backend, f"{statistics.median(off):.1f}", f"{statistics.median(on):.1f}",
                     f"{statistics.median(off) / statistics.median(on):.2f}x"])

    for backend in args.backends:
        if backend == "slurm":
            with slurm_cluster():
                measure(backend)
        else:
            measure(backend)
    print(f"map of {args.calls} calls x {args.seconds:g} s, call 0 {10 * args.seconds:g} s "
          "on its first run")
    print(table(["backend", "backups off s", "backups on s", "speed-up"], rows))
    print(load_line())


if __name__ == "__main__":
    main()
