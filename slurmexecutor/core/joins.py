"""Warm tasks joining batches, as a mixin of `Core` (state.py): a join is announced in
the `end` record of the stream the client already follows (`{"joined": B, "as": I}`),
also after the task's own batch finished (`Core.following`); the joiner is then
followed in B by its Slurm id, once: a settled joiner never comes back. Pure: no I/O.
"""

from __future__ import annotations

from slurmexecutor.core import events as ev
from slurmexecutor.core.ledger import Batch, Task


class WarmJoins:
    """Part of `Core`: followed warm tasks and the tasks they become in other batches."""

    batches: dict[int, Batch]
    tasks: dict[tuple[int, int], Task]
    warm: dict[tuple[str, int], float]
    following: dict[tuple[int, int], Task]

    def _add_joiner(self, batch: Batch, index: int, job_id: str | None,
                    array_index: int | None, now: float) -> None:
        """A warm task joined `batch` as task `index`: followed like its own, once (a
        settled joiner never comes back)."""
        if index in batch.joiners:
            return
        batch.joiners.add(index)
        task = Task(batch, index, job_id, array_index, now)
        self.tasks[task.key] = task
        batch.tasks.append(task)

    def _on_warm_record(self, task: Task, record: ev.Record, now: float) -> None:
        """A record of a warm task whose batch finished: idle, or its end (joined)."""
        key = task.slurm_key
        body = record.body or {}
        if record.kind == "idle" and body.get("leaving"):
            self.warm.pop(key, None)
        elif record.kind == "idle":
            self.warm[key] = now + float(body.get("keep_alive", 0))
        elif record.kind == "end":
            del self.following[task.key]
            joined = body.get("joined")
            if joined is None:
                self.warm.pop(key, None)
            elif joined in self.batches and body.get("as") is not None:
                self._add_joiner(self.batches[joined], int(body["as"]), task.job_id,
                                 task.array_index, now)
