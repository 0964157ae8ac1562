"""Part of the owner (engine.py): carrying out the core's actions. Results and failures
reach the futures, tasks are submitted, cancelled or widened, retries are written as
batches of their own, claims and cancel files are written, and the scheduler is asked.
What comes of them (answers, claims won, submissions) goes back as events for the next
round. Only the owner thread runs this.
"""

from __future__ import annotations

from pathlib import Path

from slurmexecutor._log import log
from slurmexecutor.core import events as ev
from slurmexecutor.core.events import Action, Event
from slurmexecutor.core.state import Core
from slurmexecutor.errors import SubmissionDeferred, SubmissionError
from slurmexecutor.folder import cancels, claims, procs, spool, warm
from slurmexecutor.owner import outcomes
from slurmexecutor.owner.batches import (
    BatchSpec,
    Settings,
    grown,
    lift_throttle,
    retry_chunks,
    submit_arrays,
)
from slurmexecutor.owner.caching import CallCache
from slurmexecutor.owner.futures import FutureSink, SinkTable, SlurmFuture
from slurmexecutor.owner.queries import SchedulerQueries
from slurmexecutor.owner.streams import StreamReader
from slurmexecutor.schedulers import Backend


class Actions:
    """Part of `Engine`: the core's actions carried out (`_do`)."""

    run_dir: Path
    key: bytes
    backend: Backend
    core: Core
    settings: Settings
    sinks: SinkTable
    cost: dict[tuple[str, ...], float]
    cache: CallCache | None
    _cache_keys: dict[int, str]
    _late_sinks: dict[int, FutureSink]
    _events: list[Event]
    _journals: dict[int, dict]
    _settings_of: dict[int, Settings]
    _signal: warm.Signal
    _streams: StreamReader
    _queries: SchedulerQueries
    _deferred_warned: bool

    def _launch(self, spec: BatchSpec, sinks: list[FutureSink] | None) -> dict | None:
        raise NotImplementedError

    def _deliver(self, action: ev.Deliver) -> None:
        """Resolve the calls' sinks (one action for a run of a task's results)."""
        sinks, late, task, cache_keys = self.sinks, action.late, action.task, self._cache_keys
        for call_id, kind, body, cancelled_here in action.calls:
            sink = sinks.pop(call_id)
            if sink is None and late:
                sink = self._late_sinks.pop(call_id, None)
            if sink is None:
                continue
            ok, value = outcomes.decode(self.run_dir, kind, call_id, body, task, cancelled_here)
            sink.deliver(call_id, ok, value, replace=late)
            key = cache_keys.pop(call_id, None) if cache_keys else None
            if key is not None and ok and self.cache is not None:
                self.cache.store_result(key, body)

    def _do(self, action: Action) -> None:
        if isinstance(action, ev.Deliver):
            self._deliver(action)
        elif isinstance(action, ev.Fail):
            self._fail(action)
        elif isinstance(action, ev.AnnounceBatch):
            self._signal.want(action.batch)
        elif isinstance(action, ev.SubmitTasks):
            self._submit_tasks(action)
        elif isinstance(action, ev.QueryScheduler):
            self._queries.ask(action.job_ids)  # squeue off this thread (queries.py)
            self._events += self._queries.take()
        elif isinstance(action, ev.QueryFinal):
            alive = frozenset(key for key, (host, pid, started) in action.workers.items()
                              if procs.process_alive(host, pid, started))
            self._events.append(ev.FinalAnswer(action.tasks, self.backend.final_states(
                action.keys), alive))
        elif isinstance(action, ev.Claimed):
            path = outcomes.log_file(self.run_dir, action.task)
            held = self.sinks.holders(action.call_ids)
            if held:  # the chunk's calls started: one progress update for all
                held[0].claimed(len(action.call_ids))
            for sink in held:
                if isinstance(sink.future, SlurmFuture):
                    sink.future._log_path = path
        elif isinstance(action, ev.WriteCancel):
            cancels.cancel_calls(self.run_dir, self.key, action.batch, action.chunk,
                                 list(action.call_ids), action.stop)
        elif isinstance(action, ev.ClaimChunks):
            self._events.append(ev.ClaimsWon(action.batch, self._claim(action), action.chunks))
        elif isinstance(action, ev.CancelTasks):
            self.backend.cancel(list(action.refs), pending_only=True)
        elif isinstance(action, ev.LiftThrottle):
            lift_throttle(self.backend, self._settings(action.batch), self.run_dir,
                          self._journals[action.batch], action.to)
        elif isinstance(action, ev.Retry):
            self._retry(action)
        elif isinstance(action, ev.BatchDone):
            journal = self._journals.pop(action.batch, None)
            self._settings_of.pop(action.batch, None)
            self._signal.done(action.batch)
            if journal is not None and action.seconds_per_call is not None:
                self.cost[tuple(journal["functions"])] = action.seconds_per_call
            self._late_sinks = {c: s for c, s in self._late_sinks.items()
                                if not s.future.done()}
            self._streams.forget(action.batch, keep=self.core.following)

    def _fail(self, action: ev.Fail) -> None:
        failure = action.failure
        if failure.task is not None:
            failure = outcomes.told(failure, self._settings(failure.task.batch).resources,
                                    len(action.call_ids))
        for call_id in action.call_ids:
            sink = self.sinks.pop(call_id)
            self._cache_keys.pop(call_id, None)
            if sink is not None:
                sink.deliver(call_id, False, outcomes.failure_error(self.run_dir, failure,
                                                                    call_id))
                if not sink.future.done():  # a map chunk: a late result may still win
                    self._late_sinks[call_id] = sink

    def _submit_tasks(self, action: ev.SubmitTasks) -> None:
        arrays = submit_arrays(self.backend, self._settings(action.batch), self.run_dir,
                               self.key, self._journals[action.batch], action.first,
                               action.count, action.throttled, action.width)
        submitted = action.first
        try:
            for job_id, offset, size in arrays:
                self._events.append(ev.TasksSubmitted(action.batch, job_id, offset, size))
                submitted = offset + size
        except SubmissionDeferred as error:  # a limit: the work waits (policies.py)
            (log.info if self._deferred_warned else log.warning)(
                "batch %d: Slurm refused its array for now (%s); it waits and is "
                "submitted when the queue shrinks", action.batch, error)
            self._deferred_warned = True
            self._events.append(ev.SubmitDeferred(
                action.batch, submitted, action.first + action.count - submitted,
                action.throttled, error))
        except Exception as error:  # noqa: BLE001  (its calls fail: they must not wait)
            if not isinstance(error, SubmissionError):
                error = SubmissionError(f"could not submit the batch: {error!r}")
            log.warning("batch %d: %s", action.batch, error)
            self._events.append(ev.SubmitFailed(action.batch, error))

    def _retry(self, action: ev.Retry) -> None:
        journal = self._journals[action.batch]
        call_ids = tuple(c for calls in action.calls.values() for c in calls)
        log.warning("retrying %d call(s) of batch %d after %s (attempt %d)", len(call_ids),
                    action.batch, action.state, action.attempt)
        try:
            chunks = retry_chunks(self.run_dir, self.key, action.batch, dict(action.calls),
                                  journal.get("shared_file"))
        except Exception as error:  # noqa: BLE001
            self._fail_now(call_ids, SubmissionError(f"could not prepare the retry: {error!r}"))
            return
        try:
            settings = grown(self._settings(action.batch), action.state, action.attempt)
        except ValueError as error:
            self._fail_now(call_ids, SubmissionError(f"could not prepare the retry: {error}"))
            return
        spec = BatchSpec("retry", journal["functions_file"], journal["functions"], chunks,
                         min(settings.slots, len(chunks)), attempt=action.attempt,
                         reruns=action.reruns,
                         shared=journal.get("shared_file"), settings=settings)
        self._launch(spec, None)

    def _claim(self, action: ev.ClaimChunks) -> tuple[int, ...]:
        """The chunks the client wins. One whose claim it cannot write (a full disk)
        counts as won: the client's verdict on its calls stands (a task that runs them
        after all is not heard), where none would ever come."""
        won = []
        for chunk in action.chunks:
            try:
                if claims.try_claim(spool.claim_path(self.run_dir, action.batch, chunk),
                                    "client"):
                    won.append(chunk)
            except OSError as error:
                log.warning("slurmexecutor: could not claim chunk %d of batch %d (%s); its "
                            "calls are settled here", chunk, action.batch, error)
                won.append(chunk)
        return tuple(won)

    def _settings(self, batch: int) -> Settings:
        """A live batch's resources etc. (the executor's for batches of an earlier client)."""
        return self._settings_of.get(batch, self.settings)

    def _fail_now(self, call_ids: tuple[int, ...], error: BaseException) -> None:
        for call_id in call_ids:
            sink = self.sinks.pop(call_id)
            if sink is not None:
                sink.deliver(call_id, False, error)
