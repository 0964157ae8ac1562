"""The futures users hold, and the sinks through which the owner thread completes them.

Only the owner thread (engine.py) moves a future on: RUNNING when its call is handed to
the cluster, then FINISHED; a future cancelled while its call is still in the client's
submission window is moved to CANCELLED_AND_NOTIFIED by the owner, promptly, and its
call never leaves the client. This is ProcessPoolExecutor's contract: `cancel()` is True
only before the call is handed over; `SlurmExecutor.cancel(futures)` stops handed-over
calls too, best effort.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, LOGGER, PENDING
from pathlib import Path
from typing import Any, Literal, Protocol, overload

from slurmexecutor.folder import formats
from slurmexecutor.owner.bars import CallProgress

LOG_TAIL_LINES = 20


class Owner(Protocol):
    """What a future asks of the owner thread's engine (engine.py)."""

    run_dir: Path

    def flush(self) -> None: ...
    def notify_cancelled(self, future: SlurmFuture) -> None: ...
    def is_owner_thread(self) -> bool: ...


class SlurmFuture(Future):
    """A `concurrent.futures.Future` that knows its call and its task's log.

    Waiting on it (`result`, `exception`) first flushes the submission window, so a
    lone call is not held back for company.
    """

    def __init__(self, engine: Owner, call_ids: Sequence[int]) -> None:
        super().__init__()
        self._engine = engine
        self.call_ids = call_ids
        self.chunk: tuple[int, int] | None = None  # (batch, chunk) once handed over
        self._attempt = 1  # set by the owner thread
        self._log_path: Path | None = None  # ... when a task claims the call

    @property
    def call_id(self) -> int:
        return self.call_ids[0]

    def _invoke_callbacks(self) -> None:
        """As Future's, but on the owner thread a callback's SystemExit or
        KeyboardInterrupt is logged as the stdlib logs a callback's error: let loose there
        it would stop the owner, and other futures would never end."""
        if not self._engine.is_owner_thread():
            super()._invoke_callbacks()  # type: ignore[misc]
            return
        for callback in self._done_callbacks:  # type: ignore[attr-defined]
            try:
                callback(self)
            except BaseException:  # noqa: BLE001
                LOGGER.exception("exception calling callback for %r", self)

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self._engine.notify_cancelled(self)
        return cancelled

    def result(self, timeout: float | None = None) -> Any:
        self._before_wait()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._before_wait()
        return super().exception(timeout)

    def _before_wait(self) -> None:
        if self.done():
            return
        if self._engine.is_owner_thread():
            raise RuntimeError(
                "waiting for a slurmexecutor result inside a done-callback would deadlock: "
                "callbacks run on the executor's owner thread")
        self._engine.flush()

    @property
    def attempts(self) -> int:
        """How many times the call was submitted (more than 1 after retries)."""
        return self._attempt

    @property
    def log_path(self) -> Path | None:
        """The stdout/stderr log of the array task that runs (or ran) this call."""
        return self._log_path

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the task's log (the log is shared by the task's calls)."""
        return read_tail(self.log_path, lines)

    @overload
    def log(self, follow: Literal[False] = False) -> str: ...

    @overload
    def log(self, follow: Literal[True]) -> Iterator[str]: ...

    def log(self, follow: bool = False) -> str | Iterator[str]:
        """This call's own part of its task's log (the worker marks where each begins).
        `follow=True`: an iterator of its lines as they are printed, until it is done."""
        if follow:
            from slurmexecutor.folder.logfollow import follow_call

            return follow_call(lambda: self.log_path, self.call_id, self.done)
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return call_log(path.read_text(errors="replace"), self.call_id)


class FutureSink:
    """One call, one Future."""

    def __init__(self, future: Future, call_id: int | None = None) -> None:
        self.future = future
        self.call_ids: Sequence[int] = (
            [call_id] if call_id is not None else future.call_ids)  # type: ignore[attr-defined]

    def launch(self) -> bool:
        """The call is handed to the cluster: RUNNING, or False if it was cancelled (or
        is already running or done: nothing to do, and nothing logged)."""
        if self.future._state not in (PENDING, CANCELLED):
            return False
        try:
            return self.future.set_running_or_notify_cancel()
        except RuntimeError:  # already cancelled and notified
            return False

    def claimed(self, calls: int) -> None:
        """A task took the call's chunk."""

    def deliver(self, call_id: int, ok: bool, value: Any, replace: bool = False) -> None:
        if self.future.done():
            return
        try:
            if ok:
                self.future.set_result(value)
            else:
                self.future.set_exception(value)
        except InvalidStateError:  # pragma: no cover  (only the owner completes futures)
            pass


_MISSING = object()


