"""Reading runs back from the folder: what `slurmexecutor status/logs/cancel/clean` show.

Everything comes from the folder (the journal) plus, when asked, ONE scheduler query
for all the run's array jobs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import spool
from .errors import RunNotFoundError
from .schedulers import Backend, TaskKey, TaskState


@dataclass
class CallStatus:
    call_id: int
    batch: int
    task: int
    status: str  # done, failed, running, pending, cancelled, lost
    error: str = ""  # first line of the error, for failed calls


@dataclass
class TaskInfo:
    batch: int
    index: int
    call_ids: list[int]
    job_id: str | None
    array_index: int | None
    started: bool = False
    ended: bool = False  # the worker wrote its end record
    worker: tuple[str, int] | None = None  # (host, pid) of its worker
    state: TaskState | None = None

    @property
    def ref(self) -> str | None:
        return f"{self.job_id}_{self.array_index}" if self.job_id else None


@dataclass
class RunInfo:
    run_id: str
    path: Path
    meta: dict
    functions: list[str] = field(default_factory=list)
    tasks: list[TaskInfo] = field(default_factory=list)
    calls: dict[int, CallStatus] = field(default_factory=dict)
    cancelled: bool = False

    def count(self, status: str) -> int:
        return sum(1 for call in self.calls.values() if call.status == status)

    @property
    def job_ids(self) -> list[str]:
        return sorted({task.job_id for task in self.tasks if task.job_id},
                      key=lambda job: (len(job), job))

    @property
    def live(self) -> bool:
        """Some call may still produce a result."""
        return any(call.status in ("running", "pending") for call in self.calls.values())


def list_runs(folder: Path) -> list[Path]:
    """Run folders, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if (path / "run.json").is_file())


def find_run(folder: Path, run: str) -> Path:
    """A run by its id or a unique prefix of it."""
    matches = [path for path in list_runs(folder) if path.name.startswith(run)]
    if len(matches) != 1:
        found = "no run" if not matches else f"{len(matches)} runs"
        raise RunNotFoundError(f"{found} matching {run!r} in {folder}")
    return matches[0]


def read_run(run_dir: Path, key: bytes) -> RunInfo:
    """Everything the folder says about a run. Calls without a result stay "unknown"
    until `classify` weighs the scheduler's word (or, for local runs, the processes)."""
    info = RunInfo(run_dir.name, run_dir, spool.read_json(run_dir / "run.json"))
    info.cancelled = (run_dir / "cancelled").exists()
    for path in sorted(run_dir.glob("b*.json")):
        journal = spool.read_json(path)
        info.functions += [name for name in journal["functions"] if name not in info.functions]
        for index, ranges in enumerate(journal["tasks"]):
            array = next((a for a in journal["arrays"]
                          if a["offset"] <= index < a["offset"] + a["size"]), None)
            info.tasks.append(TaskInfo(journal["batch"], index, spool.expand_ids(ranges),
                                       array["job_id"] if array else None,
                                       index - array["offset"] if array else None))
    outcomes = _read_outcomes(run_dir, key, {(t.batch, t.index): t for t in info.tasks})
    for task in info.tasks:  # a retried call belongs to the latest task that carries it
        for call_id in task.call_ids:
            status, error = outcomes.get(call_id, ("unknown", ""))
            info.calls[call_id] = CallStatus(call_id, task.batch, task.index, status, error)
    return info


def classify(info: RunInfo, states: dict[TaskKey, TaskState] | None) -> RunInfo:
    """Decide pending/running/lost for calls without a result. `states` is the
    scheduler's answer for Slurm runs; None for local runs (judged by their processes)."""
    tasks = {(task.batch, task.index): task for task in info.tasks}
    client_alive = spool.process_alive(info.meta["host"], info.meta["pid"])
    for task in info.tasks:
        if states is not None:
            task.state = states.get((task.job_id, task.array_index))
    for call in info.calls.values():
        if call.status in ("unknown", "pending", "running", "lost"):
            call.status = _unresolved_status(tasks[(call.batch, call.task)], info.cancelled,
                                             states is not None, client_alive)
    return info


def _read_outcomes(run_dir: Path, key: bytes,
                   tasks: dict[tuple[int, int], TaskInfo]) -> dict[int, tuple[str, str]]:
    """call id -> (status, first error line), from every result stream of the run."""
    outcomes: dict[int, tuple[str, str]] = {}
    for path in sorted(run_dir.glob("b*.t*.r*.out")):
        task = tasks.get(spool.parse_stream_name(path.name))
        cursor = spool.StreamCursor(path)
        for kind, call_id, body in spool.read_records(cursor, key):
            if task is not None and kind == "start":
                task.started, task.worker = True, (body["host"], body["pid"])
            elif task is not None and kind == "end":
                task.ended = True
            elif call_id is not None and call_id not in outcomes:
                outcomes[call_id] = _outcome(kind, body)
        if cursor.error:
            for call_id in (task.call_ids if task else []):
                outcomes.setdefault(call_id, ("failed", cursor.error))
    return outcomes


def _outcome(kind: str, body: object) -> tuple[str, str]:
    if kind == "ok":
        return "done", ""
    if kind == "skip":
        return "cancelled", ""
    if kind == "raised":
        return "failed", f"{body['type']}: {body['message']}".splitlines()[0]
    if kind == "crash":
        return "failed", f"WorkerCrashedError: the worker {body['text']}"
    return "failed", str(body).splitlines()[0] if body else kind


def _unresolved_status(task: TaskInfo, cancelled: bool, asked_scheduler: bool,
                       client_alive: bool) -> str:
    if cancelled:
        return "cancelled"
    if task.job_id is None or task.ended:
        return "lost"
    if not asked_scheduler:  # a local run: its processes tell
        if task.started:
            return "running" if task.worker and spool.process_alive(*task.worker) else "lost"
        return "pending" if client_alive else "lost"
    if task.state is not None and not task.state.final:
        return "running" if task.state.running or task.started else "pending"
    return "lost"  # ended, or left the queue, without this call's result


def cancel_run(info: RunInfo, backend: Backend | None) -> int:
    """Mark the run's unfinished calls cancelled (workers skip them) and stop its jobs:
    scancel on Slurm, or signal the live local workers; return how many calls."""
    unfinished = [c for c in info.calls.values() if c.status in ("running", "pending")]
    by_task: dict[tuple[int, int], list[int]] = {}
    for call in unfinished:
        by_task.setdefault((call.batch, call.task), []).append(call.call_id)
    for (batch, task), call_ids in by_task.items():
        spool.append_cancelled(spool.cancel_path(info.path, batch, task), call_ids)
    if backend is not None:
        backend.cancel(info.job_ids)
    else:
        for task in info.tasks:
            if task.worker and not task.ended and spool.process_alive(*task.worker):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(task.worker[1], signal.SIGTERM)
    spool.write_json(info.path / "cancelled", {"time": time.time(), "calls": len(unfinished)})
    return len(unfinished)


def remove_run(info: RunInfo) -> None:
    """Delete a run's files; refuses while it is live."""
    if info.live:
        raise RuntimeError(f"run {info.run_id} is still live; cancel it first")
    shutil.rmtree(info.path)
