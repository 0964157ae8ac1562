"""Reading runs back from the folder: what `slurmexecutor status/logs/cancel/clean` show.

Everything comes from the folder (the journal, claims and result records) plus, when
asked, ONE scheduler query for all the run's array jobs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import claims as claiming
from . import lease as leases
from . import spool
from .errors import RunInUseError, RunNotFoundError
from .schedulers import Backend, TaskKey, TaskState, state_of


@dataclass
class CallStatus:
    call_id: int
    batch: int
    chunk: int
    task: int | None  # the array task that claimed its chunk, if any
    status: str  # done, failed, running, pending, cancelled, lost
    error: str = ""  # first line of the error, for failed calls


@dataclass
class TaskInfo:
    batch: int
    index: int
    job_id: str | None
    array_index: int | None
    call_ids: list[int] = field(default_factory=list)  # of the chunks it claimed
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
    journals: dict[int, dict] = field(default_factory=dict)
    cancelled: bool = False
    lease: dict | None = None  # its lease file; None for runs from before leases

    @property
    def client_alive(self) -> bool:
        """Its client still drives it: a live lease (any host), or, without a lease
        file, its process on this host."""
        if self.lease is not None:
            return leases.is_live(self.lease)
        return spool.process_alive(self.meta["host"], self.meta["pid"])

    @property
    def lease_state(self) -> str:
        """held, stale (its client stopped renewing it), released, or - (no lease file)."""
        return leases.state(self.lease)

    @property
    def lease_text(self) -> str:
        """Who holds the lease and how fresh its heartbeat is ("" without a lease)."""
        return leases.describe(self.lease) if self.lease is not None else ""

    def count(self, status: str) -> int:
        return sum(1 for call in self.calls.values() if call.status == status)

    def task(self, batch: int, index: int | None) -> TaskInfo | None:
        return next((t for t in self.tasks if (t.batch, t.index) == (batch, index)), None)

    @property
    def job_ids(self) -> list[str]:
        return sorted({task.job_id for task in self.tasks if task.job_id},
                      key=lambda job: (len(job), job))

    @property
    def live(self) -> bool:
        """Its client still drives it, or some call may still produce a result."""
        return self.client_alive or any(
            call.status in ("running", "pending") for call in self.calls.values())


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
    info.lease = leases.read_lease(run_dir)
    chunk_of: dict[int, tuple[int, int]] = {}  # a retried call belongs to its last batch
    for journal in spool.read_journals(run_dir):
        info.journals[journal["batch"]] = journal
        info.functions += [name for name in journal["functions"] if name not in info.functions]
        for array in journal["arrays"]:
            for index in range(array["offset"], array["offset"] + array["size"]):
                info.tasks.append(TaskInfo(journal["batch"], index, array["job_id"],
                                           index - array["offset"]))
        for chunk, ranges in enumerate(journal["chunks"]):
            for call_id in spool.expand_ids(ranges):
                chunk_of[call_id] = (journal["batch"], chunk)
    claims, outcomes = _read_streams(run_dir, key, info, chunk_of)
    for call_id, (batch, chunk) in sorted(chunk_of.items()):
        status, error = outcomes.get(call_id, ("unknown", ""))
        info.calls[call_id] = CallStatus(call_id, batch, chunk, claims.get((batch, chunk)),
                                         status, error)
    return info


def _read_streams(run_dir: Path, key: bytes, info: RunInfo,
                  chunk_of: dict[int, tuple[int, int]]
                  ) -> tuple[dict[tuple[int, int], int], dict[int, tuple[str, str]]]:
    """From every result stream: which task claimed which chunk, each call's outcome."""
    claims: dict[tuple[int, int], int] = {}
    outcomes: dict[int, tuple[str, str]] = {}
    calls_of: dict[tuple[int, int], list[int]] = {}
    for call_id, place in chunk_of.items():
        calls_of.setdefault(place, []).append(call_id)
    for batch, index, path in spool.iter_streams(run_dir):
        task = info.task(batch, index)
        cursor = spool.StreamCursor(path)
        claimed: list[int] = []
        for kind, call_id, body in spool.read_records(cursor, key):
            if kind == "start":
                if task:
                    task.started, task.worker = True, (body["host"], body["pid"])
            elif kind == "end":
                if task:
                    task.ended = True
            elif kind == "claim":
                claims[(batch, call_id)] = index
                calls = calls_of.get((batch, call_id), [])
                claimed += calls
                if task:
                    task.call_ids += calls
            elif kind not in ("limit", "claims") and call_id not in outcomes:
                outcomes[call_id] = _outcome(kind, body)
        if cursor.error:
            for call_id in claimed:
                outcomes.setdefault(call_id, ("failed", cursor.error))
    return claims, outcomes


