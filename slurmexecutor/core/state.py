"""The decision core: a pure state machine over batches, array tasks and calls.

    events in (engine -> core)                 actions out (core -> engine)
    --------------------------                 ----------------------------
    BatchAdded, TasksSubmitted, SubmitFailed   SubmitTasks, LiftThrottle, CancelTasks
    Record: start/claim/limit/end/outcome      Deliver: this record decides its call
    StreamState: a broken or truncated stream  Fail: calls failed (why, which task)
    SchedulerAnswer, FinalAnswer               QueryScheduler, QueryFinal
    CancelRequested, ClaimsWon, Shutdown       WriteCancel, ClaimChunks, Retry
                                               Claimed, BatchDone

`Core.step(events, now)` returns the actions; it does no I/O and has no clock or thread
of its own, so every policy (when a task is settled, when a call is lost, retries,
scale-out, cancellation) is unit-tested with plain values (tests/test_state.py). The
engine (engine.py) is the only caller: one owner thread per executor. Cancelling, a
batch's width, and retrying or failing unfinished calls are functions of the core's
state in policies.py, warm joins in joins.py: `Core` owns all the state.
"""

from __future__ import annotations

from collections.abc import Iterable

from slurmexecutor.core import answers, joins, policies
from slurmexecutor.core import events as ev
from slurmexecutor.core.events import Action, Event, Failure
from slurmexecutor.core.ledger import (
    REQUEUEABLE,
    Batch,
    CallSet,
    Submission,
    Task,
    calls_seconds,
)
from slurmexecutor.core.store import CoreState
from slurmexecutor.errors import CallLostError, IntegrityError

#: records about a task itself; any other kind with a call id is that call's result
_TASK_KINDS = frozenset({"start", "idle", "claim", "backup", "limit", "late", "handback",
                         "times", "end"})


