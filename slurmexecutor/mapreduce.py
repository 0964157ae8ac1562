"""map_reduce: split an input into N fractions, fold each on a worker, fold the partials.

    total = map_reduce(count_reads, regions, 20, reducer=sum, executor=ex, bam=path)

    items --split--> fraction 0 .. fraction N-1            (contiguous, never empty)
                        |  one batch: a chunk per fraction, claimed by its array tasks
                        |  like any chunk (as many tasks as the work measured calls for)
                        v
    worker:   partial_k = reducer.fold(fn(item, *args, **kwargs) for item in fraction_k)
                        |  only N partials travel back
                        v
    client:   reducer.fold([partial_0, ..., partial_N-1])  (in fraction order)

The reducer must be associative (see `slurmexecutor.reducers`). `map_reduce` blocks and
returns the folded value; `map_reduce_async` returns a `MapReduceTask` to watch.
Keywords reserved for map_reduce itself: executor, initial, permissive, progress.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from slurmexecutor.owner.bars import CallProgress
from slurmexecutor.reducers import _MISSING, Reducer, as_reducer


@dataclass
class FractionFailure:
    """A fraction that failed: which items, and why."""

    index: int
    first_item: int  # position of its first item in the input
    size: int
    error: BaseException

    def __str__(self) -> str:
        return (f"fraction {self.index} (items {self.first_item}-"
                f"{self.first_item + self.size - 1}): {type(self.error).__name__}: "
                f"{str(self.error).splitlines()[0] if str(self.error) else ''}")


@dataclass
class MapReduceResult:
    """What `permissive=True` returns: the fold of the fractions that succeeded, and
    the failures."""

    value: Any
    failures: list[FractionFailure] = field(default_factory=list)
    fractions: int = 0

    @property
    def complete(self) -> bool:
        return not self.failures


def split_fractions(items: Iterable, fractions: int) -> list[list]:
    """Split into at most `fractions` contiguous, non-empty, near-equal lists.

    A dict contributes its items; a generator is consumed once.
    """
    if isinstance(fractions, bool) or not isinstance(fractions, int) or fractions < 1:
        raise ValueError(f"fractions must be a positive int, not {fractions!r}")
    if isinstance(items, dict):
        items = items.items()
    items = list(items)
    count = min(fractions, len(items))
    size, extra = divmod(len(items), count) if count else (0, 0)
    parts, start = [], 0
    for index in range(count):
        stop = start + size + (1 if index < extra else 0)
        parts.append(items[start:stop])
        start = stop
    return parts


def fold_fraction(fn: Callable, items: list, reducer: Reducer, args: tuple,
                  kwargs: dict) -> Any:
    """The combiner, run inside an array task: fold one fraction's results."""
    return reducer.fold(fn(item, *args, **kwargs) for item in items)


