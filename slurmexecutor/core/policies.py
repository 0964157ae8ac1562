"""Three of the core's policies (state.py), as functions of its state (`core`): cancelling
calls (and backup copies of a chunk: cooperative, by the workers; the core only cancels
tasks that have not started), how wide a batch runs (its array, warm tasks, scale-out,
its one pending-submission record), and retrying, handing back or failing what a task
left unfinished. Pure like the rest of the core: they read and change its state and
append actions; `Core` owns the state.
"""

from __future__ import annotations

import math

from slurmexecutor.core import events as ev
from slurmexecutor.core.events import Failure
from slurmexecutor.core.ledger import Batch, Task, task_failure
from slurmexecutor.core.store import CoreState
from slurmexecutor.errors import CallLostError, IntegrityError, JobCancelledError

#: the verdict on a call the client withdrew before any task ran it
NEVER_STARTED = Failure(JobCancelledError, "the call was cancelled before it started",
                        state="CANCELLED")

#: seconds before asking again after a submission limit refused a batch's tasks, growing
#: by DEFER_GROWTH per refusal in a row up to DEFER_MAX (the queue shrinks as jobs end)
DEFER_FIRST, DEFER_GROWTH, DEFER_MAX = 2.0, 1.5, 30.0
#: calls run again without using up max_retries (preempted, or never started by a task
#: that ended) this many times at most
MAX_FREE_RERUNS = 10
#: seconds of work left per joined warm task beyond which a batch asks for new tasks
#: although the scheduler reported no idle slot for them (they would wait in the queue)
QUEUED_WORK = 60.0


# -- `ex.cancel`: skip, stop (by the worker), withdraw unclaimed chunks; and the seco


def stop_copy(core: CoreState, batch: Batch, other: Task, call_id: int) -> None:
    """A call of a backed-up chunk has its result: the other copy skips it, or stops
    it if it runs it (its worker ends that call and carries on)."""
    core.out.append(ev.WriteCancel(batch.number, batch.chunk_of(call_id), (call_id,),
                                    stop=True))


def release_copies(core: CoreState, task: Task) -> None:
    """A task ended: the calls another live task also runs (backups) are left to it."""
    batch = task.batch
    for call_id in list(task.unresolved):
        owner, backup = batch.owner.get(call_id), batch.backup.get(call_id)
        other = backup if owner is task else owner
        if other is not None and other is not task and other.key in core.tasks:
            task.unresolved.discard(call_id)
            batch.owner[call_id] = other
            batch.backup.pop(call_id, None)

def warm_free(core: CoreState, resources: str, now: float) -> int:
    """Idle warm tasks of `resources` that no batch waits for yet: a window of that key
    may go out at once (one of them takes it), instead of packing more calls."""
    idle = sum(1 for key, until in core.warm.items()
               if until > now and core.warm_for.get(key) == resources)
    if not idle:
        return 0
    awaiting = sum(1 for b in core.batches.values() if b.resources == resources and (
        b.pending is not None and b.pending.warm and not core.live_tasks(b)))
    return idle - awaiting


def may_start_wide(core: CoreState, calls: int, measured: float | None) -> bool:
    """Whether free slots would widen a new batch of `calls` calls whose functions took
    `measured` task-seconds per call (None: never measured): the owner asks the
    scheduler only then. Work measured cheap stays on one task."""
    return measured is None or calls * measured > core.config.horizon


def start_width(core: CoreState, event: ev.BatchAdded) -> int:
    """Tasks a throttled batch starts with: up to the free slots when its work is not
    known to be cheap (never measured: all it planned; measured: one per `horizon` s of
    it), else one; scale-out widens it from there."""
    calls, free = sum(len(chunk) for chunk in event.chunks), event.free or 0
    if free <= 1 or not may_start_wide(core, calls, event.measured):
        return 1
    wanted = event.planned if event.measured is None else math.ceil(
        calls * event.measured / core.config.horizon)
    return max(1, min(event.planned, free, wanted))