class Core(CoreState):
    """Every decision about the batches, tasks and calls of `CoreState`."""

    # -- the one entry point -------------------------------------------------------------

    def step(self, events: Iterable[Event], now: float) -> list[Action]:
        """Apply `events`, then the clock's decisions; return what to do."""
        self.out, self.now = [], now
        for key in [k for k, t in self.lingering.items() if now > t.linger_until]:
            del self.lingering[key]
        for event in events:
            self._apply(event, now)
        self._tick(now)
        out, self.out = self.out, []
        return out

    @property
    def idle(self) -> bool:
        return not self.batches

    def warm_free(self, resources: str, now: float) -> int:
        """Idle warm tasks of `resources` no batch waits for (policies.warm_free)."""
        return policies.warm_free(self, resources, now)

    def may_start_wide(self, calls: int, measured: float | None) -> bool:
        """Whether free slots could widen such a batch (policies.may_start_wide)."""
        return policies.may_start_wide(self, calls, measured)

    def to_read(self) -> ev.ReadStreams | None:
        """What the owner reads this round: live tasks, settled ones still awaited
        (lingering), warm ones followed to their end; None when nothing is live."""
        if not self.tasks and not self.lingering and not self.batches and not self.following:
            return None
        watched = {**self.tasks, **self.lingering, **self.following}
        ended = tuple(k for k, t in watched.items() if t.final is not None and not t.ended)
        # batches a warm task may join, also while their own tasks are deferred (an
        # earlier client's warm tasks may join one of its batches after attach), and
        # those whose lost claims no task has reported yet
        folders = tuple(n for n, b in self.batches.items() if (
            b.pending is not None and b.pending.warm) or b.lost or (
            (self.config.keep_alive > 0 or b.attached) and b.steal and b.unclaimed))
        return ev.ReadStreams(frozenset(watched), ended, folders)

    def open_calls(self) -> set[int]:
        return {c for batch in self.batches.values() for c in batch.open_calls}

    # -- events --------------------------------------------------------------------------

    def _apply(self, event: Event, now: float) -> None:
        if isinstance(event, ev.Records):
            self._on_records(event, now)
        elif isinstance(event, ev.BatchAdded):
            self._add_batch(event, now)
        elif isinstance(event, ev.TasksSubmitted):
            batch = self.batches.get(event.batch)
            if batch is not None:
                self._add_tasks(batch, event.job_id, event.offset, event.size, now)
                policies.tasks_submitted(self, batch, event.offset, event.size, now)
        elif isinstance(event, ev.SubmitFailed):
            policies.submit_failed(self, event)
        elif isinstance(event, ev.SubmitDeferred):
            policies.submit_deferred(self, event, now)
        elif isinstance(event, ev.Record):
            task = self.tasks.get((event.batch, event.task))
            if task is not None:
                self._on_record(task, event, now)
            elif (event.batch, event.task) in self.lingering:
                self._on_late_record(self.lingering[(event.batch, event.task)], event)
            elif (event.batch, event.task) in self.following:
                joins.on_warm_record(self, self.following[(event.batch, event.task)], event, now)
        elif isinstance(event, ev.StreamState):
            task = self.tasks.get((event.batch, event.task))
            if task is not None:
                task.error = task.error or event.error
                task.truncated = event.truncated
                task.seen = max(task.seen, event.attempt if event.seen else -1)
        elif isinstance(event, ev.StreamsRead):
            self.scanned = max(self.scanned, event.started)
        elif isinstance(event, ev.StreamFound):  # a joiner not announced (attach)
            batch = self.batches.get(event.batch)
            if batch is not None:
                joins.add_joiner(self, batch, event.task, None, None, now)  # ids from its start
        elif isinstance(event, ev.SchedulerAnswer):
            answers.on_states(self, event.states, now)
        elif isinstance(event, ev.FinalAnswer):
            answers.on_finals(self, event, now)
        elif isinstance(event, ev.CancelRequested):
            policies.cancel(self, event)
        elif isinstance(event, ev.ClaimsWon):
            policies.claims_won(self, event, now)
        elif isinstance(event, ev.ShutdownRequested) and event.cancel_futures:
            # everything handed over so far: skip what has not started, kill nothing
            self.cancelling = True
            policies.cancel(self, ev.CancelRequested(frozenset(self.open_calls()), kill=False))

    def _add_batch(self, event: ev.BatchAdded, now: float) -> None:
        batch = Batch(event.batch, event.chunks, event.planned, event.steal, event.attempt,
                      event.time_limit, CallSet(event.chunks, event.open_calls),
                      unclaimed=set(range(len(event.chunks))), measured=event.measured,
                      free=event.free)
        batch.throttle = policies.start_width(self, event) if event.throttled else (
            event.planned)
        self.batches[batch.number] = batch
        for job_id, offset, size in event.arrays:
            self._add_tasks(batch, job_id, offset, size, now)
            batch.submitted = max(batch.submitted, offset + size)
        if not batch.open_calls:
            return
        batch.resources = event.resources
        batch.reruns = event.reruns
        batch.attached = event.attached
        batch.created = now
        if batch.submitted >= batch.planned:
            return
        # attach: the client died before the rest went out; it goes out now
        batch.pending = Submission(batch.submitted, batch.planned, now)
        if not event.arrays and event.steal and any(until > now and self.warm_for.get(
                key) == event.resources for key, until in self.warm.items()):
            batch.pending.warm = True  # a warm task may take it: wait warm_wait for one
            batch.pending.due = now + self.config.warm_wait
        elif not event.arrays:
            policies.ask(self, batch)

    def _add_tasks(self, batch: Batch, job_id: str, offset: int, size: int,
                   now: float) -> None:
        for index in range(offset, offset + size):
            task = Task(batch, index, job_id, index - offset, now)
            self.tasks[task.key] = task
            batch.tasks.append(task)

    def _on_records(self, event: ev.Records, now: float) -> None:
        """Each record as its own `Record` would be, a live task's call results without
        building one (`_on_result`)."""
        key = (event.batch, event.task)
        for kind, call_id, body in event.records:
            task = self.tasks.get(key)
            if task is not None and call_id is not None and kind not in _TASK_KINDS:
                self._on_result(task, kind, call_id, body)
            else:
                self._apply(ev.Record(event.batch, event.task, kind, call_id, body,
                                      event.attempt), now)

    def _on_record(self, task: Task, record: ev.Record, now: float) -> None:
        batch, kind = task.batch, record.kind
        if kind not in _TASK_KINDS:
            if record.call_id is not None:
                self._on_result(task, kind, record.call_id, record.body)
        elif kind == "start":
            task.started = True
            task.attempt = max(task.attempt, record.attempt)
            task.worker = (record.body["host"], record.body["pid"])
            task.worker_started = record.body.get("started")
            batch.first_start = batch.first_start or now
            if task.job_id is None and record.body.get("job_id"):  # a warm task joined
                task.job_id = str(record.body["job_id"])
                task.array_index = int(record.body.get("array_index") or 0)
            self.warm.pop((task.job_id or "", task.array_index or 0), None)
        elif kind == "idle":
            key = (task.job_id or "", task.array_index or 0)
            if record.body and record.body.get("leaving"):
                self.warm.pop(key, None)
            elif task.job_id is not None:
                self.warm[key] = now + float((record.body or {}).get("keep_alive", 0))
                self.warm_for[key] = batch.resources
        elif kind == "claim":
            assert record.call_id is not None
            chunk = record.call_id
            batch.unclaimed.discard(chunk)
            batch.lost.discard(chunk)
            calls = batch.open_calls.among(batch.chunks[chunk])
            task.unresolved.update(calls)
            batch.owner.update(dict.fromkeys(calls, task))
            self.out.append(ev.Claimed(batch.number, chunk, task.ref, calls))
        elif kind == "backup":  # a second copy of a straggling chunk: first result wins
            assert record.call_id is not None
            chunk = record.call_id
            calls = batch.open_calls.among(batch.chunks[chunk])
            task.unresolved.update(calls)
            batch.backup.update(dict.fromkeys(calls, task))
            done = tuple(c for c in batch.chunks[chunk] if c not in batch.open_calls)
            if done:  # what the first copy finished: the backup skips it
                self.out.append(ev.WriteCancel(batch.number, chunk, done))
        elif kind == "limit":
            task.limit_notice = True
        elif kind == "late":  # its next chunk would outlast it: it claims no more, and
            task.late, batch.last_failed = True, task  # what nobody claims runs again free
        elif kind == "handback":  # near its time limit: calls it claimed but never started
            policies.hand_back(self, task, [c for c in record.body["calls"]
                                   if batch.owner.get(c) is task])
        elif kind == "times" and record.body:  # a chunk's calls' own time
            batch.busy += calls_seconds(record.body)
        elif kind == "end":  # the last record of an attempt: its stream is complete
            task.attempt_ended(record.attempt, (record.body or {}).get("signal"))
            joined = (record.body or {}).get("joined")
            if joined is None:
                self.warm.pop((task.job_id or "", task.array_index or 0), None)
            elif joined in self.batches and record.body.get("as") is not None:
                joins.add_joiner(self, self.batches[joined], int(record.body["as"]), task.job_id,
                                 task.array_index, now)  # announced where the client looks

    def _on_result(self, task: Task, kind: str, call_id: int, body: object) -> None:
        """A call's result (ok, raised, crash, skip, ...); later duplicates (requeues,
        backups) are ignored."""
        batch = task.batch
        if call_id not in batch.open_calls:
            return
        batch.done += 1
        other = None
        if batch.backup:  # a second copy runs it too: the first result wins
            other = batch.backup.get(call_id)
            other = batch.owner.get(call_id) if other is task else other
        self.close_call(batch, call_id)
        if other is not None and other is not task:
            policies.stop_copy(self, batch, other, call_id)
        self._deliver(task, call_id, kind, body)

    def _deliver(self, task: Task, call_id: int, kind: str, body: object,
                 late: bool = False) -> None:
        """Hand a call's result over: appended to the last action when that delivers
        the same task's results alike (one action for a run of them)."""
        delivery = (call_id, kind, body, call_id in self.doomed)
        last = self.out[-1] if self.out else None
        if type(last) is ev.Deliver and last.task is task.ref and last.late == late:
            last.calls.append(delivery)
        else:
            self.out.append(ev.Deliver(task.ref, [delivery], late))

    def _on_late_record(self, task: Task, record: ev.Record) -> None:
        call_id = record.call_id
        if record.kind == "end" or not task.verdicts:
            self.lingering.pop(task.key, None)
        elif call_id in task.verdicts and record.kind not in _TASK_KINDS:  # a result
            task.verdicts.discard(call_id)
            for batch in self.batches.values():  # a retry may carry it: it is done now
                if call_id in batch.open_calls:
                    self.close_call(batch, call_id)
            self._deliver(task, call_id, record.kind, record.body, late=True)

    # -- the clock -----------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        if self.warm:  # those past their keep_alive have left
            self.warm = {key: until for key, until in self.warm.items() if until > now}
            self.warm_for = {key: self.warm_for.get(key, "") for key in self.warm}
        if self.following:  # ... and are no longer followed
            self.following = {key: task for key, task in self.following.items()
                              if task.slurm_key in self.warm}
        if not self.batches:
            return
        if now >= self.next_poll:
            job_ids = frozenset(t.job_id for t in self.watched_tasks() if t.job_id is not None)
            if job_ids:
                self.next_poll = now + self.config.poll_interval
                self.out.append(ev.QueryScheduler(job_ids))
        for task in list(self.tasks.values()):
            self._settle_task(task, now)
        for batch in list(self.batches.values()):
            self._settle_batch(batch, now)

    def _settle_task(self, task: Task, now: float) -> None:
        """Retire a task that has ended; fail (or retry) the claimed calls it left.

        Its stream is complete once its `end` record is read. Without one (the worker was
        killed outright), the scheduler's final state counts on a read of the folder that
        began after the client learned that state: at once when the client had opened the
        task's stream before (NFS close-to-open: an open after the writer closed it shows
        all it wrote; the client creates each array task's stream when it submits), and
        after `result_grace` s otherwise (a stream it never saw may be late, not lost)."""
        batch = task.batch
        if batch.backup and (task.error or task.ended or task.final):
            policies.release_copies(self, task)
        if task.error:
            self.fail_calls(batch, sorted(task.unresolved), Failure(IntegrityError, task.error,
                                                                task.ref))
        elif task.ended and (not task.killed or task.job_id is None):  # (no id: nothing
            if task.limit_notice:  # to ask the scheduler about; a joiner that never started)
                batch.last_failed = task  # stopped claiming at the time limit
            if task.unresolved:
                policies.fail_unfinished(self, task, sorted(task.unresolved))
        elif task.final and self.scanned > task.final_since and (
                task.killed or (task.seen >= task.latest_attempt and self.config.close_to_open)
                or now - task.final_since >= self.config.result_grace) and (
                task.final.state not in REQUEUEABLE or task.final_polls >= 2):
            if task.unresolved or batch.unclaimed:
                batch.last_failed = task
            if task.unresolved and not task.ended:  # its results may still be on the way
                task.verdicts = set(task.unresolved)
                task.linger_until = now + self.config.result_grace
                self.lingering[task.key] = task
            if task.unresolved:
                policies.fail_unfinished(self, task, sorted(task.unresolved))
            if not batch.steal and task.index in batch.unclaimed:  # nobody else may take it
                policies.claim_then_fail(self, batch, (task.index,), task)
        else:
            return
        self.tasks.pop(task.key, None)

    def _settle_batch(self, batch: Batch, now: float) -> None:
        live = self.live_tasks(batch)
        if not batch.unclaimed and batch.submitted:  # nothing left for tasks yet to start
            policies.cancel_pending(self, [t for t in live if not t.started  # (a joiner
                                           and t.index not in batch.joiners])  # runs)
        if not batch.open_calls:  # all done: tasks that did not start are not needed
            policies.cancel_pending(self, [t for t in live
                                           if not t.started and t.key in self.tasks])
            for task in live:
                self.tasks.pop(task.key, None)
                if self.config.keep_alive > 0 and task.started and not task.ended and (
                        task.job_id is not None):  # it waits for the next batch now
                    key = (task.job_id, task.array_index or 0)
                    self.warm[key] = max(self.warm.get(key, 0.0), now + self.config.keep_alive)
                    self.warm_for[key] = batch.resources
                    self.following[task.key] = task
            del self.batches[batch.number]
            if self.doomed:  # forget its calls, but not those a lingering task may yet
                awaited = {c for t in self.lingering.values() for c in t.verdicts}  # answer
                awaited |= self.open_calls()  # nor those a retry carries in another batch
                finished = {c for chunk in batch.chunks for c in chunk} - awaited
                self.doomed -= finished
            started = sum(1 for t in batch.tasks if t.started)
            per_call = (now - batch.first_start) * started / batch.done if (
                batch.done and batch.first_start is not None) else None
            if per_call is not None and batch.busy:  # the chunks' own time, if read
                per_call = min(per_call, batch.busy / batch.done)
            self.out.append(ev.BatchDone(batch.number, per_call))
            return
        if batch.pending is not None:
            policies.submit_when_due(self, batch, now)
            if batch.pending is not None:  # its tasks are still to come
                return
        if not batch.unclaimed:
            if not live and batch.lost:
                policies.fail_orphans(self, batch, now)
            return
        if self.config.keep_alive > 0 and not batch.wanted_sent and (
                now - batch.created >= self.config.warm_wait) and not any(
                t.started for t in live) and any(
                until > now and self.warm_for.get(key) == batch.resources
                for key, until in self.warm.items()):  # idle warm tasks may hold its CPUs
            batch.wanted_sent = True
            self.out.append(ev.AnnounceBatch(batch.number))
        if batch.throttled and batch.first_start is not None and now >= batch.next_scale:
            policies.scale_out(self, batch, now)
        if not self.live_tasks(batch):  # nobody is left to claim them
            failed = batch.last_failed
            error = batch.submit_error
            if failed is None or error is not None:
                policies.claim_then_fail(self, batch, tuple(sorted(batch.unclaimed)), Failure(
                    type(error), str(error), error=error) if error is not None else Failure(
                    CallLostError, "no array task of its batch was left to run this call"))
            else:
                policies.claim_then_fail(self, batch, tuple(sorted(batch.unclaimed)), failed)


def window_due(opened: float, touched: float, quiet: float, longest: float) -> float:
    """When a submission window goes out: `quiet` s after its last call, `longest` s
    after its first at the latest."""
    return min(touched + quiet, opened + longest)
