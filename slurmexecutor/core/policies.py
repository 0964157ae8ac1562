"""Three of the core's policies (state.py), as mixins of `Core`: cancelling calls (and
backup copies of a chunk: cooperative, by the workers; the core only cancels tasks that
have not started), how wide a batch runs (its array, warm tasks, scale-out), and retrying or failing what a task left
unfinished.
Pure like the rest of the core: they only read its state and append actions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from slurmexecutor.core import events as ev
from slurmexecutor.core.events import Action, Failure
from slurmexecutor.core.ledger import Batch, Config, Task, task_failure
from slurmexecutor.errors import IntegrityError, JobCancelledError

#: seconds before asking again after a submission limit refused a batch's tasks, growing
#: by DEFER_GROWTH per refusal in a row up to DEFER_MAX (the queue shrinks as jobs end)
DEFER_FIRST, DEFER_GROWTH, DEFER_MAX = 2.0, 1.5, 30.0


class _CoreState:
    """What the policies use of `Core` (declared here for the type checker)."""

    config: Config
    batches: dict[int, Batch]
    tasks: dict[tuple[int, int], Task]
    doomed: set[int]
    claim_then: dict[tuple[int, int], Task | Failure]
    warm: dict[tuple[str, int], float]
    warm_for: dict[tuple[str, int], str]
    cancelling: bool
    now: float
    _out: list[Action]

    if TYPE_CHECKING:
        def _live(self, batch: Batch) -> list[Task]: ...

        def _fail(self, batch: Batch, call_ids: list[int], failure: Failure) -> None: ...

        def _close(self, batch: Batch, call_id: int) -> None: ...

        def _fail_unfinished(self, task: Task, call_ids: list[int],
                             started: bool = True) -> None: ...


class CancelPolicy(_CoreState):
    """`ex.cancel`: skip, stop (by the worker), withdraw unclaimed chunks; and the second
    copy of a backed-up chunk."""

    def _stop_copy(self, batch: Batch, other: Task, call_id: int) -> None:
        """A call of a backed-up chunk has its result: the other copy skips it, or stops
        it if it runs it (its worker ends that call and carries on)."""
        self._out.append(ev.WriteCancel(batch.number, batch.chunk_of(call_id), (call_id,),
                                        stop=True))

    def _release_copies(self, task: Task) -> None:
        """A task ended: the calls another live task also runs (backups) are left to it."""
        batch = task.batch
        for call_id in list(task.unresolved):
            owner, backup = batch.owner.get(call_id), batch.backup.get(call_id)
            other = backup if owner is task else owner
            if other is not None and other is not task and other.key in self.tasks:
                task.unresolved.discard(call_id)
                batch.owner[call_id] = other
                batch.backup.pop(call_id, None)

    def _cancel(self, event: ev.CancelRequested) -> None:
        """Cancel handed-over calls: workers skip those not started and (with `kill`) stop
        those running, from the chunk's cancel files; whole unclaimed chunks are claimed
        by the client. No task is ever ended for it: a task may hold other calls, or have
        joined another batch (warm) unseen."""
        by_chunk: dict[tuple[int, int], list[int]] = {}
        for batch in self.batches.values():
            for call_id in sorted(event.call_ids & batch.open_calls):
                self.doomed.add(call_id)
                by_chunk.setdefault((batch.number, batch.chunk_of(call_id)), []).append(call_id)
        for (number, chunk), call_ids in sorted(by_chunk.items()):
            self._out.append(ev.WriteCancel(number, chunk, tuple(call_ids), stop=event.kill))
        for number in sorted({number for number, _ in by_chunk}):
            batch = self.batches[number]
            whole = tuple(sorted(c for c in batch.unclaimed if self._all_doomed(batch, c)))
            if whole:
                self._out.append(ev.ClaimChunks(number, whole))

    def _cancel_pending(self, tasks: list[Task]) -> None:
        """Tasks no longer needed (not seen started) are no longer followed, and
        cancelled if they still have not started (a started one finds nothing to claim
        and ends, or waits warm)."""
        pending = [t for t in tasks if t.job_id is not None]
        for task in pending:
            self.tasks.pop(task.key, None)
        if pending:
            self._out.append(ev.CancelTasks(tuple(t.slurm_id for t in pending)))

    def _all_doomed(self, batch: Batch, chunk: int) -> bool:
        return all(c in self.doomed for c in batch.chunks[chunk] if c in batch.open_calls)

    def _claims_won(self, event: ev.ClaimsWon) -> None:
        """The client won these claims: their calls never run. Lost ones are a task's,
        whose claim record tells the core about it."""
        batch = self.batches.get(event.batch)
        for chunk in event.asked or event.chunks:
            why = self.claim_then.pop((event.batch, chunk), None)
            if batch is None or chunk not in event.chunks:
                continue
            batch.unclaimed.discard(chunk)
            calls = [c for c in batch.chunks[chunk] if c in batch.open_calls]
            if isinstance(why, Failure):
                self._fail(batch, calls, why)
            elif why is not None:  # the task that left them: retried, or failed as fits
                self._fail_unfinished(why, calls, started=False)
            else:
                self._fail(batch, calls, Failure(
                    JobCancelledError, "the call was cancelled before it started",
                    state="CANCELLED"))


class WidthPolicy(_CoreState):
    """How many tasks a batch gets: its array when no warm task takes it, and one more
    task per `horizon` s of measured work left."""

    def warm_free(self, resources: str, now: float) -> int:
        """Idle warm tasks of `resources` that no batch waits for yet: a window of that
        key may go out at once (one of them takes it), instead of packing more calls."""
        idle = sum(1 for key, until in self.warm.items()
                   if until > now and self.warm_for.get(key) == resources)
        if not idle:
            return 0
        awaiting = sum(1 for b in self.batches.values() if b.resources == resources and (
            b.pending is not None and b.pending.warm and not self._live(b)))
        return idle - awaiting

    def may_start_wide(self, calls: int, measured: float | None) -> bool:
        """Whether free slots would widen a new batch of `calls` calls whose functions
        took `measured` task-seconds per call (None: never measured): the owner asks
        the scheduler only then. Work measured cheap stays on one task."""
        return measured is None or calls * measured > self.config.horizon

    def _start_width(self, event: ev.BatchAdded) -> int:
        """Tasks a throttled batch starts with: up to the free slots when its work is
        not known to be cheap (never measured: all it planned; measured: one per
        `horizon` s of it), else one; scale-out widens it from there."""
        calls = sum(len(chunk) for chunk in event.chunks)
        if event.free <= 1 or not self.may_start_wide(calls, event.measured):
            return 1
        wanted = event.planned if event.measured is None else math.ceil(
            calls * event.measured / self.config.horizon)
        return max(1, min(event.planned, event.free, wanted))

    def _ask(self, batch: Batch) -> None:
        """Ask for the batch's pending tasks (at most `cap` of them) in one sbatch."""
        pending = batch.pending
        assert pending is not None
        count = min(pending.left, pending.cap or pending.left)
        pending.asked, pending.warm = count, False
        self._out.append(ev.SubmitTasks(batch.number, pending.next, count, batch.throttled,
                                        batch.throttle))

    def _tasks_submitted(self, batch: Batch, offset: int, size: int, now: float) -> None:
        """An array (part) went out. All of a capped request went out and more is left:
        the rest is asked for at once, in parts twice as large."""
        pending = batch.pending
        batch.submitted = max(batch.submitted, offset + size)
        if pending is None:
            return
        pending.next = max(pending.next, offset + size)
        pending.asked = max(0, pending.asked - size)
        if pending.left <= 0:
            batch.pending = None
        elif not pending.asked:
            pending.cap, pending.due = pending.cap * 2, now

    def _submit_failed(self, event: ev.SubmitFailed) -> None:
        """sbatch refused the batch for good: no more tasks; nobody left runs its calls."""
        batch = self.batches.get(event.batch)
        if batch is None:
            return
        batch.planned = batch.submitted  # no more attempts at scaling out
        batch.pending = None
        batch.submit_error = event.error
        if not self._live(batch):
            self._fail(batch, sorted(batch.open_calls),
                       Failure(type(event.error), str(event.error), error=event.error))

    def _submit_deferred(self, event: ev.SubmitDeferred, now: float) -> None:
        """A submission limit refused the tasks for now: ask again later, at most half as
        many at once, backing off from DEFER_FIRST to DEFER_MAX s while refusals go on."""
        batch = self.batches.get(event.batch)
        if batch is None or batch.pending is None:
            return
        pending = batch.pending
        pending.next, pending.asked = event.first, 0
        pending.cap = max(1, event.count // 2)
        pending.due = now + min(DEFER_MAX, DEFER_FIRST * DEFER_GROWTH ** pending.refusals)
        pending.refusals += 1

    def _submit_when_due(self, batch: Batch, now: float) -> None:
        """The pending tasks go out when due, unless nothing is left for them to do."""
        pending = batch.pending
        assert pending is not None
        if not batch.open_calls or not batch.unclaimed:  # cancelled, or others took it
            batch.pending = None
        elif pending.warm:
            self._warm_or_submit(batch, now)
        elif not pending.asked and now >= pending.due:
            self._ask(batch)

    def _warm_or_submit(self, batch: Batch, now: float) -> None:
        """A batch left to warm tasks: its array is asked for when no warm task joined in
        time, or when the work measured on those that joined needs more tasks (the
        scale-out rule: one task per `horizon` s of work left)."""
        assert batch.pending is not None
        joined = self._live(batch)
        if not joined:
            if now >= batch.pending.due:
                self._ask(batch)
            return
        if batch.first_start is None or now - batch.first_start < self.config.probe:
            return
        per_call = (now - batch.first_start) * len(joined) / max(batch.done, 1)
        if len(batch.open_calls) * per_call > self.config.horizon * len(joined):
            self._ask(batch)

    def _scale_out(self, batch: Batch, now: float) -> None:
        """Let more of the batch's tasks run when the work measured so far says so: one
        task per `horizon` s of estimated remaining work, never fewer than now. Waiting in
        the queue says nothing about the work, so it never scales a batch out."""
        elapsed = now - (batch.first_start or now)
        if elapsed < self.config.probe:
            batch.next_scale = (batch.first_start or now) + self.config.probe
            return
        batch.next_scale = now + self.config.probe
        per_call = elapsed * batch.throttle / max(batch.done, 1)  # task-seconds per call
        work = len(batch.open_calls) * per_call
        wanted = min(batch.planned, max(1, math.ceil(work / self.config.horizon)))
        if wanted > batch.throttle:
            batch.throttle = wanted
            self._out.append(ev.LiftThrottle(batch.number, wanted if batch.throttled else 0))


class FailurePolicy(_CoreState):
    """What becomes of the calls a task left without results: a retry, or the error
    that fits how the task ended."""

    def _fail_unfinished(self, task: Task, call_ids: list[int], started: bool = True) -> None:
        """Calls a task left without results: retry them, or fail them with the error
        that fits how the task ended."""
        batch, state = task.batch, task.final
        cancelled = [c for c in call_ids if c in self.doomed]
        if cancelled:  # the user's word wins: never retried, never blamed on the task
            self._fail(batch, cancelled, Failure(
                JobCancelledError, "the call was cancelled", task.ref, "CANCELLED"))
            call_ids = [c for c in call_ids if c not in self.doomed]
        if not call_ids:
            return
        live_end = not task.ended or task.killed  # Slurm ended it, not the worker itself
        if (state is not None and live_end and state.state in self.config.retry_on
                and batch.attempt <= self.config.max_retries and not self.cancelling):
            calls: dict[int, list[int]] = {}
            for call_id in call_ids:
                calls.setdefault(batch.chunk_of(call_id), []).append(call_id)
                self._close(batch, call_id)
            self._out.append(ev.Retry(batch.number, batch.attempt + 1,
                                   {k: tuple(v) for k, v in calls.items()}, state.state))
            return
        if task.truncated and live_end and started:
            self._fail(batch, call_ids, Failure(IntegrityError, (
                f"{task.truncated}: its task ended "
                f"({state.state if state else 'state unknown'}) while writing it"),
                task.ref))
            return
        self._fail(batch, call_ids, task_failure(task, started, self.config.result_grace))
