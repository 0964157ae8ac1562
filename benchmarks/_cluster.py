"""A throwaway Slurm cluster for the benchmarks (shared helper, not a benchmark).

    with slurm_cluster() as conf:   # sets os.environ["SLURM_CONF"] while inside
        ...

Reuses the cluster named by $SLURM_CONF when one is set and `sinfo` answers; otherwise
starts one with slurmexecutor.testing in a temporary folder (1 node, 16 CPUs declared,
as for the reference figures) and stops it on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # slurmexecutor from this checkout

from slurmexecutor.testing import ClusterError, Shared, down, up

#: The command line of the test cluster (`python CLUSTER_SCRIPT up|down DIR ...`).
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.py"


def sinfo_answers(timeout: float = 10.0) -> bool:
    """True if `sinfo` reaches a controller with the current environment."""
    try:
        done = subprocess.run(["sinfo", "-h"], capture_output=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def cluster_cpus() -> int:
    """Total CPUs the cluster declares, each node counted once (a node is listed once per
    partition it is in)."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], capture_output=True, text=True,
                         check=True).stdout
    cpus = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
    return sum(int(count) for count in cpus.values())


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


@contextmanager
def _conf_set(conf: Path) -> Iterator[None]:
    """SLURM_CONF names `conf` while inside."""
    existing = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield
    finally:
        if existing is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = existing


@contextmanager
def slurm_cluster(nodes: int = 1, cpus: int = 16) -> Iterator[str]:
    """Yield the path of a working slurm.conf, with SLURM_CONF set to it."""
    existing = os.environ.get("SLURM_CONF")
    if existing and sinfo_answers():
        log(f"reusing the cluster of SLURM_CONF={existing} ({cluster_cpus()} CPUs)")
        yield existing
        return

    folder = Path(tempfile.mkdtemp(prefix="slxbench-"))
    try:
        cluster = up(folder, nodes=nodes, cpus=cpus)
    except ClusterError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"could not start a Slurm cluster: {exc}") from exc
    log(f"started a cluster in {folder}: {nodes} node(s) x {cpus} CPUs declared")
    try:
        with _conf_set(cluster.conf):
            yield str(cluster.conf)
    finally:
        _stop(folder)


def _stop(folder: Path) -> None:
    down(folder)
    shutil.rmtree(folder, ignore_errors=True)
    log(f"stopped the cluster in {folder}")


@contextmanager
def lagged_cluster(lag: float, nodes: int = 1, cpus: int = 16) -> Iterator[Path]:
    """A cluster whose nodes write a shared folder that this process sees `lag` s late
    (scripts/lagfs.py); yield the folder as this process sees it. SLURM_CONF is set
    while inside."""
    folder = Path(tempfile.mkdtemp(prefix="slxlag-"))
    shared, mount = folder / "shared", folder / "mnt"
    shared.mkdir(mode=0o700)
    mount.mkdir()
    try:
        cluster = up(folder / "cluster", nodes=nodes, cpus=cpus,
                     shared=Shared(shared, mount, lag))
    except ClusterError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"could not start a lagged cluster: {exc}") from exc
    log(f"started a cluster with a {lag:g} s lag in {folder}")
    try:
        with _conf_set(cluster.conf):
            yield mount
    finally:
        _stop(folder / "cluster")
        shutil.rmtree(folder, ignore_errors=True)


def compare_trees(backends: list[str], baseline: str, skip_baseline: bool,
                  measure: Callable[[Path, str], dict | None]) -> dict[str, dict[str, dict]]:
    """`measure(tree, backend)` for this checkout and, unless skipped, `baseline` (a git
    revision, exported to a temporary folder), side by side in one run; Slurm backends
    inside one throwaway cluster. Returns {backend: {"baseline"|"current": result}}."""
    base = Path(tempfile.mkdtemp(prefix="slxbench-base-"))
    trees = {"current": REPO}
    if not skip_baseline:
        subprocess.run(f"git -C {REPO} archive {baseline} slurmexecutor | tar -x -C {base}",
                       shell=True, check=True)
        trees = {"baseline": base, "current": REPO}
    found: dict[str, dict[str, dict]] = {}
    try:
        for backend in backends:
            with slurm_cluster() if backend == "slurm" else nullcontext():
                results = {code: measure(tree, backend) for code, tree in trees.items()}
            found[backend] = {code: r for code, r in results.items() if r}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return found


def run_in_tree(script: str, tree: Path, *argv: str) -> dict:
    """`python SCRIPT --one ARGV...` with `tree`'s slurmexecutor first on the path; the
    JSON its last line prints, or {} (after showing its stderr) when it failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tree), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(Path(script).resolve()), "--one", *argv],
                         env=env, cwd=tree, capture_output=True, text=True, timeout=900,
                         check=False, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])
