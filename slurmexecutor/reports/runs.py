"""Reading runs back from the folder: what `slurmexecutor status/logs/cancel/clean` show.

Everything comes from the folder (the journal, claims and result records) plus, when
asked, ONE scheduler query for all the run's array jobs.

Reading a run costs O(calls + records), and little memory per call: `Calls` keeps a
status byte and a chunk number per call id, and an error message for failed calls only.
A record's result bytes are dropped as soon as its kind is known; tasks and chunks are
found by key, and `classify` judges each task and chunk once, not once per call.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slurmexecutor.errors import RunInUseError, RunNotFoundError
from slurmexecutor.folder import cancels, procs, spool
from slurmexecutor.folder import claims as claiming
from slurmexecutor.folder import lease as leases
from slurmexecutor.folder.cache import CacheCounts, read_hits
from slurmexecutor.folder.warm import JOIN_BASE
from slurmexecutor.reports.calltable import (
    CODE,
    FAILED,
    STATUSES,
    UNKNOWN,
    Calls,
    CallStatus,
    ChunkInfo,
)
from slurmexecutor.schedulers import Backend, TaskKey, TaskState, state_of

#: sees the records of one stream: (batch, task index, records)
Observer = Callable[[int, int, list], None]
from slurmexecutor.errors import IntegrityError

__all__ = ["CODE", "FAILED", "STATUSES", "UNKNOWN", "CallStatus", "Calls", "ChunkInfo",
           "RunInfo", "TaskInfo", "cancel_run", "classify", "find_run", "list_runs",
           "read_run", "remove_run"]


@dataclass(slots=True)
class TaskInfo:
    batch: int
    index: int
    job_id: str | None
    array_index: int | None
    calls: int = 0  # the calls of the chunks it claimed
    started: bool = False
    ended: bool = False  # the worker wrote its end record
    worker: tuple[str, int] | None = None  # (host, pid) of its worker
    worker_started: int | None = None  # when that pid started (procs.process_start)
    state: TaskState | None = None
    idle: bool = False  # warm: it ran what it could and waits for the next batch
    joined: int | None = None  # warm: it left for this batch

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
    calls: Calls = field(default_factory=Calls)
    journals: dict[int, dict] = field(default_factory=dict)
    cancelled: bool = False
    lease: dict | None = None  # its lease file; None for runs from before leases
    cache: CacheCounts | None = None  # result cache hits and misses; None: no cache
    unreadable: str | None = None  # why its run.json or a journal could not be read
    _by_key: dict[tuple[int, int], TaskInfo] = field(default_factory=dict, init=False,
                                                     repr=False)

    @property
    def client_alive(self) -> bool:
        """Its client still drives it: a live lease (any host), or, without a lease
        file, its process on this host."""
        if self.lease is not None:
            return leases.is_live(self.lease)
        if "host" not in self.meta:  # unreadable: nothing says it ended
            return True
        return procs.process_alive(self.meta["host"], self.meta["pid"])

    @property
    def lease_state(self) -> str:
        """held, stale (its client stopped renewing it), released, or - (no lease file)."""
        return leases.state(self.lease)

    @property
    def lease_text(self) -> str:
        """Who holds the lease and how fresh its heartbeat is ("" without a lease)."""
        return leases.describe(self.lease) if self.lease is not None else ""

    def count(self, *statuses: str) -> int:
        return self.calls.count(*statuses)

    def add_task(self, task: TaskInfo) -> None:
        self.tasks.append(task)
        self._by_key[(task.batch, task.index)] = task

    def task(self, batch: int, index: int | None) -> TaskInfo | None:
        return None if index is None else self._by_key.get((batch, index))

    @property
    def job_ids(self) -> list[str]:
        return sorted({task.job_id for task in self.tasks if task.job_id},
                      key=lambda job: (len(job), job))

    @property
    def live(self) -> bool:
        """Its client still drives it, or some call may still produce a result."""
        return self.client_alive or self.count("running", "pending", "unknown") > 0

    def _repr_html_(self) -> str:
        """A short summary with progress (Jupyter): calls without a result yet (running,
        pending, or not classified: unknown) count as in flight."""
        from slurmexecutor.reports.summary import IN_FLIGHT, summary_html

        if self.unreadable:
            return summary_html(self.run_id, "", False, {}, 0, f"unreadable: {self.unreadable}")
        counts = {name: self.count(name) for name in ("done", "failed", "lost", "cancelled")}
        counts["in flight"] = self.count(*IN_FLIGHT)
        return summary_html(self.run_id, self.meta.get("backend", ""), self.live, counts,
                            len(self.calls), self.lease_text)


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


def journal_job_ids(run_dir: Path) -> set[str]:
    """The array jobs a run's journals name (what one scheduler query must cover)."""
    try:
        return {array["job_id"] for journal in spool.read_journals(run_dir)
                for array in journal["arrays"] if array["job_id"]}
    except UNREADABLE:  # read_run says why
        return set()


