"""The futures users hold, and the sinks through which the owner thread completes them.

Only the owner thread (engine.py) moves a future on: RUNNING when its call is handed to
the cluster, then FINISHED; a future cancelled while its call is still in the client's
submission window is moved to CANCELLED_AND_NOTIFIED by the owner, promptly, and its
call never leaves the client. This is ProcessPoolExecutor's contract: `cancel()` is True
only before the call is handed over; `SlurmExecutor.cancel(futures)` stops handed-over
calls too, best effort.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, InvalidStateError
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bars import CallProgress

if TYPE_CHECKING:
    from .engine import Engine

LOG_TAIL_LINES = 20


class SlurmFuture(Future):
    """A `concurrent.futures.Future` that knows its call and its task's log.

    Waiting on it (`result`, `exception`) first flushes the submission window, so a
    lone call is not held back for company.
    """

    def __init__(self, engine: Engine, call_ids: list[int]) -> None:
        super().__init__()
        self._engine = engine
        self.call_ids = call_ids
        self.chunk: tuple[int, int] | None = None  # (batch, chunk) once handed over

    @property
    def call_id(self) -> int:
        return self.call_ids[0]

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
        return self._engine.attempts.get(self.call_id, 1)

    @property
    def log_path(self) -> Path | None:
        """The stdout/stderr log of the array task that runs (or ran) this call."""
        return None if self.chunk is None else self._engine.log_of_chunk.get(self.chunk)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the task's log (the log is shared by the task's calls)."""
        return read_tail(self.log_path, lines)

    def log(self) -> str:
        """This call's own part of its task's log (the worker marks where each begins)."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return call_log(path.read_text(errors="replace"), self.call_id)


class FutureSink:
    """One call, one Future."""

    def __init__(self, future: Future) -> None:
        self.future = future

    def launch(self) -> bool:
        """The call is handed to the cluster: RUNNING, or False if it was cancelled."""
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


class ChunkSink(FutureSink):
    """Consecutive calls of a map: one Future whose result is the list of outcomes."""

    def __init__(self, future: Future, first_call: int, size: int,
                 progress: CallProgress | None = None) -> None:
        super().__init__(future)
        self.first_call = first_call
        self.outcomes: list[tuple[bool, Any] | None] = [None] * size
        self.missing = size
        self.progress = progress

    def claimed(self, calls: int) -> None:
        if self.progress:
            self.progress.started(calls)

    def deliver(self, call_id: int, ok: bool, value: Any, replace: bool = False) -> None:
        slot = call_id - self.first_call
        previous = self.outcomes[slot]
        if previous is not None:  # a late result replaces a failure, never a result
            if replace and not previous[0] and not self.future.done():
                self.outcomes[slot] = (ok, value)
            return
        self.outcomes[slot] = (ok, value)
        self.missing -= 1
        if self.progress:
            self.progress.advance(ok)
        if self.missing == 0:
            super().deliver(call_id, True, self.outcomes)


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
