"""Killing tasks by their Slurm id when warm tasks may have moved on (a mixin of `Core`).

The core kills a task by its Slurm id (`CancelTasks`): one that holds nothing but
cancelled calls (`ex.cancel`), the slower copy of a backed-up chunk, or one its batch no
longer needs before it was seen to start. Its view of the task lags what the worker did:
with `keep_alive`, the task may already have skipped those calls, gone idle and joined
another batch of its resources, where the kill would end a call nobody cancelled.

So with warm tasks such a kill *waits* while a batch it could have joined (same
resources, stealing, wanted chunks unclaimed) exists, for at most `hold` s: the result
grace plus a few polls, after which a move would have shown in the streams the client
reads every round. A Slurm id seen in another batch (a joined stream) is never killed
while it holds wanted calls, and an unneeded task seen there, or idle, is forgotten.
Pure like the rest of the core.
"""

from __future__ import annotations

from . import events as ev
from .ledger import Batch, Task
from .policies import _CoreState


class KillGuard(_CoreState):
    """Held kills (`kills_held`) and unneeded tasks (`unneeded`), re-judged each tick."""

    def _hold(self) -> float:
        """How long a kill waits at most for evidence that the task did not move on."""
        return self.config.result_grace + 1.0 + 2 * self.config.poll_interval

    def _may_have_moved(self, batch: Batch, since: float,
                        joinable: dict[str, bool] | None = None) -> bool:
        """A task of `batch`, last seen there, may be running another batch's chunk
        unseen (asked about since `since`; `joinable` caches the answer per resources)."""
        if self.config.keep_alive <= 0 or self.now - since >= self._hold():
            return False
        key = batch.resources
        if joinable is not None and key in joinable:
            return joinable[key]
        found = any(other is not batch and other.steal and other.resources == key and any(
            not self._all_doomed(other, c) for c in other.unclaimed)
            for other in self.batches.values())
        if joinable is not None:
            joinable[key] = found
        return found

    def _busy_elsewhere(self) -> set[tuple[str, int]]:
        """Slurm ids of live tasks that hold calls still wanted (with keep_alive a task
        may appear in several batches: its joined streams)."""
        if self.config.keep_alive <= 0:
            return set()
        return {t.slurm_key for t in self.tasks.values() if t.unresolved - self.killing}

    def _cancel_pending(self, tasks: list[Task]) -> None:
        """Tasks no longer needed (not seen started; a copy holding nothing wanted) are
        no longer followed, and cancelled (with warm tasks, once none can have joined
        another batch unseen)."""
        pending = [t for t in tasks if t.job_id is not None]
        for task in pending:
            self.tasks.pop(task.key, None)
        if pending and self.config.keep_alive > 0:
            self.unneeded += [(task, self.now) for task in pending]
            self._cancel_unneeded()
        elif pending:
            self._out.append(ev.CancelTasks(tuple(t.slurm_id for t in pending)))

    def _cancel_unneeded(self) -> None:
        """Cancel the unneeded tasks that cannot have moved on; forget those seen in
        another batch (joined) or idle (warm): they are working tasks now."""
        seen = {t.slurm_key for t in self.tasks.values() if t.job_id is not None}
        joinable: dict[str, bool] = {}
        waiting: list[tuple[Task, float]] = []
        cancel: list[Task] = []
        for task, since in self.unneeded:
            if task.slurm_key in seen or task.slurm_key in self.warm:
                continue
            if self._may_have_moved(task.batch, since, joinable):
                waiting.append((task, since))
            else:
                cancel.append(task)
        self.unneeded = waiting
        if cancel:
            self._out.append(ev.CancelTasks(tuple(t.slurm_id for t in cancel)))

    def _ask_held_kills(self) -> None:
        for number in sorted(self.kills_held):
            batch = self.batches.get(number)
            if batch is None:
                del self.kills_held[number]
            else:
                self._kill_cancelled(batch)