#: what a damaged or forged run's files raise when read
UNREADABLE = (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
              IntegrityError)


def backend_of(run_dir: Path, key: bytes) -> str | None:
    """A run's backend, or None when its run.json cannot be read."""
    try:
        return str(spool.read_signed_json(run_dir / "run.json", key)["backend"])
    except UNREADABLE:
        return None


def read_run(run_dir: Path, key: bytes, observe: Observer | None = None) -> RunInfo:
    """Everything the folder says about a run. Calls without a result stay "unknown"
    until `classify` weighs the scheduler's word (or, for local runs, the processes).
    `observe(batch, task, records)` sees each stream's records first (report.py). A run
    whose files cannot be read comes back with `unreadable` saying why."""
    try:
        return _read_run(run_dir, key, observe)
    except UNREADABLE as error:
        info = RunInfo(run_dir.name, run_dir, {}, unreadable=f"{type(error).__name__}: "
                       f"{error}".splitlines()[0])
        with contextlib.suppress(*UNREADABLE):
            info.lease = leases.read_lease(run_dir)
        return info


def _read_run(run_dir: Path, key: bytes, observe: Observer | None) -> RunInfo:
    meta = spool.read_signed_json(run_dir / "run.json", key)
    if not isinstance(meta, dict) or not {"created", "host", "pid", "backend"} <= set(meta):
        raise ValueError("run.json lacks created, host, pid or backend")
    info = RunInfo(run_dir.name, run_dir, meta)
    info.cancelled = (run_dir / "cancelled").exists()
    info.lease = leases.read_lease(run_dir)
    info.cache = read_hits(run_dir)
    functions: dict[str, None] = {}
    for journal in spool.read_journals(run_dir, key):
        batch = journal["batch"]
        info.journals[batch] = journal
        functions.update(dict.fromkeys(journal["functions"]))
        for array_job in journal["arrays"]:
            offset = array_job["offset"]
            for index in range(offset, offset + array_job["size"]):
                info.add_task(TaskInfo(batch, index, array_job["job_id"], index - offset))
        for chunk, ranges in enumerate(journal["chunks"]):
            info.calls.add_chunk(batch, chunk, ranges)
    info.functions = list(functions)
    _read_streams(run_dir, key, info, observe)
    return info


def _read_streams(run_dir: Path, key: bytes, info: RunInfo, observe: Observer | None) -> None:
    """From every result stream: which task claimed which chunk, each call's outcome.
    Records are read one at a time and dropped (an "ok" one keeps nothing), so a run
    with large results is read in little memory."""
    calls, done = info.calls, CODE["done"]
    messages: dict[str, str] = {}  # one copy of each error message
    for batch, index, path in spool.iter_streams(run_dir):
        task = info.task(batch, index)
        cursor = spool.StreamCursor(path)
        records: Iterable[tuple] = spool.iter_records(cursor, key)  # one at a time
        if observe is not None:  # the report sees them all (it reads them anyway)
            records = list(records)
            observe(batch, index, records)
        claimed: list[int] = []
        for kind, call_id, body in records:
            if kind == "ok":
                calls.resolve(call_id, done)
            elif kind == "start":
                if task is None and index >= JOIN_BASE:  # a warm task joined the batch
                    task = TaskInfo(batch, index, body.get("job_id"), int(
                        body.get("array_index") or 0))
                    info.add_task(task)
                if task:
                    task.started, task.worker = True, (body["host"], body["pid"])
                    task.worker_started = body.get("started")
            elif kind == "idle":
                if task:
                    task.idle = not (body or {}).get("leaving")
            elif kind == "end":
                if task:
                    task.ended, task.idle = True, False
                    task.joined = (body or {}).get("joined")
            elif kind == "claim":
                number = calls.chunk_number(batch, call_id)
                if number is not None:
                    calls.chunks[number].task = index
                    claimed.append(number)
                    if task:
                        task.calls += calls.chunks[number].calls
            elif kind not in ("limit", "claims", "backup", "times", "handback", "late"):
                status, error = _outcome(kind, body)
                calls.resolve(call_id, CODE[status], messages.setdefault(error, error))
        if cursor.error:
            for number in claimed:
                for start, stop in calls.chunks[number].ranges:  # the calls it owns
                    for call_id in range(start, stop):
                        if calls.place[call_id] == number:
                            calls.resolve(call_id, FAILED, cursor.error)


def _outcome(kind: str, body: Any) -> tuple[str, str]:
    if kind in ("skip", "cancelled"):
        return "cancelled", ""
    if kind == "raised":
        kind = body["type"].removeprefix("builtins.")
        return "failed", f"{kind}: {body['message']}".splitlines()[0]
    if kind == "crash":
        return "failed", f"WorkerCrashedError: the worker {body['text']}"
    return "failed", str(body).splitlines()[0] if body else kind


