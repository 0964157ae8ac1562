"""Warm tasks joining batches, functions of the core's state (state.py): a join is announced in
the `end` record of the stream the client already follows (`{"joined": B, "as": I}`),
also after the task's own batch finished (`Core.following`); the joiner is then
followed in B by its Slurm id, once: a settled joiner never comes back. Pure: no I/O.
"""

from __future__ import annotations

from slurmexecutor.core import events as ev
from slurmexecutor.core.ledger import Batch, Task
from slurmexecutor.core.store import CoreState


def add_joiner(core: CoreState, batch: Batch, index: int, job_id: str | None,
               array_index: int | None, now: float) -> None:
    """A warm task joined `batch` as task `index`: followed like its own, once (a
    settled joiner never comes back)."""
    if index in batch.joiners:
        return
    batch.joiners.add(index)
    core.joins += 1
    task = Task(batch, index, job_id, array_index, now)
    core.tasks[task.key] = task
    batch.tasks.append(task)


def on_warm_record(core: CoreState, task: Task, record: ev.Record, now: float) -> None:
    """A record of a warm task whose batch finished: idle, or its end (joined)."""
    key = task.slurm_key
    body = record.body or {}
    if record.kind == "idle" and body.get("leaving"):
        core.warm.pop(key, None)
    elif record.kind == "idle":
        core.warm[key] = now + float(body.get("keep_alive", 0))
    elif record.kind == "end":
        del core.following[task.key]
        joined = body.get("joined")
        if joined is None:
            core.warm.pop(key, None)
        elif joined in core.batches and body.get("as") is not None:
            add_joiner(core, core.batches[joined], int(body["as"]), task.job_id,
                             task.array_index, now)
