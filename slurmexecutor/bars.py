"""Progress bars (tqdm) of calls done, with running and failed counts.

The bars are driven by the monitor's own events (a call resolved, a task started): they
add no polling of their own. By default they show only on an interactive terminal.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, as_completed

from tqdm.auto import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


class CallProgress:
    """A bar over `total` calls; `started` and `advance` are called by the monitor."""

    def __init__(self, total: int, enabled: bool | None = None, desc: str = "calls") -> None:
        self.total, self.done, self.failed, self.running = total, 0, 0, 0
        self._lock = threading.Lock()
        self.bar = tqdm(total=total, desc=desc, unit="call", file=sys.stderr,
                        disable=not (interactive() if enabled is None else enabled))

    def started(self, calls: int) -> None:
        with self._lock:
            self.running += calls
            self._refresh(0)

    def advance(self, ok: bool) -> None:
        with self._lock:
            self.done += ok
            self.failed += not ok
            self.running = max(0, self.running - 1)
            self._refresh(1)

    def _refresh(self, steps: int) -> None:
        self.bar.set_postfix(running=self.running, failed=self.failed, refresh=False)
        self.bar.update(steps)
        if self.done + self.failed >= self.total:
            self.bar.close()

    def close(self) -> None:
        self.bar.close()


def progress(futures: Iterable[Future], *, enabled: bool | None = None,
             desc: str = "calls") -> Iterator[Future]:
    """Yield `futures` as they complete while a bar shows done, running and failed.

        for future in slurmexecutor.progress(futures):
            ...
    """
    futures = list(futures)
    bar = CallProgress(len(futures), enabled, desc)
    try:
        for future in as_completed(futures):
            with bar._lock:
                bar.running = sum(1 for other in futures if other.running())
            bar.advance(not future.cancelled() and future.exception() is None)
            yield future
    finally:
        bar.close()