def classify(info: RunInfo, states: dict[TaskKey, TaskState] | None) -> RunInfo:
    """Decide pending/running/lost for calls without a result. `states` is the
    scheduler's answer for Slurm runs; None for local runs (judged by their processes).
    Each task, chunk and batch is judged once, whatever its number of calls."""
    if info.unreadable:
        return info
    if states is not None:
        for task in info.tasks:
            task.state = state_of(states, task.job_id, task.array_index)
    judge = _Judge(info, states is not None)
    calls, verdicts = info.calls, {}
    for call_id in calls.ids("unknown"):
        number = calls.place[call_id]
        if number not in verdicts:
            verdicts[number] = CODE[judge.chunk(calls.chunks[number])]
        calls.codes[call_id] = verdicts[number]
    return info


class _Judge:
    """What the unfinished calls of a chunk are, each task and batch judged once."""

    def __init__(self, info: RunInfo, asked_scheduler: bool) -> None:
        self.info, self.asked = info, asked_scheduler
        self.client_alive = info.client_alive
        self._tasks: dict[tuple[int, int], str] = {}
        self._batches: dict[int, str] = {}
        self._of_batch: dict[int, list[TaskInfo]] | None = None

    def chunk(self, chunk: ChunkInfo) -> str:
        if self.info.cancelled:
            return "cancelled"
        if chunk.task is not None:
            owner = self.info.task(chunk.batch, chunk.task)
            return self.task(owner) if owner else "lost"
        if chunk.batch not in self._batches:
            self._batches[chunk.batch] = self._unclaimed(chunk.batch)
        return self._batches[chunk.batch]

    def _unclaimed(self, batch: int) -> str:
        """Not claimed yet: pending while a task of its batch may still take it."""
        if self._of_batch is None:
            self._of_batch = {}
            for task in self.info.tasks:
                self._of_batch.setdefault(task.batch, []).append(task)
        journal = self.info.journals[batch]
        may_grow = self.client_alive and sum(a["size"] for a in journal["arrays"]) < (
            journal["planned"])
        alive = any(self.task(t) in ("running", "pending")
                    for t in self._of_batch.get(batch, ()))
        return "pending" if alive or may_grow else "lost"

    def task(self, task: TaskInfo) -> str:
        key = (task.batch, task.index)
        if key not in self._tasks:
            self._tasks[key] = _task_status(task, self.asked, self.client_alive)
        return self._tasks[key]


def _task_status(task: TaskInfo, asked_scheduler: bool, client_alive: bool) -> str:
    """What an unfinished call of this task is: running, pending, or lost."""
    if task.ended:
        return "lost"
    if not asked_scheduler:  # a local run: its processes tell (its client starts tasks)
        if task.worker:
            alive = procs.process_alive(*task.worker, task.worker_started)
            return "running" if alive else "lost"
        return "pending" if client_alive else "lost"
    if task.state is not None and not task.state.final:
        return "running" if task.state.running or task.started else "pending"
    return "lost"  # ended, or left the queue, without this call's result


def cancel_run(info: RunInfo, backend: Backend | None) -> int:
    """Mark the run's unfinished calls cancelled (workers skip them; we claim the chunks
    nobody took) and stop its jobs: scancel on Slurm, or signal the live local workers.
    Return how many calls. Calls of unknown state (Slurm unreachable) count as
    unfinished; `backend.cancel` errors are the caller's (the folder is marked first)."""
    calls, key = info.calls, spool.load_key(info.path.parent)
    by_chunk: dict[int, list[int]] = {}
    for call_id in calls.ids("running", "pending", "unknown"):
        by_chunk.setdefault(calls.place[call_id], []).append(call_id)
    for number, call_ids in by_chunk.items():
        chunk = calls.chunks[number]
        cancels.append_cancelled(cancels.cancel_path(info.path, chunk.batch, chunk.index),
                                 key, call_ids)
        claiming.try_claim(spool.claim_path(info.path, chunk.batch, chunk.index), "client")
    unfinished = sum(len(call_ids) for call_ids in by_chunk.values())
    spool.write_json(info.path / "cancelled", {"time": time.time(), "calls": unfinished})
    if backend is not None:
        backend.cancel(info.job_ids)
    else:
        for task in info.tasks:
            if task.worker and not task.ended and procs.process_alive(
                    *task.worker, task.worker_started):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(task.worker[1], signal.SIGTERM)
    return unfinished


def remove_run(info: RunInfo) -> None:
    """Delete a run's files; refuses while it is live (its lease read again here)."""
    record = leases.read_lease(info.path)
    if record is not None and leases.is_live(record):
        raise RunInUseError(f"run {info.run_id} is in use: {leases.describe(record)}")
    if info.live:
        raise RuntimeError(f"run {info.run_id} is still live; cancel it first")
    shutil.rmtree(info.path)