def _outcome(kind: str, body: Any) -> tuple[str, str]:
    if kind == "ok":
        return "done", ""
    if kind == "skip":
        return "cancelled", ""
    if kind == "raised":
        kind = body["type"].removeprefix("builtins.")
        return "failed", f"{kind}: {body['message']}".splitlines()[0]
    if kind == "crash":
        return "failed", f"WorkerCrashedError: the worker {body['text']}"
    return "failed", str(body).splitlines()[0] if body else kind


def classify(info: RunInfo, states: dict[TaskKey, TaskState] | None) -> RunInfo:
    """Decide pending/running/lost for calls without a result. `states` is the
    scheduler's answer for Slurm runs; None for local runs (judged by their processes)."""
    asked = states is not None
    client_alive = info.client_alive
    if states is not None:
        for task in info.tasks:
            task.state = state_of(states, task.job_id, task.array_index)
    for call in info.calls.values():
        if call.status != "unknown":
            continue
        if info.cancelled:
            call.status = "cancelled"
        elif call.task is not None:
            owner = info.task(call.batch, call.task)
            call.status = _task_status(owner, asked, client_alive) if owner else "lost"
        else:  # not claimed yet: pending while a task of its batch may still take it
            journal = info.journals[call.batch]
            may_grow = client_alive and sum(a["size"] for a in journal["arrays"]) < (
                journal["planned"])
            alive = any(_task_status(t, asked, client_alive) in ("running", "pending")
                        for t in info.tasks if t.batch == call.batch)
            call.status = "pending" if alive or may_grow else "lost"
    return info


def _task_status(task: TaskInfo, asked_scheduler: bool, client_alive: bool) -> str:
    """What an unfinished call of this task is: running, pending, or lost."""
    if task.ended:
        return "lost"
    if not asked_scheduler:  # a local run: its processes tell (its client starts tasks)
        if task.worker:
            return "running" if spool.process_alive(*task.worker) else "lost"
        return "pending" if client_alive else "lost"
    if task.state is not None and not task.state.final:
        return "running" if task.state.running or task.started else "pending"
    return "lost"  # ended, or left the queue, without this call's result


def cancel_run(info: RunInfo, backend: Backend | None) -> int:
    """Mark the run's unfinished calls cancelled (workers skip them; we claim the chunks
    nobody took) and stop its jobs: scancel on Slurm, or signal the live local workers.
    Return how many calls."""
    unfinished = [c for c in info.calls.values() if c.status in ("running", "pending")]
    by_chunk: dict[tuple[int, int], list[int]] = {}
    for call in unfinished:
        by_chunk.setdefault((call.batch, call.chunk), []).append(call.call_id)
    for (batch, chunk), call_ids in by_chunk.items():
        spool.append_cancelled(spool.cancel_path(info.path, batch, chunk), call_ids)
        claiming.try_claim(spool.claim_path(info.path, batch, chunk), "client")
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
    """Delete a run's files; refuses while it is live (its lease read again here)."""
    record = leases.read_lease(info.path)
    if record is not None and leases.is_live(record):
        raise RunInUseError(f"run {info.run_id} is in use: {leases.describe(record)}")
    if info.live:
        raise RuntimeError(f"run {info.run_id} is still live; cancel it first")
    shutil.rmtree(info.path)
