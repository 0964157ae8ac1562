"""A throwaway Slurm cluster for the benchmarks (shared helper, not a benchmark).

    with slurm_cluster() as conf:   # sets os.environ["SLURM_CONF"] while inside
        ...

Reuses the cluster named by $SLURM_CONF when one is set and `sinfo` answers; otherwise
starts one with scripts/slurm_cluster.py in a temporary folder (1 node, 16 CPUs declared,
as for the reference figures) and stops it on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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
    """Total CPUs the cluster declares (sum of the T in `sinfo -o %C`)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%C"], capture_output=True, text=True,
                         check=True).stdout
    return sum(int(line.split("/")[3]) for line in out.split() if line.count("/") == 3)


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


@contextmanager
def slurm_cluster(nodes: int = 1, cpus: int = 16) -> Iterator[str]:
    """Yield the path of a working slurm.conf, with SLURM_CONF set to it."""
    existing = os.environ.get("SLURM_CONF")
    if existing and sinfo_answers():
        log(f"reusing the cluster of SLURM_CONF={existing} ({cluster_cpus()} CPUs)")
        yield existing
        return

    folder = Path(tempfile.mkdtemp(prefix="slxbench-"))
    conf = folder / "slurm.conf"
    up = [sys.executable, str(CLUSTER_SCRIPT), "up", str(folder),
          "--nodes", str(nodes), "--cpus", str(cpus)]
    done = subprocess.run(up, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        _stop(folder)
        raise RuntimeError(f"could not start a Slurm cluster:\n{done.stderr.strip()}")
    log(f"started a cluster in {folder}: {nodes} node(s) x {cpus} CPUs declared")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield str(conf)
    finally:
        if existing is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = existing
        _stop(folder)


def _stop(folder: Path) -> None:
    subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "down", str(folder)],
                   capture_output=True, check=False)
    shutil.rmtree(folder, ignore_errors=True)
    log(f"stopped the cluster in {folder}")


@contextmanager
def lagged_cluster(lag: float, nodes: int = 1, cpus: int = 16) -> Iterator[Path]:
    """A cluster whose nodes write a shared folder that this process sees `lag` s late
    (scripts/lagfs.py); yield the folder as this process sees it. SLURM_CONF is set
    while inside."""
    existing = os.environ.get("SLURM_CONF")
    folder = Path(tempfile.mkdtemp(prefix="slxlag-"))
    shared, mount = folder / "shared", folder / "mnt"
    shared.mkdir(mode=0o700)
    mount.mkdir()
    up = [sys.executable, str(CLUSTER_SCRIPT), "up", str(folder / "cluster"), "--nodes",
          str(nodes), "--cpus", str(cpus), "--shared", str(shared), "--mount", str(mount),
          "--lag", str(lag)]
    done = subprocess.run(up, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        _stop(folder / "cluster")
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"could not start a lagged cluster:\n{done.stderr.strip()}")
    log(f"started a cluster with a {lag:g} s lag in {folder}")
    os.environ["SLURM_CONF"] = str(folder / "cluster" / "slurm.conf")
    try:
        yield mount
    finally:
        if existing is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = existing
        _stop(folder / "cluster")
        shutil.rmtree(folder, ignore_errors=True)
