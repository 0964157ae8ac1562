"""The monitor: turns what the folder and the scheduler say into Future transitions.

One thread per executor. Each tick it
  1. reads the new records of the result streams of live tasks (cheap: one scandir):
     `claim` (a task took a chunk: its calls are running), results, `limit`, `end`;
  2. at most every `poll_interval` seconds, asks the backend about ALL live array jobs
     in ONE query, so scheduler load does not grow with the number of calls or jobs;
  3. fails the calls of tasks that ended without their result, after a short grace for
     shared filesystems, with the error that fits the final state (or retries them);
  4. scales a batch out: its array goes out throttled to one task at a time (%1), and
     the throttle is lifted once that task has run for `probe` seconds (or waited
     `pending_grace` in the queue) with chunks still unclaimed. Cheap work thus costs
     one task start; the tasks it did not need are cancelled while still pending.

Futures are completed outside the monitor's lock, so a done-callback may submit more.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import spool
from .errors import (
    ERROR_FOR_STATE,
    CallLostError,
    IntegrityError,
    JobCancelledError,
    JobTimeoutError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskFailedError,
    WorkerCrashedError,
)
from .progress import CallProgress
from .schedulers import Backend, TaskState, state_of

log = logging.getLogger("slurmexecutor")
LOG_TAIL_LINES = 20
#: Final states after which Slurm may requeue the task: settle them only when a second
#: scheduler answer still shows them final.
REQUEUEABLE = frozenset({"NODE_FAIL", "PREEMPTED", "REQUEUED", "BOOT_FAIL"})


class CallSink(Protocol):
    """Where a call's outcome goes: a Future of one call, or a chunk of a map."""

    def set_running(self) -> None: ...
    def deliver(self, call_id: int, ok: bool, value: Any) -> None: ...


class FutureSink:
    """One call, one Future."""

    def __init__(self, future: Future) -> None:
        self.future = future

    def set_running(self) -> None:
        if not self.future.running() and not self.future.done():
            self.future.set_running_or_notify_cancel()

    def deliver(self, call_id: int, ok: bool, value: Any) -> None:
        if self.future.cancelled() or self.future.done():
            return
        if ok:
            self.future.set_result(value)
        else:
            self.future.set_exception(value)


class ChunkSink:
    """Consecutive calls of a map: one Future whose result is the list of outcomes."""

    def __init__(self, future: Future, first_call: int, size: int,
                 progress: CallProgress | None = None) -> None:
        self.future, self.first_call = future, first_call
        self.outcomes: list[tuple[bool, Any] | None] = [None] * size
        self.missing = size
        self.progress = progress

    def set_running(self) -> None:
        pending = not self.future.running() and not self.future.done()
        if pending and self.future.set_running_or_notify_cancel() and self.progress:
            self.progress.started(self.missing)

    def deliver(self, call_id: int, ok: bool, value: Any) -> None:
        slot = call_id - self.first_call
        if self.outcomes[slot] is not None:
            return
        self.outcomes[slot] = (ok, value)
        self.missing -= 1
        if self.progress:
            self.progress.advance(ok)
        if self.missing == 0 and not self.future.done():
            self.set_running()
            if not self.future.cancelled():
                self.future.set_result(self.outcomes)