class MapReduceTask:
    """A running map_reduce: a Future of the folded value, plus per-fraction detail."""

    def __init__(self, fractions: list[Future], sizes: list[int], reducer: Reducer,
                 initial: Any, permissive: bool, executor: Any, owns_executor: bool,
                 progress: bool | None) -> None:
        self.fractions = fractions
        self.sizes = sizes
        self.future: Future = Future()
        self._reducer, self._initial, self._permissive = reducer, initial, permissive
        self._executor, self._owns_executor = executor, owns_executor
        self._lock = threading.Lock()
        self._remaining = len(fractions)
        self._bar = CallProgress(len(fractions), progress, desc="fractions")
        self._starts = [sum(sizes[:index]) for index in range(len(sizes))]
        if not fractions:
            self._finish()
        for fraction in fractions:
            fraction.add_done_callback(self._on_fraction_done)

    # -- watching -----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """How many fractions are pending, running, done and failed."""
        counts = {"pending": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
        for fraction in self.fractions:
            if fraction.cancelled():
                counts["cancelled"] += 1
            elif fraction.done():
                counts["failed" if fraction.exception() else "done"] += 1
            else:
                counts["running" if fraction.running() else "pending"] += 1
        return counts

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        """Cancel the fractions that have not started and kill the running ones."""
        cancelled = self.future.cancel()
        self._executor.cancel(self.fractions)
        self._release_executor()
        return cancelled

    def failures(self) -> list[FractionFailure]:
        return [self._failure(index, error) for index, fraction in enumerate(self.fractions)
                if fraction.done() and not fraction.cancelled()
                and (error := fraction.exception()) is not None]

    # -- folding ------------------------------------------------------------------------

    def _failure(self, index: int, error: BaseException) -> FractionFailure:
        return FractionFailure(index, self._starts[index], self.sizes[index], error)

    def _on_fraction_done(self, fraction: Future) -> None:
        cancelled = fraction.cancelled()
        error = None if cancelled else fraction.exception()
        failed = cancelled or error is not None
        self._bar.advance(not failed)
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
        if failed and not self._permissive and not self.future.done():
            if error is None:  # cancelled
                self.future.cancel()
            else:
                index = self.fractions.index(fraction)
                _note(error, f"in map_reduce {self._failure(index, error)}")
                self._set(exception=error)
                self._executor.cancel(self.fractions)
            self._release_executor()
        elif last:
            self._finish()

    def _finish(self) -> None:
        partials = [f.result() for f in self.fractions
                    if not f.cancelled() and f.exception() is None]
        try:
            if partials or self._initial is not _MISSING:
                value = self._reducer.fold(partials, self._initial)
            else:
                value = None  # permissive, and every fraction failed
        except Exception as error:  # noqa: BLE001  (the reducer failed on the client)
            self._set(exception=error)
        else:
            if self._permissive:
                value = MapReduceResult(value, self.failures(), len(self.fractions))
            self._set(result=value)
        self._release_executor()

    def _set(self, *, result: Any = None, exception: BaseException | None = None) -> None:
        if self.future.done():
            return
        if exception is not None:
            self.future.set_exception(exception)
        else:
            self.future.set_result(result)
        self._bar.close()

    def _release_executor(self) -> None:
        if self._owns_executor:
            self._owns_executor = False
            self._executor.shutdown(wait=False)


def _note(error: BaseException, text: str) -> None:
    notes = list(getattr(error, "__notes__", ()))
    if text in notes:
        return
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:  # Python 3.10: no add_note; keep it where 3.11+ does (its tracebacks omit it)
        error.__notes__ = [*notes, text]  # type: ignore[attr-defined]


def map_reduce_async(fn: Callable, items: Iterable, fractions: int,
                     reducer: Any = sum, *args: Any, executor: Any = None,
                     initial: Any = _MISSING, permissive: bool = False,
                     progress: bool | None = None, **kwargs: Any) -> MapReduceTask:
    """Start a map_reduce and return a `MapReduceTask` at once (see `map_reduce`)."""
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    folder = as_reducer(reducer)
    parts = split_fractions(items, fractions)
    if not parts and initial is _MISSING:
        raise ValueError("map_reduce: the input is empty (pass initial= to allow that)")
    owns = executor is None
    if owns:
        from slurmexecutor.executor import SlurmExecutor

        executor = SlurmExecutor()
    futures = executor.submit_many(  # one chunk per fraction, claimed like any chunk
        fold_fraction, [(fn, part, folder, args, kwargs) for part in parts], chunksize=1)
    return MapReduceTask(futures, [len(part) for part in parts], folder, initial,
                         permissive, executor, owns, progress)


def map_reduce(fn: Callable, items: Iterable, fractions: int, reducer: Any = sum,
               *args: Any, executor: Any = None, initial: Any = _MISSING,
               permissive: bool = False, progress: bool | None = None,
               **kwargs: Any) -> Any:
    """Apply `fn(item, *args, **kwargs)` to every item on the cluster and fold with
    `reducer`, each of `fractions` contiguous fractions folded on a worker (a chunk that
    the batch's array tasks claim).

    Strict by default: the first failing fraction raises its error (naming the fraction)
    and cancels the rest. With `permissive=True` returns a `MapReduceResult` whose
    `.value` folds the fractions that succeeded and `.failures` says which did not.
    """
    task = map_reduce_async(fn, items, fractions, reducer, *args, executor=executor,
                            initial=initial, permissive=permissive, progress=progress,
                            **kwargs)
    try:
        return task.result()
    except BaseException:
        if not task.done():  # interrupted (Ctrl-C): do not leave the fractions running
            task.cancel()
        raise
