"""The owner: one thread per executor that owns every batch, task and future transition.

Caller threads only put requests on a queue (`put`) and wake the owner; they never touch
batch or task state and never run a scheduler command or a folder write. Each round the
owner (compare CPython's concurrent/futures/process.py, `_ExecutorManagerThread`):

  1. drains the requests: calls join the submission window, ready batches are written,
     cancels and shutdown become events;
  2. reads the new records of live tasks' result streams (one scandir);
  3. feeds all of it into the pure core (state.py) and carries out its actions
     (actions.py): sbatch, scontrol, scancel, squeue/sacct queries, claims, cancel files,
     and completing futures (done-callbacks run here);
  4. renews the run's lease, then sleeps until woken or the next deadline.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

from slurmexecutor._log import log
from slurmexecutor.core import events as ev
from slurmexecutor.core.events import Event
from slurmexecutor.core.state import Core
from slurmexecutor.errors import (
    SlurmExecutorError,
    SubmissionError,
)
from slurmexecutor.folder import spool, warm
from slurmexecutor.folder.lease import Lease
from slurmexecutor.owner.actions import Actions
from slurmexecutor.owner.batches import (
    BatchSpec,
    Settings,
    without_calls,
    write_batch,
)
from slurmexecutor.owner.caching import CallCache
from slurmexecutor.owner.dependencies import Dependent
from slurmexecutor.owner.futures import FutureSink, SinkTable, SlurmFuture
from slurmexecutor.owner.handoff import NotifyCancelled, Window
from slurmexecutor.owner.intake import Intake
from slurmexecutor.owner.queries import SchedulerQueries
from slurmexecutor.owner.streams import StreamReader
from slurmexecutor.owner.teardown import SHUT_DOWN, LeaseAndEnd, TakenOver, refuse
from slurmexecutor.schedulers import Backend

#: seconds the scheduler's idle-slot figure is used before it is asked again
FREE_TTL = 5.0
#: after news the owner reads again every ms for this long (a warm round trip's result
#: comes within a few ms), while at most QUICK_TASKS tasks are live; then it backs off
QUICK_PHASE, QUICK_TASKS = 0.015, 64
#: events of every round that are no news by themselves
ROUTINE = (ev.StreamsRead, ev.StreamState, ev.SchedulerAnswer)


class Engine(LeaseAndEnd, Intake, Actions):
    """The owner thread and everything only it may touch."""

    def __init__(self, run_dir: Path, key: bytes, backend: Backend, core: Core,
                 settings: Settings, lease: Lease, cache: CallCache | None = None) -> None:
        self.run_dir, self.key, self.backend, self.core = run_dir, key, backend, core
        self.settings, self.lease = settings, lease
        self.sinks = SinkTable()
        #: task-seconds per call of the latest finished batch of each function set (read
        #: by callers to chunk a map: plain dict reads)
        self.cost: dict[tuple[str, ...], float] = {}
        self.next_batch = 0
        self._signal = warm.Signal(run_dir)  # the warm tasks' signal file
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._put_lock = threading.Lock()
        self._closed = False  # the owner failed: requests are refused (teardown.py)
        self._wake = threading.Event()
        self._flush = False
        self._stopping = False
        #: submission windows, one per resource set (`SlurmExecutor.options`)
        self._windows: dict[str, Window] = {}
        self._journals: dict[int, dict] = {}
        #: functions files already written, by the windows' function digests: a window
        #: of the same functions refers to it (one file less per batch)
        self._function_files: dict[tuple, str] = {}
        #: idle slots the scheduler reported, by resources key: (when asked, how many)
        self._free: dict[str, tuple[float, int | None]] = {}
        self._settings_of: dict[int, Settings] = {}  # live batches' resources etc.
        #: calls waiting for their input futures (dependencies.py), by call id
        self._dependents: dict[int, Dependent] = {}
        self._ready: list[Dependent] = []
        self.cache = cache  # the result cache (caching.py), if on
        self._cache_keys: dict[int, str] = {}  # call id -> key its result is stored under
        self._streams = StreamReader(run_dir, key)
        self._late_sinks: dict[int, FutureSink] = {}  # failed calls of unfinished chunks
        self._events: list[Event] = []
        self._next_renewal = 0.0
        self._deferred_warned = False  # one WARNING when a submission limit is first hit
        self.error: BaseException | None = None  # why the owner stopped early
        self._thread = threading.Thread(target=self._run, name="slurmexecutor-owner",
                                        daemon=True)
        self._queries = SchedulerQueries(backend, self._wake.set)

    # -- caller side (any thread) ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def put(self, request: Any) -> None:
        with self._put_lock:  # vs. _abandon: no request is left behind in the queue
            if not self._closed:
                self._requests.put(request)
                self._wake.set()
                return
        refuse(request, self.error or RuntimeError(SHUT_DOWN))

    def flush(self) -> None:
        """Send the submission window out now (someone waits for a result)."""
        self._flush = True
        self._wake.set()

    def notify_cancelled(self, future: SlurmFuture) -> None:
        self.put(NotifyCancelled(future))

    def is_owner_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive() and not self.is_owner_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            wait, news = 0.01, 0.0
            while True:
                flush, self._flush = self._flush, False  # before draining: none is lost
                busy = self._drain()
                now = time.monotonic()
                if self._windows:
                    self._launch_due(flush or self._stopping, now)
                joins = self.core.joins
                busy |= self._read_streams()
                self._events += self._queries.take()
                busy |= self._step()
                if self.core.joins != joins:  # the joiner's stream, without a round's wait
                    self._read_streams()
                    self._step()
                if self._windows:  # calls whose inputs just ended; a warm task went idle
                    flush, self._flush = self._flush, False
                    if self._launch_due(flush, time.monotonic()):
                        busy |= self._step()
                self._renew_lease(now)
                if self._stopping and self.core.idle and not self._windows and (
                        not self._dependents and self._requests.empty()):
                    return
                news = now if busy else news
                quick = now - news < QUICK_PHASE and len(self.core.tasks) <= QUICK_TASKS
                wait = 0.001 if busy or quick else min(
                    wait * 1.5, 0.05 if not self.core.idle else 1.0)
                if self._windows:
                    wait = max(0.0, min(wait, self._window_due() - time.monotonic()))
                self._wake.wait(wait)
                self._wake.clear()
        except TakenOver:
            pass
        except BaseException as error:  # noqa: BLE001  (no future may hang on a bug)
            log.exception("slurmexecutor: the executor's owner thread failed")
            self._abandon(SlurmExecutorError(f"the executor's owner thread failed: {error!r}"))
        finally:
            self._close()

    def _launch_due(self, flush: bool, now: float) -> bool:
        """Send out the windows that are due, all of them on `flush`; a window that an
        idle warm task can take at once goes out now (a lone call waits for no window;
        a burst still packs once the idle tasks have batches)."""
        if flush or now >= self._window_due():
            self._launch_windows()
            return True
        eager = [key for key in self._windows if self.core.warm_free(key, now) > 0]
        for key in eager:
            self._launch_window(self._windows.pop(key))
        return bool(eager)

    def _step(self) -> bool:
        """Feed the pending events to the core and carry out its actions, until quiet.
        Busy (poll again within a ms) only for news: a read or a scheduler answer that
        changed nothing, and the next query, let the owner back off."""
        busy = any(not isinstance(e, ROUTINE) for e in self._events)
        while True:
            events, self._events = self._events, []
            actions = self.core.step(events, time.monotonic())
            for action in actions:
                try:
                    self._do(action)
                except Exception:  # noqa: BLE001  (one failed action must not stop the rest)
                    log.exception("slurmexecutor: %s failed", type(action).__name__)
            busy |= any(not isinstance(a, ev.QueryScheduler) for a in actions)
            if not self._events:
                return busy

    # -- batches -------------------------------------------------------------------------

    def _launch(self, spec: BatchSpec, sinks: list[FutureSink] | None) -> dict | None:
        """Write a batch and hand it to the core, which asks for its tasks. The sinks'
        futures go from PENDING to RUNNING here (the one place; a map's too). A retry
        (`sinks` None) keeps the sinks its calls have."""
        if sinks is not None:
            # PENDING -> RUNNING here; a future cancelled before the owner got to it
            # becomes CANCELLED_AND_NOTIFIED and its call never leaves the client
            kept = [s for s in sinks if s.future.running() or s.launch()]
            if len(kept) < len(sinks):
                spec = without_calls(spec, {c for s in kept for c in s.call_ids})
                if not spec.chunks:
                    return None
            for sink in kept:
                self.sinks.add(sink)
        throttled = spec.steal and spec.planned > 1
        call_ids = [c for chunk in spec.chunks for c in chunk.call_ids]
        settings = spec.settings or self.settings
        try:
            number = self._new_batch_number()
            journal = write_batch(self.run_dir, self.key, number, spec, throttled, settings,
                                  self._signal.written if self.settings.keep_alive > 0 else None)
        except Exception as error:  # noqa: BLE001  (disk full, ...): fail, do not hang
            failure = SubmissionError(f"could not write the batch: {error!r}")
            self._fail_now(tuple(call_ids), failure)
            return None
        self._journals[number] = journal
        self._settings_of[number] = settings
        for index, chunk in enumerate(spec.chunks):
            for call_id in chunk.call_ids:
                held = self.sinks.get(call_id)
                future = held.future if held is not None else None
                if held is not None and isinstance(future, SlurmFuture):
                    future.chunk = (number, index)
                    future._attempt = spec.attempt
                    if len(held.call_ids) > 1:  # a map chunk: one future for all
                        break
        measured = self.cost.get(tuple(spec.names))
        free = self._free_slots(settings, spec.planned) if throttled and spec.attempt == 1 and (
            self.core.may_start_wide(len(call_ids), measured)) else None
        self._events.append(ev.BatchAdded(
            number, [chunk.call_ids for chunk in spec.chunks], spec.planned, spec.steal,
            spec.attempt, settings.time_limit, throttled,
            resources=settings.resources_key(), free=free, measured=measured,
            reruns=spec.reruns))
        return journal

    def _new_batch_number(self) -> int:
        """The next number whose batch folder this client creates (never one another
        client of the run made: see spool.reserve_batch_dir)."""
        while True:
            number, self.next_batch = self.next_batch, self.next_batch + 1
            if spool.reserve_batch_dir(self.run_dir, number):
                return number

    def _free_slots(self, settings: Settings, taking: int) -> int | None:
        """Idle slots for these resources: one scheduler query per FREE_TTL s, less
        the tasks batches planned since then (None: the scheduler did not say); the
        batch asking plans `taking` tasks."""
        key, now = settings.resources_key(), time.monotonic()
        asked, free = self._free.get(key, (float("-inf"), None))
        if now - asked > FREE_TTL:
            try:
                free = self.backend.idle_slots(settings.resources)
            except Exception as error:  # noqa: BLE001  (then the work alone widens it)
                log.info("slurmexecutor: asking for idle CPUs failed: %s", error)
                free = None
            asked = now
        self._free[key] = (asked, None if free is None else max(0, free - taking))
        return free

    def queue_event(self, event: Event) -> None:
        """For attach, before the owner starts: an event for its first round."""
        self._events.append(event)

    def add_journal(self, journal: dict) -> None:
        """For attach: a batch written by an earlier client."""
        self._journals[journal["batch"]] = journal
        self.next_batch = max(self.next_batch, journal["batch"] + 1)

    def _read_streams(self) -> bool:
        """New records of live tasks (and of settled ones still awaited) become events."""
        wanted = self.core.to_read()
        if wanted is None:
            return False
        events = self._streams.read(wanted.streams, wanted.ended, wanted.folders)
        self._events += events
        return any(isinstance(event, (ev.Record, ev.Records)) for event in events)