def cancel(core: CoreState, event: ev.CancelRequested) -> None:
    """Cancel handed-over calls: workers skip those not started and (with `kill`) stop
    those running, from the chunk's cancel files; whole unclaimed chunks are claimed
    by the client. No task is ever ended for it: a task may hold other calls, or have
    joined another batch (warm) unseen."""
    by_chunk: dict[tuple[int, int], list[int]] = {}
    for batch in core.batches.values():
        for call_id in sorted(event.call_ids & batch.open_calls):
            core.doomed.add(call_id)
            by_chunk.setdefault((batch.number, batch.chunk_of(call_id)), []).append(call_id)
    for (number, chunk), call_ids in sorted(by_chunk.items()):
        core.out.append(ev.WriteCancel(number, chunk, tuple(call_ids), stop=event.kill))
    for number in sorted({number for number, _ in by_chunk}):
        batch = core.batches[number]
        whole = tuple(sorted(c for c in batch.unclaimed if all_doomed(core, batch, c)))
        if whole:
            core.out.append(ev.ClaimChunks(number, whole))


def cancel_pending(core: CoreState, tasks: list[Task]) -> None:
    """Tasks no longer needed (not seen started) are no longer followed, and
    cancelled if they still have not started (a started one finds nothing to claim
    and ends, or waits warm)."""
    pending = [t for t in tasks if t.job_id is not None]
    for task in pending:
        core.tasks.pop(task.key, None)
    if pending:
        core.out.append(ev.CancelTasks(tuple(t.slurm_id for t in pending)))


def all_doomed(core: CoreState, batch: Batch, chunk: int) -> bool:
    return all(c in core.doomed for c in batch.chunks[chunk] if c in batch.open_calls)


def claim_then_fail(core: CoreState, batch: Batch, chunks: tuple[int, ...],
                    why: Task | Failure) -> None:
    """The client claims chunks nobody is left to run; their calls fail (or are retried,
    after `why`, the task that left them) only for the claims it wins (ClaimsWon): a
    task that won one runs its calls, and they are not failed."""
    batch.unclaimed.difference_update(chunks)
    for chunk in chunks:
        core.claim_then[(batch.number, chunk)] = why
    core.out.append(ev.ClaimChunks(batch.number, chunks))


def claims_won(core: CoreState, event: ev.ClaimsWon, now: float) -> None:
    """The client won these claims: their calls never run. Lost ones are a task's,
    whose claim record tells the core about it (`Batch.lost` until then)."""
    batch = core.batches.get(event.batch)
    for chunk in event.asked or event.chunks:
        why = core.claim_then.pop((event.batch, chunk), None)
        if batch is not None and chunk not in event.chunks:
            batch.lost.add(chunk)
            batch.lost_since = now
        if batch is None or chunk not in event.chunks:
            continue
        batch.unclaimed.discard(chunk)
        calls = [c for c in batch.chunks[chunk] if c in batch.open_calls]
        if isinstance(why, Failure):
            core.fail_calls(batch, calls, why)
        elif why is not None:  # the task that left them: retried, or failed as fits
            fail_unfinished(core, why, calls, started=False)
        else:
            core.fail_calls(batch, calls, NEVER_STARTED)


def fail_orphans(core: CoreState, batch: Batch, now: float) -> None:
    """Calls of chunks whose claim the client lost (`Batch.lost`) that no task
    reported running, when no task of the batch is left. Cancelled ones fail at once
    (an earlier client's claim, after attach); the others once a read that began after
    the loss found no claimant and `result_grace` (the lag bound) has passed: a warm
    task may have joined unseen, or a task died between its claim and its record."""
    orphans = [c for chunk in sorted(batch.lost) for c in batch.open_calls.among(
        batch.chunks[chunk]) if c not in batch.owner]
    core.fail_calls(batch, [c for c in orphans if c in core.doomed], NEVER_STARTED)
    if core.scanned <= batch.lost_since or now - batch.lost_since < core.config.result_grace:
        return
    batch.lost.clear()
    orphans = [c for c in orphans if c not in core.doomed]
    if orphans and batch.last_failed is not None and batch.submit_error is None:
        fail_unfinished(core, batch.last_failed, orphans)
    elif orphans:
        core.fail_calls(batch, orphans, Failure(CallLostError, (
            "a task claimed its chunk but never reported running it (it ended between "
            "the two)")))


