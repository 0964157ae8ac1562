#!/usr/bin/env python3
"""The first map of a function on an idle cluster: does it start wide at once?

    python benchmarks/first_map.py [--calls 64] [--seconds 0.5] [--baseline REV]
                                   [--skip-baseline] [--backends slurm local]

A map of `--calls` calls that each burn `--seconds` of CPU, from a new executor (its
cost never measured), timed from the map to its last result; next to a
ProcessPoolExecutor with one process per core of this machine, in the same run.
"baseline" is REV (default: main) `git archive`d to a temporary folder; "current" is
this working tree; each runs in a fresh subprocess with its tree first on the path.
Slurm is a throwaway cluster (1 node, 16 CPUs declared) or $SLURM_CONF's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def burn(seconds: float) -> float:
    """Spin the CPU for `seconds` of process time."""
    end = time.process_time() + seconds
    x = 0.0
    while time.process_time() < end:
        x += 1.0
    return seconds


def run_one(backend: str, calls: int, seconds: float) -> dict:
    from slurmexecutor import SlurmExecutor
    from slurmexecutor.folder import spool

    with tempfile.TemporaryDirectory() as folder:
        ex = SlurmExecutor(folder, backend=backend, keep_alive=0,
                           poll_interval=0.05 if backend == "local" else 0.3)
        try:
            started = time.perf_counter()
            assert sum(ex.map(burn, [seconds] * calls)) > 0
            wall = time.perf_counter() - started
            tasks = len({(b, t) for b, t, _ in spool.iter_streams(ex.run_dir)})
        finally:
            ex.shutdown()
    return {"wall": wall, "tasks": tasks}


def measure(tree: Path, backend: str, args: argparse.Namespace) -> dict:
    from _cluster import run_in_tree

    return run_in_tree(__file__, tree, backend, str(args.calls), str(args.seconds))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        backend, calls, seconds = sys.argv[2:5]
        print(json.dumps(run_one(backend, int(calls), float(seconds))))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _cluster import compare_trees
    from _report import load_line, table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--backends", nargs="+", default=["slurm", "local"])
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    started = time.perf_counter()
    with ProcessPoolExecutor(cores) as pool:
        assert sum(pool.map(burn, [args.seconds] * args.calls)) > 0
    pool_wall = time.perf_counter() - started
    rows = [["-", f"ProcessPool({cores})", f"{pool_wall:.2f}", "-", "1.00x"]]
    found = compare_trees(args.backends, args.baseline, args.skip_baseline,
                          lambda tree, backend: measure(tree, backend, args))
    for backend, results in found.items():
        for code, r in results.items():
            rows.append([backend, code, f"{r['wall']:.2f}", str(r["tasks"]),
                         f"{r['wall'] / pool_wall:.2f}x"])
    print(f"\nfirst map of {args.calls} calls x {args.seconds:g} s CPU "
          f"(baseline {args.baseline})\n")
    print(table(["backend", "code", "wall s", "tasks", "/ pool"], rows))
    print(load_line())


if __name__ == "__main__":
    main()
