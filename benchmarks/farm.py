#!/usr/bin/env python3
"""A warm task farm: throughput and round trip, baseline and current code side by side.

    python benchmarks/farm.py [--calls 5000] [--inflight 64] [--trips 200]
                              [--backends slurm local] [--baseline REV | --skip-baseline]

Per backend and code tree, in a fresh subprocess (`farm.py --one ...`) with that tree
first on the path (the workers get it too), one executor with keep_alive=60:
  * warm-up: a map of `--inflight` trivial calls (starts the tasks), then 1 s idle;
  * farm: `--inflight` calls in flight, each completion (wait FIRST_COMPLETED) submitting
    the next, `--calls` calls in all: calls per second;
  * round trip: `--trips` sequential `submit(inc, i).result()`: median and p95 in ms;
  * burst: 10,000 `submit()`s at once on the warm tasks, then every result: calls/s.
"baseline" is REV (default: main) `git archive`d to a temporary folder; "current" is this
working tree. Slurm is a throwaway cluster (1 node, 16 CPUs declared) or $SLURM_CONF's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BURST = 10_000  # the burst case: this many submit()s at once, then every result


def inc(x: int) -> int:
    return x + 1


def run_one(backend: str, calls: int, inflight: int, trips: int) -> dict:
    from slurmexecutor import SlurmExecutor

    with tempfile.TemporaryDirectory() as folder:
        options = json.loads(os.environ.get("FARM_OPTIONS", "{}"))  # for experiments
        ex = SlurmExecutor(folder, backend=backend, keep_alive=60,
                           poll_interval=0.05 if backend == "local" else 0.3, **options)
        try:
            assert list(ex.map(inc, range(inflight))) == list(range(1, inflight + 1))
            time.sleep(1.0)
            started = time.perf_counter()
            pending = {ex.submit(inc, i) for i in range(inflight)}
            submitted = inflight
            done_count = 0
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
                    done_count += 1
                    if submitted < calls:
                        pending.add(ex.submit(inc, submitted))
                        submitted += 1
            farm = time.perf_counter() - started
            single = []
            for i in range(trips):
                began = time.perf_counter()
                assert ex.submit(inc, i).result(timeout=120) == i + 1
                single.append(time.perf_counter() - began)
            time.sleep(1.0)
            began = time.perf_counter()
            burst = [ex.submit(inc, i) for i in range(BURST)]
            assert [f.result(timeout=300) for f in burst] == list(range(1, BURST + 1))
            burst_rate = BURST / (time.perf_counter() - began)
        finally:
            ex.shutdown()
    ordered = sorted(single)
    return {"rate": done_count / farm, "burst": burst_rate, "median_ms": statistics.median(single) * 1000,
            "p95_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000}


def measure(tree: Path, backend: str, args: argparse.Namespace) -> dict:
    from _cluster import run_in_tree

    return run_in_tree(__file__, tree, backend, str(args.calls), str(args.inflight), str(args.trips))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        backend, calls, inflight, trips = sys.argv[2:6]
        print(json.dumps(run_one(backend, int(calls), int(inflight), int(trips))))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _cluster import compare_trees
    from _report import load_line, table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--trips", type=int, default=200)
    parser.add_argument("--backends", nargs="+", default=["slurm", "local"])
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    rows: list[list[str]] = []
    found = compare_trees(args.backends, args.baseline, args.skip_baseline,
                          lambda tree, backend: measure(tree, backend, args))
    for backend, results in found.items():
        for code, r in results.items():
            rows.append([backend, code, f"{r['rate']:,.0f}", f"{r['median_ms']:.1f}",
                         f"{r['p95_ms']:.1f}", f"{r['burst']:,.0f}"])
    print(f"\nwarm task farm: {args.calls:,} calls, {args.inflight} in flight; "
          f"{args.trips} sequential round trips (baseline {args.baseline})\n")
    print(table(["backend", "code", "farm calls/s", "round trip median ms", "p95 ms",
                 "burst calls/s"], rows))
    print(load_line())


if __name__ == "__main__":
    main()