@dataclass(eq=False)
class Batch:
    """Calls submitted together: chunks that up to `planned` array tasks claim."""

    number: int
    chunks: list[list[int]]
    planned: int
    steal: bool = True
    attempt: int = 1
    time_limit: str | None = None
    throttled: bool = False  # its arrays run one task at a time until scaled out
    submitted: int = 0  # tasks submitted so far
    created: float = field(default_factory=time.monotonic)
    first_start: float | None = None  # when the client saw its first task start
    unclaimed: set[int] = field(default_factory=set)
    open_calls: set[int] = field(default_factory=set)
    tasks: list[Task] = field(default_factory=list)
    last_failed: Task | None = None  # the latest task that ended without finishing
    submit_error: BaseException | None = None  # why some of its tasks were never submitted

    def __post_init__(self) -> None:
        self.unclaimed = set(range(len(self.chunks)))
        self.open_calls = {call_id for chunk in self.chunks for call_id in chunk}
        #: call -> (chunk, position), for batches whose calls have futures of their own
        #: (a map's chunk has one future: it is running as soon as the chunk is claimed)
        self.place: dict[int, tuple[int, int]] = {}

    def index_places(self) -> None:
        self.place = {call_id: (index, position) for index, chunk in enumerate(self.chunks)
                      for position, call_id in enumerate(chunk)}


@dataclass(eq=False)
class Task:
    """One array task as the monitor follows it."""

    batch: Batch
    index: int
    job_id: str | None = None
    array_index: int | None = None
    unresolved: set[int] = field(default_factory=set)  # claimed calls without outcome
    started: bool = False
    worker: tuple[str, int] | None = None  # (host, pid) from the worker's start record
    limit_notice: bool = False
    ended: bool = False  # the worker wrote its end record
    final: TaskState | None = None
    final_since: float = 0.0
    final_polls: int = 0  # scheduler answers that showed it final (requeues undo it)
    registered: float = field(default_factory=time.monotonic)
    error: str | None = None  # an integrity failure in its stream
    cursors: list[spool.StreamCursor] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, int]:
        return (self.batch.number, self.index)

    @property
    def attempt(self) -> int:
        return self.batch.attempt