# -- How many tasks a batch gets: its array when no warm task takes it, and one more


def ask(core: CoreState, batch: Batch) -> None:
    """Ask for the batch's pending tasks (at most `cap` of them) in one sbatch."""
    pending = batch.pending
    assert pending is not None
    count = min(pending.left, pending.cap or pending.left)
    pending.asked, pending.warm = count, False
    core.out.append(ev.SubmitTasks(batch.number, pending.next, count, batch.throttled,
                                    batch.throttle))


def tasks_submitted(core: CoreState, batch: Batch, offset: int, size: int, now: float) -> None:
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


def submit_failed(core: CoreState, event: ev.SubmitFailed) -> None:
    """sbatch refused the batch for good: no more tasks; nobody left runs its calls."""
    batch = core.batches.get(event.batch)
    if batch is None:
        return
    batch.planned = batch.submitted  # no more attempts at scaling out
    batch.pending = None
    batch.submit_error = event.error
    if not core.live_tasks(batch) and batch.unclaimed:  # its chunks are the client's first:
        claim_then_fail(core, batch, tuple(sorted(batch.unclaimed)), Failure(  # a warm
            type(event.error), str(event.error), error=event.error))  # task may join


def submit_deferred(core: CoreState, event: ev.SubmitDeferred, now: float) -> None:
    """A submission limit refused the tasks for now: ask again later, at most half as
    many at once, backing off from DEFER_FIRST to DEFER_MAX s while refusals go on."""
    batch = core.batches.get(event.batch)
    if batch is None or batch.pending is None:
        return
    pending = batch.pending
    pending.next, pending.asked = event.first, 0
    pending.cap = max(1, event.count // 2)
    pending.due = now + min(DEFER_MAX, DEFER_FIRST * DEFER_GROWTH ** pending.refusals)
    pending.refusals += 1


def submit_when_due(core: CoreState, batch: Batch, now: float) -> None:
    """The pending tasks go out when due, unless nothing is left for them to do."""
    pending = batch.pending
    assert pending is not None
    if not batch.open_calls or not batch.unclaimed:  # cancelled, or others took it
        batch.pending = None
    elif pending.warm:
        warm_or_submit(core, batch, now)
    elif not pending.asked and now >= pending.due:
        ask(core, batch)


def warm_or_submit(core: CoreState, batch: Batch, now: float) -> None:
    """A batch left to warm tasks: its array is asked for when no warm task joined in
    time, or when the work measured on those that joined needs more tasks (the
    scale-out rule: one task per `horizon` s of work left). With no idle slot reported
    for its resources, new tasks would wait in the queue, maybe for the joined tasks'
    own CPUs: they are asked for only when the work left would keep each joined task
    busy for QUEUED_WORK s."""
    assert batch.pending is not None
    joined = core.live_tasks(batch)
    if not joined:
        if now >= batch.pending.due:
            ask(core, batch)
        return
    if batch.first_start is None or now - batch.first_start < core.config.probe:
        return
    per_call = (now - batch.first_start) * len(joined) / max(batch.done, 1)
    each = len(batch.open_calls) * per_call / len(joined)  # seconds left per joined task
    if each > (QUEUED_WORK if batch.free == 0 else core.config.horizon):
        ask(core, batch)


def scale_out(core: CoreState, batch: Batch, now: float) -> None:
    """Let more of the batch's tasks run when the work measured so far says so: one
    task per `horizon` s of estimated remaining work, never fewer than now. Waiting in
    the queue says nothing about the work, so it never scales a batch out; nor does a
    task's start-up (its first call unpickles the function and imports its modules) for
    a batch whose functions were measured before: it counts from its first results,
    or with none, from `horizon` s on."""
    since = batch.first_start if batch.first_start is not None else now
    before = 0
    if batch.measured is not None:
        if batch.done:
            if batch.counted_from is None:
                batch.counted_from = (now, batch.done)
            since, before = batch.counted_from
        elif now - since < core.config.horizon:
            batch.next_scale = now + core.config.probe
            return
    elapsed = now - since
    if elapsed < core.config.probe:
        batch.next_scale = since + core.config.probe
        return
    batch.next_scale = now + core.config.probe
    per_call = elapsed * batch.throttle / max(batch.done - before, 1)  # task-s per call
    work = len(batch.open_calls) * per_call
    wanted = min(batch.planned, max(1, math.ceil(work / core.config.horizon)))
    if wanted > batch.throttle:
        batch.throttle = wanted
        core.out.append(ev.LiftThrottle(batch.number, wanted if batch.throttled else 0))


# -- What becomes of the calls a task left without results: a retry, or the error tha


def hand_back(core: CoreState, task: Task, call_ids: list[int]) -> None:
    """Calls a task claimed but never started, handed back before its time limit:
    they run again elsewhere (a batch of their own, as a retry's) without using up a
    retry; cancelled ones are failed as such."""
    batch = task.batch
    cancelled = [c for c in call_ids if c in core.doomed]
    if cancelled:
        core.fail_calls(batch, cancelled, Failure(
            JobCancelledError, "the call was cancelled", task.ref, "CANCELLED"))
    call_ids = [c for c in call_ids if c not in core.doomed and c in batch.open_calls]
    if not call_ids:
        return
    if core.cancelling:  # shutdown(cancel_futures=True): nothing new goes out
        core.fail_calls(batch, call_ids, Failure(
            JobCancelledError, "the call was cancelled before it started", task.ref,
            "CANCELLED"))
        return
    calls: dict[int, list[int]] = {}
    for call_id in call_ids:
        calls.setdefault(batch.chunk_of(call_id), []).append(call_id)
        core.close_call(batch, call_id)
    core.out.append(ev.Retry(batch.number, batch.attempt,
                              {k: tuple(v) for k, v in calls.items()}, "a time limit"))


def fail_unfinished(core: CoreState, task: Task, call_ids: list[int], started: bool = True) -> None:
    """Calls a task left without results: retry them, or fail them with the error
    that fits how the task ended."""
    batch, state = task.batch, task.final
    cancelled = [c for c in call_ids if c in core.doomed]
    if cancelled:  # the user's word wins: never retried, never blamed on the task
        core.fail_calls(batch, cancelled, Failure(
            JobCancelledError, "the call was cancelled", task.ref, "CANCELLED"))
        call_ids = [c for c in call_ids if c not in core.doomed]
    if not call_ids:
        return
    live_end = not task.ended or task.killed  # Slurm ended it, not the worker itself
    # not the calls' fault, so they run again without using up a retry: a preemption
    # (where retry_on has it), and calls that never started, left by a task that did
    # left unclaimed for lack of time: its clock (worker/walltime.py) or the warning
    late = (task.late or task.limit_notice) and not started
    free = batch.reruns < MAX_FREE_RERUNS and (late or task.moved or (
        state is not None and live_end and (
            (state.state == "PREEMPTED" and "PREEMPTED" in core.config.retry_on)
            or (not started and task.worker is not None))))
    retried = free or (state is not None and live_end and state.state in core.config.retry_on
                       and batch.attempt <= core.config.max_retries)
    if retried and (state is not None or late) and not core.cancelling:
        calls: dict[int, list[int]] = {}
        for call_id in call_ids:
            calls.setdefault(batch.chunk_of(call_id), []).append(call_id)
            core.close_call(batch, call_id)
        core.out.append(ev.Retry(
            batch.number, batch.attempt + (not free),
            {k: tuple(v) for k, v in calls.items()}, state.state if state else "a time limit",
            batch.reruns + free))
        return
    if task.truncated and live_end and started:
        core.fail_calls(batch, call_ids, Failure(IntegrityError, (
            f"{task.truncated}: its task ended "
            f"({state.state if state else 'state unknown'}) while writing it"),
            task.ref))
        return
    core.fail_calls(batch, call_ids, task_failure(task, started, core.config.result_grace))
