"""What every backend is (`Backend`) and what it reports (`TaskState`): the base the
backends (local, slurm, allocation) build on, and the core reads."""

from __future__ import annotations

import abc
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

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
    def cancel(self, refs: Collection[str], pending_only: bool = False) -> None:
        """Cancel whole arrays ("123") or single tasks ("123_4"); with `pending_only`,
        only those that have not started (a started task is never ended by it)."""

    @abc.abstractmethod
    def max_array_size(self) -> int:
        """How many tasks one array may have."""

    @abc.abstractmethod
    def slots(self) -> int:
        """How many tasks can run at once (used to size chunks)."""

    def idle_slots(self, resources: dict) -> int | None:
        """Tasks with these resources that could start now (None: not known)."""
        return None

    def slots_for(self, resources: dict) -> int:
        """How many tasks with these resources (`SlurmExecutor.options`) can run at once."""
        return self.slots()

    def close(self) -> None:
        """Release what the backend holds (threads, processes)."""