class Monitor:
    """Watches the run folder and the backend; resolves the sinks of calls."""

    def __init__(
        self, run_dir: Path, key: bytes, backend: Backend, *, poll_interval: float,
        result_grace: float, retry: Callable[[Batch, list[int], TaskState], bool],
        scale_out: Callable[[Batch], None], probe: float = 0.3,
        pending_grace: float = 2.0,
    ) -> None:
        self.run_dir, self.key, self.backend = run_dir, key, backend
        self.poll_interval, self.result_grace = poll_interval, result_grace
        self.retry, self.scale_out = retry, scale_out
        self.probe, self.pending_grace = probe, pending_grace
        self.batches: dict[int, Batch] = {}
        self.tasks: dict[tuple[int, int], Task] = {}
        self.sinks: dict[int, CallSink] = {}
        self.task_of_call: dict[int, Task] = {}
        self.claimed_by: dict[tuple[int, int], Task] = {}  # (batch, chunk) -> its task
        self.cursors: dict[str, spool.StreamCursor] = {}
        self._lock = threading.RLock()
        self._deferred: list = []  # transitions made outside a tick, applied by the next
        self._wake = threading.Event()
        self._stop = False
        self._next_poll = 0.0
        self._thread = threading.Thread(target=self._loop, name="slurmexecutor-monitor",
                                        daemon=True)
        self._thread.start()

    # -- called by the executor ---------------------------------------------------------

    def add_batch(self, batch: Batch, sinks: dict[int, CallSink]) -> None:
        with self._lock:
            self.batches[batch.number] = batch
            self.sinks.update(sinks)
        self._wake.set()

    def add_tasks(self, batch: Batch, tasks: list[Task]) -> None:
        """Follow newly submitted tasks of a batch (and count them as submitted)."""
        with self._lock:
            for task in tasks:
                self.tasks[task.key] = task
            batch.tasks += tasks
            batch.submitted += len(tasks)
        self._wake.set()

    def fail_calls(self, batch: Batch, call_ids: list[int], error: BaseException) -> None:
        """Fail calls (e.g. their submission was refused); the monitor thread completes
        their futures, never the caller's thread while it holds a lock."""
        with self._lock:
            for call_id in call_ids:
                self._resolve(batch, call_id, False, error, self._deferred)
        self._wake.set()

    def fail_pending(self, call_ids: list[int], sinks: dict[int, CallSink],
                     error: BaseException) -> None:
        """Fail calls whose batch could not be written or submitted at all."""
        with self._lock:
            for batch in self.batches.values():
                batch.open_calls.difference_update(call_ids)
            for call_id in call_ids:
                sink = self.sinks.pop(call_id, None) or sinks.get(call_id)
                if sink is not None:
                    self._deferred.append((sink, call_id, False, error))
        self._wake.set()

    def drop_chunk(self, batch: Batch, chunk: int) -> None:
        """Forget a chunk whose calls the client all cancelled (it claimed the chunk)."""
        with self._lock:
            batch.unclaimed.discard(chunk)
            for call_id in batch.chunks[chunk]:
                self._resolve(batch, call_id, False, None, [])
        self._wake.set()

    def is_monitor_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def task_of_chunk(self, batch: int, chunk: int) -> Task | None:
        with self._lock:
            return self.claimed_by.get((batch, chunk))

    def has_live_tasks(self, batch: Batch) -> bool:
        with self._lock:
            return any(task.key in self.tasks for task in batch.tasks)

    def live_batches(self) -> list[Batch]:
        with self._lock:
            return list(self.batches.values())

    def live_tasks(self) -> list[Task]:
        with self._lock:
            return list(self.tasks.values())

    def poke(self) -> None:
        self._wake.set()

    def stop(self, wait: bool = True) -> None:
        self._stop = True
        self._wake.set()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        idle_wait = 0.01
        while not self._stop:
            try:
                busy = self.tick()
            except BaseException:
                log.exception("slurmexecutor monitor tick failed")
                busy = False
            idle_wait = 0.01 if busy else min(idle_wait * 1.5, 0.1 if self.batches else 0.25)
            self._wake.wait(idle_wait)
            self._wake.clear()

    def tick(self) -> bool:
        """One round of observation; True when something changed."""
        transitions: list[tuple[CallSink, int | None, bool, Any]] = []
        try:
            with self._lock:
                transitions, self._deferred = self._deferred, []
                if not self.batches:
                    return bool(transitions)
                now = time.monotonic()
                if now >= self._next_poll:
                    self._next_poll = now + self.poll_interval
                    try:
                        self._poll_scheduler(now)
                    except Exception as error:  # noqa: BLE001  (results still come in)
                        log.warning("slurmexecutor: asking the scheduler failed: %s", error)
                self._read_streams(transitions, now)
                for task in list(self.tasks.values()):
                    self._settle_task(task, transitions, now)
                for batch in list(self.batches.values()):
                    self._settle_batch(batch, transitions, now)
        finally:
            self._apply(transitions)
        return bool(transitions)

    def _read_streams(self, transitions: list, now: float) -> None:
        try:
            entries = list(os.scandir(self.run_dir))
        except FileNotFoundError:
            return
        for entry in entries:
            parsed = spool.parse_stream_name(entry.name)
            task = self.tasks.get(parsed) if parsed else None
            if task is None:
                continue
            cursor = self.cursors.get(entry.name)
            if cursor is None:
                cursor = self.cursors[entry.name] = spool.StreamCursor(Path(entry.path))
                task.cursors.append(cursor)
            if entry.stat().st_size <= cursor.offset:
                continue
            for record in spool.read_records(cursor, self.key):
                self._on_record(task, record, transitions, now)
            if cursor.error and not task.error:
                task.error = cursor.error

    def _on_record(self, task: Task, record: tuple, transitions: list, now: float) -> None:
        kind, call_id, body = record
        batch = task.batch
        if kind == "start":
            task.started, task.worker = True, (body["host"], body["pid"])
            batch.first_start = batch.first_start or now
        elif kind == "claim":
            self._on_claim(task, call_id, transitions)
        elif kind == "limit":
            task.limit_notice = True
        elif kind == "end":
            task.ended = True
        elif call_id in batch.open_calls:  # later duplicates (requeues) are ignored
            ok, value = self._outcome(task, kind, call_id, body)
            self._resolve(batch, call_id, ok, value, transitions)
            self._after_result(batch, call_id, transitions)

    def _on_claim(self, task: Task, chunk: int, transitions: list) -> None:
        batch = task.batch
        batch.unclaimed.discard(chunk)
        self.claimed_by[(batch.number, chunk)] = task
        for call_id in batch.chunks[chunk]:
            if call_id in batch.open_calls:
                task.unresolved.add(call_id)
                self.task_of_call[call_id] = task
        self._mark_next_running(batch, chunk, 0, transitions)

    def _mark_next_running(self, batch: Batch, chunk: int, start: int,
                           transitions: list) -> None:
        """A chunk's calls run in order: the first open one from `start` is running now.
        The others stay pending (so `Future.cancel()` still works on them)."""
        calls = batch.chunks[chunk]
        for call_id in calls[start:]:
            if call_id in batch.open_calls:
                sink = self.sinks.get(call_id)
                if sink is not None:
                    transitions.append((sink, None, True, None))
                return

    def _after_result(self, batch: Batch, call_id: int, transitions: list) -> None:
        place = batch.place.get(call_id)
        if place is not None:
            self._mark_next_running(batch, place[0], place[1] + 1, transitions)

    def _outcome(self, task: Task, kind: str, call_id: int, body: Any) -> tuple[bool, Any]:
        if kind == "ok":
            try:
                return True, pickle.loads(body)
            except BaseException as exc:  # noqa: BLE001  (even SystemExit from __setstate__)  # noqa: BLE001
                return False, SerializationError(
                    f"the result of call {call_id} cannot be unpickled here: {exc!r}")
        if kind == "raised":
            return False, _rebuild_exception(body)
        if kind == "unpicklable":
            return False, SerializationError(body)
        if kind == "crash":
            log.warning("job %s_%s: the worker died running call %d (%s)", task.job_id,
                        task.array_index, call_id, body["text"])
            return False, self._task_error(
                task, WorkerCrashedError, f"the worker died running this call: {body['text']}",
                call_id, exit_code=body["exit_code"], signal=body["signal"])
        if kind == "skip":
            sink = self.sinks.get(call_id)
            if sink is None or sink.future.cancelled():
                return False, None  # we cancelled it: the future is already cancelled
            return False, JobCancelledError(  # e.g. `slurmexecutor cancel RUN`
                "the call was cancelled outside this client before it started",
                job_id=task.job_id, array_index=task.array_index, state="CANCELLED",
                call_id=call_id)
        return False, IntegrityError(f"unknown record kind {kind!r} for call {call_id}")

    def _poll_scheduler(self, now: float) -> None:
        watched = [task for task in self.tasks.values()
                   if task.job_id is not None and not task.ended]
        if not watched:
            return
        states = self.backend.states({task.job_id for task in watched})
        vanished = []
        for task in watched:
            state = state_of(states, task.job_id, task.array_index)
            if state is None:
                if now - task.registered > 2 * self.poll_interval + 5 and not (
                        task.worker and spool.process_alive(*task.worker)):
                    vanished.append(task)
            elif state.final:
                if task.final is None:
                    task.final, task.final_since = state, now
                task.final_polls += 1
            else:
                if task.final is not None:  # requeued: pending or running again
                    task.final, task.final_polls = None, 0
                task.started = task.started or state.running
        if vanished:
            finals = self.backend.final_states([(t.job_id, t.array_index) for t in vanished])
            for task in vanished:
                if task.final is None:
                    task.final = finals.get((task.job_id, task.array_index),
                                            TaskState("UNKNOWN"))
                    task.final_since = now
                task.final_polls += 2  # gone from the queue: it will not come back

    # -- settling -----------------------------------------------------------------------

    def _settle_task(self, task: Task, transitions: list, now: float) -> None:
        """Retire a task that has ended; fail (or retry) the claimed calls it left."""
        if task.error:
            error = IntegrityError(task.error)
            self._fail(task, sorted(task.unresolved), lambda call_id: error, transitions)
        elif task.ended:
            if task.limit_notice:
                task.batch.last_failed = task  # stopped claiming at the time limit
            if task.unresolved:
                self._fail_unfinished(task, sorted(task.unresolved), transitions)
        elif task.final and now - task.final_since >= self.result_grace and (
                task.final.state not in REQUEUEABLE or task.final_polls >= 2):
            batch = task.batch
            if task.unresolved or batch.unclaimed:
                batch.last_failed = task
            if task.unresolved:
                self._fail_unfinished(task, sorted(task.unresolved), transitions)
            if not batch.steal and task.index in batch.unclaimed:  # nobody else may take it
                batch.unclaimed.discard(task.index)
                spool.try_claim(spool.claim_path(self.run_dir, batch.number, task.index),
                                "client")
                call_ids = [c for c in batch.chunks[task.index] if c in batch.open_calls]
                self._fail_unfinished(task, call_ids, transitions, started=False)
        else:
            return
        self.tasks.pop(task.key, None)

    def _settle_batch(self, batch: Batch, transitions: list, now: float) -> None:
        live = [task for task in batch.tasks if task.key in self.tasks]
        if not batch.unclaimed and batch.submitted:  # nothing left for tasks yet to start
            pending = [t for t in live if not t.started and t.job_id is not None]
            if pending:
                self.backend.cancel([f"{t.job_id}_{t.array_index}" for t in pending])
                for task in pending:
                    self.tasks.pop(task.key, None)
        if not batch.open_calls:  # all done (or cancelled): unstarted tasks are not needed
            pending = [t for t in live if not t.started and t.job_id is not None
                       and t.key in self.tasks]
            if pending:
                self.backend.cancel([f"{t.job_id}_{t.array_index}" for t in pending])
            for task in live:
                self.tasks.pop(task.key, None)
            del self.batches[batch.number]
            return
        if not batch.unclaimed or batch.submitted == 0:
            return  # nothing to claim, or the executor is still submitting the batch
        if batch.throttled:
            probe_over = batch.first_start is not None and now - batch.first_start >= self.probe
            if probe_over or now - batch.created >= self.pending_grace:
                batch.throttled = False
                self.scale_out(batch)
        if not live:  # nobody is left to claim them
            chunks = sorted(batch.unclaimed)
            call_ids = [c for chunk in chunks for c in batch.chunks[chunk]
                        if c in batch.open_calls]
            for chunk in chunks:
                spool.try_claim(spool.claim_path(self.run_dir, batch.number, chunk), "client")
            batch.unclaimed.clear()
            failed = batch.last_failed
            if failed is None or batch.submit_error is not None:
                error = batch.submit_error or CallLostError(
                    "no array task of its batch was left to run this call")
                self._fail(None, call_ids, lambda call_id: error, transitions, batch)
            else:
                self._fail_unfinished(failed, call_ids, transitions, started=False)

    def _fail_unfinished(self, task: Task, call_ids: list[int], transitions: list,
                         started: bool = True) -> None:
        """Calls a task left without results: retry them, or fail them with the error
        that fits how the task ended."""
        state = task.final
        if state is not None and not task.ended and self._retried(task, call_ids, state):
            for call_id in call_ids:  # the retry batch carries them on
                task.unresolved.discard(call_id)
                task.batch.open_calls.discard(call_id)
            return
        truncated = [c for c in task.cursors if c.pending_bytes]
        if truncated and not task.ended and started:
            cursor = truncated[0]
            error = IntegrityError(
                f"{cursor.path} is truncated: its task ended "
                f"({state.state if state else 'state unknown'}) with {cursor.pending_bytes} "
                f"bytes of an incomplete record at byte {cursor.offset}")
            self._fail(task, call_ids, lambda call_id: error, transitions)
            return
        what = "this call finished" if started else "this call could start"
        if task.limit_notice:
            error_type, message = JobTimeoutError, (
                f"the call did not finish within the time limit ({task.batch.time_limit})")
        elif task.ended:
            error_type, message = CallLostError, (
                "the worker ended without running this call (see the log)")
        elif state is None or state.state == "UNKNOWN":
            error_type, message = CallLostError, (
                "the task left the queue without a result and the scheduler has no record "
                "of how it ended (no accounting)")
        else:
            error_type = ERROR_FOR_STATE.get(state.state, WorkerCrashedError)
            message = f"the task ended ({state.state}) before {what}"
        exit_code = state.exit_code if state else None
        sig = state.signal if state else None
        log.warning("job %s_%s: %d call(s) failed: %s", task.job_id, task.array_index,
                    len(call_ids), message)
        self._fail(task, call_ids, lambda call_id: self._task_error(
            task, error_type, message, call_id, exit_code=exit_code, signal=sig),
            transitions)

    def _retried(self, task: Task, call_ids: list[int], state: TaskState) -> bool:
        try:
            return self.retry(task.batch, call_ids, state)
        except Exception:
            log.exception("batch %d: retry failed", task.batch.number)
            return False

    def _task_error(self, task: Task, error_type: type[TaskFailedError], message: str,
                    call_id: int, *, exit_code: int | None, signal: int | None
                    ) -> TaskFailedError:
        log_file = self.log_file(task)
        state = task.final.state if task.final else ("CRASHED" if signal or exit_code else None)
        if error_type is JobTimeoutError:
            state = "TIMEOUT"
        return error_type(
            message, job_id=task.job_id, array_index=task.array_index, state=state,
            exit_code=exit_code, signal=signal, log_path=log_file,
            log_tail=read_tail(log_file), attempts=task.attempt, call_id=call_id)

    def log_file(self, task: Task) -> Path | None:
        if task.job_id is None:
            return None
        return self.run_dir / "logs" / f"{task.job_id}_{task.array_index}.log"

    # -- transitions --------------------------------------------------------------------

    def _resolve(self, batch: Batch, call_id: int, ok: bool, value: Any,
                 transitions: list) -> None:
        if call_id not in batch.open_calls:
            return
        batch.open_calls.discard(call_id)
        task = self.task_of_call.pop(call_id, None)
        if task is not None:
            task.unresolved.discard(call_id)
        sink = self.sinks.pop(call_id, None)
        if value is None and not ok:
            return  # a cancelled call: its future is already cancelled
        if sink is not None:
            transitions.append((sink, call_id, ok, value))

    def _fail(self, task: Task | None, call_ids: list[int],
              error_for: Callable[[int], BaseException], transitions: list,
              batch: Batch | None = None) -> None:
        batch = batch or task.batch
        for call_id in call_ids:
            self._resolve(batch, call_id, False, error_for(call_id), transitions)

    def _apply(self, transitions: list) -> None:
        for sink, call_id, ok, value in transitions:
            try:
                if call_id is None:
                    sink.set_running()
                else:
                    sink.deliver(call_id, ok, value)
            except Exception:
                if not sink.future.done():
                    log.exception("slurmexecutor: could not complete a future")


def _rebuild_exception(body: dict) -> BaseException:
    """The exception a call raised, as its own type when it unpickles here."""
    error: BaseException | None = None
    if body.get("blob") is not None:
        try:
            error = pickle.loads(body["blob"])
        except Exception:  # noqa: BLE001
            error = None
    if not isinstance(error, BaseException):
        error = RemoteError(f"{body['type']}: {body['message']}")
    error.__cause__ = RemoteTraceback(f'\n"""\n{body["tb"]}"""')
    return error


def read_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file ('' when it does not exist)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
