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
import shutil
import subprocess
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tree), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, str(Path(__file__).resolve()), "--one", backend,
            str(args.calls), str(args.seconds)]
    out = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True,
                         timeout=900, check=False, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        backend, calls, seconds = sys.argv[2:5]
        print(json.dumps(run_one(backend, int(calls), float(seconds))))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _cluster import slurm_cluster
    from _report import load_line, table

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--backends", nargs="+", default=["slurm", "local"])
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="slxfirst-base-"))
    trees = {"current": REPO}
    if not args.skip_baseline:
        subprocess.run(f"git -C {REPO} archive {args.baseline} slurmexecutor | tar -x -C {base}",
                       shell=True, check=True)
        trees = {"baseline": base, "current": REPO}
    cores = os.cpu_count() or 1
    started = time.perf_counter()
    with ProcessPoolExecutor(cores) as pool:
        assert sum(pool.map(burn, [args.seconds] * args.calls)) > 0
    pool_wall = time.perf_counter() - started
    rows = [["-", f"ProcessPool({cores})", f"{pool_wall:.2f}", "-", "1.00x"]]
    try:
        for backend in args.backends:
            results = {}
            if backend == "slurm":
                with slurm_cluster():
                    for code, tree in trees.items():
                        results[code] = measure(tree, backend, args)
            else:
                for code, tree in trees.items():
                    results[code] = measure(tree, backend, args)
            for code, r in results.items():
                if r:
                    rows.append([backend, code, f"{r['wall']:.2f}", str(r["tasks"]),
                                 f"{r['wall'] / pool_wall:.2f}x"])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nfirst map of {args.calls} calls x {args.seconds:g} s CPU "
          f"(baseline {args.baseline})\n")
    print(table(["backend", "code", "wall s", "tasks", "/ pool"], rows))
    print(load_line())


if __name__ == "__main__":
    main()
