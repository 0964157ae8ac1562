"""The owner thread's lease renewal and its end (engine.py): failing what it holds when
it cannot follow the run any more, releasing the lease, ending warm tasks."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

from slurmexecutor._log import log
from slurmexecutor.core.state import Core
from slurmexecutor.errors import RunInUseError
from slurmexecutor.folder import warm
from slurmexecutor.folder.lease import Lease
from slurmexecutor.owner.batches import Settings
from slurmexecutor.owner.caching import CallCache
from slurmexecutor.owner.dependencies import Dependent
from slurmexecutor.owner.futures import FutureSink, SinkTable
from slurmexecutor.owner.handoff import CachedResult, Launch, NotifyCancelled, Submit, Window
from slurmexecutor.schedulers import Backend

#: the stdlib's words for a call made after the executor shut down
SHUT_DOWN = "cannot schedule new futures after shutdown"


class TakenOver(Exception):
    """Stops the owner loop after another client took the run over."""


def refuse(request: Any, error: BaseException) -> None:
    """Fail the futures of a request the owner will never take."""
    if isinstance(request, (Submit, Dependent, CachedResult)) and FutureSink(
            request.future).launch():
        request.future.set_exception(error)
    elif isinstance(request, Launch):
        for sink in request.sinks:
            for call_id in sink.call_ids:
                sink.deliver(call_id, False, error)
    elif isinstance(request, NotifyCancelled):
        FutureSink(request.future).launch()  # CANCELLED -> CANCELLED_AND_NOTIFIED


class LeaseAndEnd:
    """Part of `Engine`: the lease and the end of the owner thread."""

    run_dir: Path
    lease: Lease
    backend: Backend
    core: Core
    settings: Settings
    sinks: SinkTable
    error: BaseException | None
    _windows: dict[str, Window]
    _dependents: dict[int, Dependent]
    cache: CallCache | None
    _requests: queue.SimpleQueue[Any]
    _next_renewal: float
    _stopping: bool
    _put_lock: threading.Lock
    _closed: bool

    def _renew_lease(self, now: float) -> None:
        if now < self._next_renewal:
            return
        self._next_renewal = now + self.lease.renew_every
        try:
            kept = self.lease.renew()
        except OSError as error:
            log.warning("slurmexecutor: could not renew the run's lease: %s", error)
            return
        if not kept:
            log.warning("slurmexecutor: run %s was taken over by another client",
                        self.run_dir.name)
            self._abandon(RunInUseError(
                f"run {self.run_dir.name} was taken over by another client (attach "
                "with take_over=True); this client stopped following it"))
            raise TakenOver

    def _abandon(self, error: BaseException) -> None:
        """ev.Fail every future this owner still holds (it cannot follow them any more);
        a request put from now on is failed at once (`Engine.put`)."""
        with self._put_lock:
            self.error = error
            self._closed = True
        waiting = [r.future for w in self._windows.values() for r in w.calls.values()]
        for future in [*waiting, *(d.future for d in self._dependents.values())]:
            if FutureSink(future).launch():
                future.set_exception(error)
        self._windows, self._dependents = {}, {}
        held = self.sinks.calls()
        self.sinks.clear()
        for call_id, sink in held:
            sink.deliver(call_id, False, error)
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                break
            refuse(request, error)

    def _close(self) -> None:
        """The loop ended: refuse what callers put from now on (and what they put after
        its last look at the queue), then let go of the cache, warm tasks and lease."""
        self._stopping = True
        with self._put_lock:
            self._closed = True
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                break
            refuse(request, self.error or RuntimeError(SHUT_DOWN))
        if self.cache is not None:
            self.cache.flush()  # the results still being stored
            self.cache.record(self.run_dir)  # hits and misses, for `slurmexecutor status`
        try:
            self._end_warm_tasks()
            self.backend.close()
        finally:
            if not isinstance(self.error, RunInUseError):
                try:
                    self.lease.release()
                except OSError as error:
                    log.warning("slurmexecutor: could not release the run's lease: %s", error)


    def _end_warm_tasks(self) -> None:
        """No idle task holds an allocation after the executor is gone: the signal file
        says closed (they exit at their next poll) and those known are cancelled, with
        (a started one is ended by the scheduler: the executor is gone)."""
        if self.settings.keep_alive <= 0 or isinstance(self.error, RunInUseError):
            return
        try:
            warm.close(self.run_dir)
        except OSError as error:
            log.warning("slurmexecutor: could not tell warm tasks to end: %s", error)
        refs = [f"{job_id}_{index}" for job_id, index in self.core.warm]
        if refs:
            try:
                self.backend.cancel(refs)
            except Exception as error:  # noqa: BLE001  (they end at keep_alive anyway)
                log.warning("slurmexecutor: could not cancel warm tasks: %s", error)