class ChunkSink(FutureSink):
    """Consecutive calls of a map: one Future whose result is (values, errors): the
    values in call order, and the exceptions of failed calls by position (a result
    held costs one list slot, not an (ok, value) pair)."""

    def __init__(self, future: Future, first_call: int, size: int,
                 progress: CallProgress | None = None) -> None:
        super().__init__(future, first_call)
        self.call_ids = range(first_call, first_call + size)
        self.first_call = first_call
        self.values: list[Any] = [_MISSING] * size
        self.errors: dict[int, BaseException] = {}
        self.missing = size
        self.progress = progress if progress is not None and progress.shown else None

    def claimed(self, calls: int) -> None:
        if self.progress:
            self.progress.started(calls)

    def deliver(self, call_id: int, ok: bool, value: Any, replace: bool = False) -> None:
        slot = call_id - self.first_call
        if self.values[slot] is not _MISSING:  # a late result replaces a failure only
            if replace and slot in self.errors and not self.future.done():
                if ok:
                    self.values[slot] = value
                    del self.errors[slot]
                else:
                    self.errors[slot] = value
            return
        if ok:
            self.values[slot] = value
        else:
            self.values[slot], self.errors[slot] = None, value
        self.missing -= 1
        if self.progress:
            self.progress.advance(ok)
        if self.missing == 0:
            super().deliver(call_id, True, (self.values, self.errors))


class SinkTable:
    """The owner's sinks by call id: a sink of one call is one entry, a run of
    consecutive calls of one sink (a map chunk) is one entry too, not one per call.
    `pop` hands out each call's sink once."""

    def __init__(self) -> None:
        self._single: dict[int, FutureSink] = {}
        self._starts: list[int] = []  # sorted starts of the runs (a few per batch)
        self._runs: dict[int, list] = {}  # start -> [stop, sink, popped calls (a set)]
        self._last: tuple[int, list] | None = None  # the run found last (calls come in runs)

    def add(self, sink: FutureSink) -> None:
        ids = sink.call_ids
        runs = [(ids.start, ids.stop)] if isinstance(ids, range) and ids.step == 1 else (
            formats.compress_ids(ids))
        for start, stop in runs:
            if stop - start == 1:
                self._single[start] = sink
                continue
            bisect.insort(self._starts, start)
            self._runs[start] = [stop, sink, set()]
            self._last = None

    def _find(self, call_id: int) -> tuple[int, list] | None:
        last = self._last
        if last is not None and self._starts[last[0]] <= call_id < last[1][0]:
            return last
        index = bisect.bisect_right(self._starts, call_id) - 1
        if index < 0:
            return None
        entry = self._runs[self._starts[index]]
        if call_id >= entry[0]:
            return None
        self._last = (index, entry)
        return self._last

    def get(self, call_id: int) -> FutureSink | None:
        sink = self._single.get(call_id)
        if sink is not None:
            return sink
        found = self._find(call_id)
        return None if found is None else found[1][1]

    def holders(self, call_ids: Sequence[int]) -> list[FutureSink]:
        """The distinct sinks (by future) of `call_ids` (distinct ids): ids that fill
        an interval within one run (a map's chunk) are one lookup."""
        if call_ids:
            low, high = min(call_ids), max(call_ids)
            found = self._find(low) if high - low == len(call_ids) - 1 else None
            if found is not None and high < found[1][0]:
                return [found[1][1]]
        held = {id(s.future): s for c in call_ids if (s := self.get(c)) is not None}
        return list(held.values())

    def pop(self, call_id: int) -> FutureSink | None:
        """The call's sink, once (None when it was popped already); a run's entry goes
        with the last of its calls."""
        sink = self._single.pop(call_id, None)
        if sink is not None:
            return sink
        found = self._find(call_id)
        if found is None:
            return None
        index, (stop, sink, popped) = found
        if call_id in popped:
            return None
        popped.add(call_id)
        if len(popped) == stop - self._starts[index]:
            del self._runs[self._starts[index]]
            del self._starts[index]
            self._last = None
        return sink

    def calls(self) -> list[tuple[int, FutureSink]]:
        """Every call still held (not popped), with its sink."""
        held = list(self._single.items())
        for start in self._starts:
            stop, sink, popped = self._runs[start]
            held += [(c, sink) for c in range(start, stop) if c not in popped]
        return held

    def clear(self) -> None:
        self._single.clear()
        self._starts.clear()
        self._runs.clear()
        self._last = None

    def __len__(self) -> int:
        return len(self._single) + sum(
            stop - start - len(popped) for start, (stop, _, popped) in self._runs.items())


def call_log(text: str, call_id: int) -> str:
    """Cut one call's output out of a task log, using the worker's markers."""
    marker = f"--- slurmexecutor call {call_id} ---\n"
    start = text.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    end = text.find("--- slurmexecutor call ", start)
    return text[start:] if end < 0 else text[start:end]


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
