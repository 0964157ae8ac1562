"""Progress bars (tqdm) of calls done, with running and failed counts.

The bars are driven by the monitor's own events (a call resolved, a task started): they
add no polling of their own. By default they show only on an interactive terminal.
Every step costs O(1): `progress(futures)` waits like `as_completed` (one waiter per
future) and recounts its running futures only now and then, never once per future.
tqdm is imported only when a bar is shown (it costs ~35 ms to import, asyncio with it).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, as_completed
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

RECOUNT_EVERY = 0.5  # seconds, at least, between two counts of the running futures


def interactive() -> bool:
    return sys.stderr.isatty()


class CallProgress:
    """A bar over `total` calls; `started` and `advance` are called by the monitor."""

    def __init__(self, total: int, enabled: bool | None = None, desc: str = "calls") -> None:
        self.total, self.done, self.failed, self.running = total, 0, 0, 0
        self._lock = threading.Lock()
        self._posted = float("-inf")  # when the postfix was last formatted (monotonic seconds)
        self.bar: tqdm | None = None
        if interactive() if enabled is None else enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="call", file=sys.stderr)

    @property
    def shown(self) -> bool:
        """Whether the bar is drawn (a map's sinks skip a hidden one's updates)."""
        return self.bar is not None

    def started(self, calls: int) -> None:
        with self._lock:
            self.running += calls
            self._refresh(0)

    def advance(self, ok: bool, running: int | None = None) -> None:
        """One call resolved; `running`: how many run now, if known (else one fewer)."""
        with self._lock:
            self.done += ok
            self.failed += not ok
            self.running = max(0, self.running - 1) if running is None else running
            self._refresh(1)

    def _refresh(self, steps: int) -> None:
        if self.bar is None:
            return
        finished = self.done + self.failed >= self.total
        now = time.monotonic()
        if finished or now - self._posted >= self.bar.mininterval:  # tqdm draws no faster
            self.bar.set_postfix(running=self.running, failed=self.failed, refresh=False)
            self._posted = now
        self.bar.update(steps)
        if finished:
            self.bar.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _RunningCount:
    """How many of some futures run. Recounted among the unfinished ones only after a
    pause 20 times as long as the last count took (and RECOUNT_EVERY at least), so the
    counts cost at most ~5% of the wait; in between, each completion takes one off."""

    def __init__(self, futures: list[Future]) -> None:
        self._unfinished = futures
        self.count = 0
        self._recount(time.monotonic())

    def _recount(self, now: float) -> None:
        unfinished, running = [], 0
        for future in self._unfinished:
            if future.running():
                running += 1
                unfinished.append(future)
            elif not future.done():
                unfinished.append(future)
        self._unfinished, self.count = unfinished, running
        took = time.monotonic() - now
        self._next = now + took + max(RECOUNT_EVERY, 20 * took)

    def one_done(self) -> int:
        now = time.monotonic()
        if now >= self._next:
            self._recount(now)
        else:
            self.count = max(0, self.count - 1)
        return self.count


def progress(futures: Iterable[Future], *, enabled: bool | None = None,
             desc: str = "calls") -> Iterator[Future]:
    """Yield `futures` as they complete while a bar shows done, running and failed.

        for future in slurmexecutor.progress(futures):
            ...

    Each distinct future is yielded once, like `as_completed`; the whole wait costs
    O(len(futures)).
    """
    futures = list(dict.fromkeys(futures))
    bar = CallProgress(len(futures), enabled, desc)
    running = _RunningCount(futures)
    try:
        for future in as_completed(futures):
            bar.advance(not future.cancelled() and future.exception() is None,
                        running.one_done())
            yield future
    finally:
        bar.close()
