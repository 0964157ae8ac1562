#!/usr/bin/env python3
"""A map of a million trivial calls: what it costs the client.

    python benchmarks/million_map.py [--calls 1000000] [--baseline REV]
                                     [--skip-baseline] [--backends local slurm]

`sum(ex.map(abs, range(calls)))` from a new executor, timed from the map to its last
result, in a fresh subprocess per tree: wall time, the client's CPU time, the CPU time
of its workers (local backend: the client's child processes), and the client's peak
RSS. "baseline" is REV (default: main) `git archive`d to a temporary folder; "current"
is this working tree. The issue's goal: <= 10 s and <= 150 MiB (local backend).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_one(backend: str, calls: int) -> dict:
    from slurmexecutor import SlurmExecutor

    with tempfile.TemporaryDirectory() as folder, SlurmExecutor(folder, backend=backend) as ex:
        started = time.perf_counter()
        total = sum(ex.map(abs, range(calls)))
        wall = time.perf_counter() - started
    assert total == calls * (calls - 1) // 2, total
    me = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "client_cpu": me.ru_utime + me.ru_stime,
            "workers_cpu": workers.ru_utime + workers.ru_stime,
            "peak_mib": me.ru_maxrss / 1024}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        backend, calls = sys.argv[2:4]
        print(json.dumps(run_one(backend, int(calls))))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _cluster import compare_trees, run_in_tree
    from _report import load_line, table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--backends", nargs="+", default=["local"])
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    found = compare_trees(args.backends, args.baseline, args.skip_baseline,
                          lambda tree, backend: run_in_tree(__file__, tree, backend,
                                                            str(args.calls)))
    rows = []
    for backend, results in found.items():
        for code, r in results.items():
            rows.append([backend, code, f"{r['wall']:.1f}", f"{r['client_cpu']:.1f}",
                         f"{r['workers_cpu']:.1f}" if backend == "local" else "-",
                         f"{r['peak_mib']:.0f}"])
    print(f"\nsum(ex.map(abs, range({args.calls:,}))) (baseline {args.baseline})\n")
    print(table(["backend", "code", "wall s", "client CPU s", "workers CPU s",
                 "client peak MiB"], rows))
    print(load_line())


if __name__ == "__main__":
    main()
