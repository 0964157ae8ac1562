"""Backends: where array tasks run. Each is three verbs plus two facts.

    submit_array(script_path, size, log_dir, throttle) -> job id
    set_throttle(job id, n)       how many of its tasks may run at once (0: no limit)
    states(job ids) -> {(job id, array index): TaskState}   (ONE scheduler query)
    cancel(["123", "123_4", ...])
    max_array_size(), slots()

`slurm` drives sbatch/squeue/sacct/scancel; `local` runs the same batch script as local
subprocesses (the embedded default where there is no Slurm); `allocation` runs it as job
steps (srun) of the allocation the client runs in.
"""

from __future__ import annotations

import abc
import os
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .._log import log

#: States after which a task will not run again (unless Slurm requeues it).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
})


@dataclass(frozen=True)
class TaskState:
    """What the scheduler says of one array task."""

    state: str
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def running(self) -> bool:
        return self.state in ("RUNNING", "COMPLETING", "CONFIGURING")


TaskKey = tuple[str, int]  # (array job id, array index)
#: The index under which squeue reports the tasks of an array it does not list one by
#: one (e.g. pending tasks cancelled together show as one record, index "N/A").
REMAINDER = -1


def state_of(states: dict[TaskKey, TaskState], job_id: str | None,
             index: int | None) -> TaskState | None:
    """A task's state from a `states()` answer, falling back to its array's remainder."""
    if job_id is None:  # no array job yet: nothing the scheduler could report
        return None
    found = states.get((job_id, index)) if index is not None else None
    return found or states.get((job_id, REMAINDER))


class Backend(abc.ABC):
    """Where array tasks run. Implementations must be safe to call from any thread."""

    name: str
    #: the tasks' files are on this host's disk: results are never seen late, so the
    #: executor gives no grace for them (see executor.py)
    same_host: bool = False
    #: asking `states` costs no scheduler command (the backend watches its processes):
    #: the executor polls every 0.05 s instead of every 2 s
    cheap_states: bool = False

    @abc.abstractmethod
    def submit_array(self, script: Path, size: int, log_dir: Path,
                     throttle: int | None = None) -> str:
        """Submit `script` as an array of `size` tasks (0..size-1), at most `throttle`
        running at once (the script says so too, as `--array=...%N`); return the job id."""

    @abc.abstractmethod
    def set_throttle(self, job_id: str, throttle: int) -> None:
        """Let at most `throttle` tasks of the array run at once (0: no limit)."""

    @abc.abstractmethod
    def states(self, job_ids: Collection[str]) -> dict[TaskKey, TaskState]:
        """The tasks of these arrays that the scheduler still knows, in one query."""

    def final_states(self, keys: Collection[TaskKey]) -> dict[TaskKey, TaskState]:
        """How tasks that left the queue ended, where a record of it exists."""
        return {}

    @abc.abstractmethod
    def cancel(self, refs: Collection[str]) -> None:
        """Cancel whole arrays ("123") or single tasks ("123_4")."""

    @abc.abstractmethod
    def max_array_size(self) -> int:
        """How many tasks one array may have."""

    @abc.abstractmethod
    def slots(self) -> int:
        """How many tasks can run at once (used to size chunks)."""

    def slots_for(self, resources: dict) -> int:
        """How many tasks with these resources (`SlurmExecutor.options`) can run at once."""
        return self.slots()

    def close(self) -> None:
        """Release what the backend holds (threads, processes)."""


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
        from .allocation import AllocationBackend

        return AllocationBackend(resources)
    if name == "slurm":
        from .slurm import SlurmBackend

        return SlurmBackend(resources)
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(resources)
    raise ValueError(f"backend must be 'slurm', 'local', 'allocation' or 'auto', not {name!r}")


def warn_if_node_local(folder: Path, backend: Backend) -> None:
    """Warn at start when a Slurm run's folder is on a node-local filesystem (tmpfs, a
    local disk under /tmp) and the cluster's nodes are on more than one host."""
    from ..folders import node_local_fs

    hosts = getattr(backend, "node_hosts", None)
    if backend.name != "slurm" or hosts is None or (kind := node_local_fs(folder)) is None:
        return
    if len(hosts()) > 1:
        log.warning("the folder %s is on a node-local filesystem (%s): the compute nodes "
                    "will not see it and every call would fail; choose a folder on a "
                    "shared filesystem", folder, kind)
