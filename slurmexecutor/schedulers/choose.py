"""Which backend a run uses: `make_backend` (`auto`: Slurm when it answers, else local),
and a warning when a Slurm run's folder is one the compute nodes cannot see."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from slurmexecutor._log import log
from slurmexecutor.schedulers.allocation import AllocationBackend
from slurmexecutor.schedulers.base import Backend
from slurmexecutor.schedulers.local import LocalBackend
from slurmexecutor.schedulers.slurm import SlurmBackend


def slurm_available() -> bool:
    """True when `sbatch` is on PATH and the controller answers."""
    if not shutil.which("sbatch") or not shutil.which("squeue"):
        return False
    try:
        probe = subprocess.run(["squeue", "-h", "-j", "1", "-o", "%i"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 or "Invalid job id" in probe.stderr


def make_backend(name: str, resources: dict) -> Backend:
    """`slurm`, `local`, `allocation` (job steps of the allocation this runs in), or
    `auto` (Slurm when it answers, else local; never `allocation` by itself)."""
    if name == "auto":
        if os.environ.get("SLURM_JOB_ID"):
            log.info("inside Slurm job %s: backend='allocation' would run the work as job "
                     "steps (srun) of it instead of submitting jobs", os.environ["SLURM_JOB_ID"])
        name = "slurm" if slurm_available() else "local"
    if name == "allocation":
        return AllocationBackend(resources)
    if name == "slurm":
        return SlurmBackend(resources)
    if name == "local":
        return LocalBackend(resources)
    raise ValueError(f"backend must be 'slurm', 'local', 'allocation' or 'auto', not {name!r}")


def warn_if_node_local(folder: Path, backend: Backend) -> None:
    """Warn at start when a Slurm run's folder is on a node-local filesystem (tmpfs, a
    local disk under /tmp) and the cluster's nodes are on more than one host."""
    from slurmexecutor.folder.folders import node_local_fs

    hosts = getattr(backend, "node_hosts", None)
    if backend.name != "slurm" or hosts is None or (kind := node_local_fs(folder)) is None:
        return
    if len(hosts()) > 1:
        log.warning("the folder %s is on a node-local filesystem (%s): the compute nodes "
                    "will not see it and every call would fail; choose a folder on a "
                    "shared filesystem", folder, kind)
