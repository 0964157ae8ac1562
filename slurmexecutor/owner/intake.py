"""Part of the owner (engine.py): what callers hand it, before it becomes a batch.

Calls submitted one by one wait in a submission window, one per resource set (a view's
calls, `SlurmExecutor.options`, go out in arrays of their own); calls with futures among
their arguments wait for them (dependencies.py); cancels and shutdown become events for
the core. Only the owner thread runs this.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from slurmexecutor.core import events as ev
from slurmexecutor.core.state import window_due
from slurmexecutor.errors import DependencyError, SlurmExecutorError
from slurmexecutor.owner.batches import (
    BatchSpec,
    Chunk,
    Settings,
    auto_chunksize,
    shipped_sys_path,
)
from slurmexecutor.owner.caching import CallCache
from slurmexecutor.owner.dependencies import Dependent, InputDone
from slurmexecutor.owner.futures import FutureSink, SlurmFuture
from slurmexecutor.owner.handoff import (
    CachedResult,
    CancelCalls,
    Launch,
    NotifyCancelled,
    Shutdown,
    Submit,
    Window,
)


class Intake:
    """Part of `Engine`: draining requests, the submission windows, waiting calls."""

    settings: Settings
    cost: dict[tuple[str, ...], float]
    _requests: queue.SimpleQueue[Any]
    _windows: dict[str, Window]
    _dependents: dict[int, Dependent]
    _ready: list[Dependent]  # calls whose last input just ended, taken in order
    cache: CallCache | None
    _cache_keys: dict[int, str]  # calls whose results are to be cached
    _events: list[ev.Event]
    _function_files: dict[tuple, str]
    _stopping: bool
    _flush: bool

    def put(self, request: Any) -> None:
        raise NotImplementedError

    def is_owner_thread(self) -> bool:
        raise NotImplementedError

    def _launch(self, spec: BatchSpec, sinks: list[FutureSink] | None) -> dict | None:
        raise NotImplementedError

    def _window_due(self) -> float:
        return min(window_due(w.opened, w.touched, self.settings.submit_window,
                              self.settings.max_window) for w in self._windows.values())

    def _drain(self) -> bool:
        busy = False
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return busy
            busy = True
            if isinstance(request, Submit):
                self._add_to_window(request)
            elif isinstance(request, CachedResult):
                self._resolve_cached(request)
            elif isinstance(request, Dependent):
                self._dependents[request.future.call_id] = request
                for future in request.inputs.values():  # callbacks may run right here
                    future.add_done_callback(self._input_callback(request))
            elif isinstance(request, InputDone):
                self._input_done(request.dependent)
            elif isinstance(request, Launch):
                self._launch_windows()  # earlier submits go out first
                if request.cache_keys:
                    self._cache_keys.update(request.cache_keys)
                self._launch(request.spec, request.sinks)
            elif isinstance(request, CancelCalls):
                self._events.append(ev.CancelRequested(request.call_ids))
            elif isinstance(request, NotifyCancelled):
                self._drop_from_window(request.future)
            elif isinstance(request, Shutdown):
                self._shutdown(request.cancel_futures)

    def _add_to_window(self, request: Submit) -> None:
        if request.cache_key is not None:
            self._cache_keys[request.future.call_id] = request.cache_key
        now = time.monotonic()
        key = request.settings.resources_key()
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = Window(now, now, request.settings)
        window.add(request)
        window.touched = now
        if len(window.calls) >= self.settings.max_batch:
            self._launch_window(self._windows.pop(key))

    def _input_callback(self, dependent: Dependent) -> Callable[[Future], None]:
        """On this owner's thread (its own futures' callbacks run there) the input is
        taken in this round; from any other thread it is put on the queue."""
        def done(_: Future) -> None:
            if self.is_owner_thread():
                self._take_inputs(dependent)
            else:
                self.put(InputDone(dependent))
        return done

    def _take_inputs(self, dependent: Dependent) -> None:
        """A loop, not recursion: completing a call runs the callbacks of the calls that
        wait for it, which come back here (a chain of any length)."""
        self._ready.append(dependent)
        if len(self._ready) > 1:  # an outer call of this loop takes it
            return
        while self._ready:
            self._input_done(self._ready[0])
            self._ready.pop(0)

    def _input_done(self, dependent: Dependent) -> None:
        """One input of a waiting call is done; with the last, the call joins the window
        (or fails, when an input failed or was cancelled)."""
        dependent.remaining -= 1
        if dependent.remaining > 0 or self._dependents.pop(
                dependent.future.call_id, None) is None:  # cancelled meanwhile
            return
        try:
            error: BaseException | None = dependent.failed_input()
            key = None
            if error is None:
                args, kwargs = dependent.resolved()
                if self.cache is not None and dependent.call_keys is not None:
                    key = self.cache.key(dependent.call_keys, args, kwargs)
                    hit = self.cache.lookup([key])
                    if hit:
                        self._resolve_cached(CachedResult(dependent.future, hit[0]))
                        return
                arguments = dependent.pickled(args, kwargs)
        except Exception as exc:  # noqa: BLE001  (a result that does not unpickle, ...)
            error = exc if isinstance(exc, SlurmExecutorError) else DependencyError(
                f"{dependent.fn_name}: its arguments could not be rebuilt with its "
                f"inputs' results: {exc!r}")
            error.__cause__ = error.__cause__ or exc
        if error is not None:
            if FutureSink(dependent.future).launch():
                dependent.future.set_exception(error)
            return
        self._add_to_window(Submit(dependent.future, dependent.fn_key,
                                   dependent.fn_blob, dependent.fn_name, arguments,
                                   dependent.settings, key))
        self._flush = True  # it has waited already: it goes out in the next round

    def _resolve_cached(self, request: CachedResult) -> None:
        if FutureSink(request.future).launch():
            request.future.set_result(request.value)

    def _drop_from_window(self, future: SlurmFuture) -> None:
        self._cache_keys.pop(future.call_id, None)
        if self._dependents.pop(future.call_id, None) is not None:
            FutureSink(future).launch()  # CANCELLED -> CANCELLED_AND_NOTIFIED
            return
        for window in self._windows.values():
            if window.calls.pop(future.call_id, None) is not None:
                FutureSink(future).launch()  # CANCELLED -> CANCELLED_AND_NOTIFIED: waiters
                return  # wake

    def _shutdown(self, cancel_futures: bool) -> None:
        self._stopping = True
        self._events.append(ev.ShutdownRequested(cancel_futures))
        if not cancel_futures:
            return
        windows, self._windows = self._windows, {}  # detached: cancelling a future runs
        dependents, self._dependents = self._dependents, {}  # callbacks that look here
        for future in [*(r.future for w in windows.values() for r in w.calls.values()),
                       *(d.future for d in dependents.values())]:
            future.cancel()
            FutureSink(future).launch()
            self._cache_keys.pop(future.call_id, None)

    def _launch_windows(self) -> None:
        windows, self._windows = self._windows, {}
        for window in windows.values():
            self._launch_window(window)

    def _launch_window(self, window: Window) -> None:
        calls = [r for r in window.calls.values() if FutureSink(r.future).launch()]
        if not calls:
            return
        settings = window.settings
        size = settings.chunksize or auto_chunksize(
            len(calls), settings.slots, self.cost.get(tuple(window.names)))
        chunks = []
        for start in range(0, len(calls), size):
            group = calls[start:start + size]
            chunks.append(Chunk([r.future.call_id for r in group],
                                [(window.index[r.fn_key], r.arguments, 1) for r in group]))
        # the same functions, shipped with the same sys.path: their file is reused
        digests = (tuple(window.index), tuple(shipped_sys_path()))
        spec = BatchSpec("submit", self._function_files.get(digests, window.functions),
                         window.names, chunks, min(settings.slots, len(chunks)),
                         settings=settings)
        journal = self._launch(spec, [FutureSink(r.future) for r in calls])
        if journal is not None and digests not in self._function_files:
            if len(self._function_files) >= 256:
                self._function_files.clear()
            self._function_files[digests] = journal["functions_file"]
